"""What a study run writes: one typed results file per run (``results.json``), read back by the
index page. The library computes and writes it; the notebook only displays it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from saelib.io import to_jsonable, write_json
from saelib.studies.claims import Claim
from saelib.studies.record import RESULTS_FILE, Headline


@dataclass
class StudyResults:
    """A run's measurements: per-seed rows, the seed summary, the claims and where time went.

    ``extra`` holds what only this study measures (vector counts, Pareto sets, ...).
    """

    study: str
    params: dict[str, Any]
    per_seed: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    claims: list[Claim]
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tables(
        cls, study: str, params: Any, per_seed: pd.DataFrame, summary: pd.DataFrame, **rest: Any
    ) -> StudyResults:
        """From the study's params dataclass and its tables (a named index becomes a column)."""
        if summary.index.name is not None:
            summary = summary.reset_index()
        return cls(study, asdict(params), per_seed.to_dict("records"),
                   summary.to_dict("records"), **rest)  # fmt: skip

    def save(self, run_dir: str | Path) -> Path:
        """``results.json`` as strict JSON: a missing number (NaN, e.g. the std of one seed) is
        written as null, so any JSON reader, a browser's included, can read it."""
        return write_json(Path(run_dir) / RESULTS_FILE, _strict(to_jsonable(asdict(self))))

    @classmethod
    def load(cls, path: str | Path) -> StudyResults:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["claims"] = [Claim(**claim) for claim in data["claims"]]
        return cls(**data)

    def claims_table(self) -> pd.DataFrame:
        return pd.DataFrame([claim.to_dict() for claim in self.claims])


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict(item) for item in value]
    return value


# Helpers for a study's ``headlines``: they read results JSON and raise on unexpected content
# (the index page shows that as an error cell).


def as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, found {value!r}")
    return float(value)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def claims_held(claims: list[dict[str, Any]]) -> Headline:
    """ "held/judged" with each claim's verdict in the tooltip."""
    if not claims:
        return Headline("not judged")
    held = sum(bool(claim["holds"]) for claim in claims)
    tooltip = "\n".join(
        f"{'✓' if claim['holds'] else '✗'} {claim.get('statement', '')}" for claim in claims
    )
    return Headline(f"{held}/{len(claims)}", tooltip)
