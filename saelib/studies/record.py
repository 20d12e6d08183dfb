"""A study's record: everything the runner, the report and the plots need to know about it.

Each study module defines ``STUDY = Study(...)``; ``saelib.studies.STUDIES`` collects them.
Nothing outside a study's own module names it: the runner, the index page and the explorer
iterate over the records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# Shipped with the package (links to the top-level notebooks/ and params/ in a source checkout).
STUDIES_DIR = Path(__file__).resolve().parent
NOTEBOOKS_DIR = STUDIES_DIR / "notebooks"
PARAMS_DIR = STUDIES_DIR / "params"
RESULTS_FILE = "results.json"  # written by every study (saelib.studies.results)
CHECKPOINTS_FOLDER = "checkpoints"  # in a run folder: every study's checkpoint_dir


class Headline(NamedTuple):
    """One headline number of a run on the index page, with a tooltip."""

    text: str
    tooltip: str = ""


@dataclass(frozen=True)
class Study:
    """One study: its params type, notebook, params files, and how its results read.

    ``headlines`` turns a run's results JSON (:class:`saelib.studies.results.StudyResults`)
    into a few numbers for the index page; ``key_params`` are shown beside them; ``controls``
    are runs drawn as controls (grey) in bar charts. ``data_parallel`` says whether its training
    may split each batch over processes (``--parallel data``): not when a loss keeps statistics
    of the rows it sees.
    """

    name: str
    params_class: type
    description: str
    headlines: Callable[[dict[str, Any]], dict[str, Headline]]
    key_params: tuple[str, ...] = ()
    controls: tuple[str, ...] = field(default=())
    data_parallel: bool = True

    @property
    def notebook(self) -> Path:
        return NOTEBOOKS_DIR / f"{self.name}.ipynb"

    @property
    def default_params(self) -> Path:
        return PARAMS_DIR / f"{self.name}.yaml"

    @property
    def smoke_params(self) -> Path:
        return PARAMS_DIR / f"{self.name}.smoke.yaml"

    def params_from(self, namespace: dict[str, Any], source: str = "notebook parameters"):
        """The study's params from a notebook's globals (its parameters cell), validated."""
        from dataclasses import fields

        from saelib.params import parse_params

        names = [item.name for item in fields(self.params_class)]
        return parse_params(self.params_class, {name: namespace[name] for name in names}, source)
