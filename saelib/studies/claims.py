"""Judging claims on several seeds: summaries with spread, comparisons against a reference run,
and the typed verdicts every study writes.

A difference "clears the seed spread" when it is larger than sqrt(std_a^2 + std_b^2), the
standard deviation over seeds of each side combined; with one seed the spread is 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd


@dataclass
class Claim:
    """One claim of an original work, judged on our measurements, with the numbers behind it."""

    statement: str
    holds: bool
    evidence: str
    number: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_seeds(
    per_seed: pd.DataFrame, by: str | list[str], metrics: list[str]
) -> pd.DataFrame:
    """Mean and standard deviation over seeds per group, as columns ``<metric>_mean`` and
    ``<metric>_std``, and ``n_seeds``. Rows with status "diverged" are left out."""
    if "status" in per_seed:
        per_seed = per_seed[per_seed["status"] != "diverged"]
    grouped = per_seed.groupby(by)
    summary = grouped[metrics].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary["n_seeds"] = grouped.size()
    return summary


@dataclass
class Comparison:
    """A run's mean minus the reference's, against the combined seed spread."""

    metric: str
    run: str
    difference: float
    spread: float

    @property
    def beyond_spread(self) -> bool:
        return abs(self.difference) > self.spread


def seed_spread(*stds: float) -> float:
    """sqrt of the sum of squared standard deviations (NaN, from one seed, counts as 0)."""
    return math.hypot(*(0.0 if std != std else float(std) for std in stds))


def compare_to_reference(
    summary: pd.DataFrame, metric: str, reference: str, runs: Sequence[str] | None = None
) -> list[Comparison]:
    """Each run of ``summary`` (indexed by run) against ``reference`` on ``metric``."""
    base_mean = summary.loc[reference, f"{metric}_mean"]
    base_std = summary.loc[reference, f"{metric}_std"]
    chosen = [run for run in summary.index if run != reference and (runs is None or run in runs)]
    comparisons = []
    for run in chosen:
        mean, std = summary.loc[run, f"{metric}_mean"], summary.loc[run, f"{metric}_std"]
        spread = seed_spread(std, base_std)
        comparisons.append(Comparison(metric, run, float(mean - base_mean), spread))
    return comparisons


def describe(comparisons: Sequence[Comparison]) -> str:
    return "; ".join(f"{c.run}: {c.difference:+.4f} (spread {c.spread:.4f})" for c in comparisons)
