"""The studies: one module each, with its params type, functions and a ``STUDY`` record.

A module of this package that defines ``STUDY`` is a study; adding one needs no change here.
"""

from __future__ import annotations

import importlib
import pkgutil

from saelib.studies.record import Study

SHARED_MODULES = {"claims", "common", "record", "results"}


def _discover() -> dict[str, Study]:
    found: dict[str, Study] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name in SHARED_MODULES or module.ispkg:
            continue
        record = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STUDY", None)
        if isinstance(record, Study):
            found[record.name] = record
    return dict(sorted(found.items()))


STUDIES: dict[str, Study] = _discover()

__all__ = ["STUDIES", "Study"]
