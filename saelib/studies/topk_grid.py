"""TopK quality-sparsity grid: K x latent_dim TopK SAEs trained from one pass over the data.

Spec: ``studies/topk_grid.md`` (the report this reproduces). The notebook
``notebooks/topk_grid.ipynb`` calls these functions and shows their results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from saelib.evals.metrics import evaluate, pareto_optimal
from saelib.params import (
    ParamsError,
    require_all_positive,
    require_fraction,
    require_non_empty,
    require_non_negative,
    require_positive,
    require_unique,
)
from saelib.saes import TopKConfig, TopKSAE
from saelib.studies.claims import Claim, seed_spread, summarize_seeds
from saelib.studies.common import SAEStudyParams, SplitData
from saelib.studies.record import Headline, Study
from saelib.studies.results import StudyResults, as_float, claims_held, mean
from saelib.training import SAESpec, TrainConfig, TrainResult, train_saes
from saelib.training.losses import TopKLoss

# The report: LLaMA-3.2-1B (16 blocks), activations after block 14 -> relative depth 14/16.
REPORT_RELATIVE_DEPTH = 14 / 16

REPORTED_EV = {  # (k, latent_dim) -> explained variance
    (5, 512): 0.702, (5, 1024): 0.710, (5, 2048): 0.719,
    (10, 512): 0.765, (10, 1024): 0.766, (10, 2048): 0.768,
    (20, 512): 0.804, (20, 1024): 0.813, (20, 2048): 0.819,
    (100, 512): 0.878, (100, 1024): 0.880, (100, 2048): 0.879,
}  # fmt: skip
REPORTED_DEATH_PERCENT = {
    (5, 512): 85.5, (5, 1024): 90.9, (5, 2048): 95.2,
    (10, 512): 72.3, (10, 1024): 84.0, (10, 2048): 87.6,
    (20, 512): 54.5, (20, 1024): 65.1, (20, 2048): 73.5,
    (100, 512): 0.0, (100, 1024): 1.7, (100, 2048): 7.8,
}  # fmt: skip
REPORTED_ACTIVATION = {5: (17.3, 49.5), 10: (10.5, 39.4), 20: (6.1, 25.7), 100: (1.8, 10.9)}


@dataclass
class TopKGridParams(SAEStudyParams):
    model: str = "smollm2-135m"
    layer: int = 26  # round(14/16 * 30): the report's relative depth on SmolLM2-135M
    dataset: str = "gsm8k"
    positions: Literal["all", "last", "answer"] = "answer"
    max_tokens: int = 7_473  # the report's 5,978 train + 1,495 validation vectors
    context_length: int = 256
    harvest_batch_size: int = 16
    k_values: list[int] = field(default_factory=lambda: [5, 10, 20, 100])
    latent_dims: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 1e-3
    epochs: float = 25.0
    batch_size: int = 256
    val_fraction: float = 0.2
    use_decoder_bias: bool = False  # the report's decoder has no bias
    auxk_alpha: float = 0.0  # the report trains on MSE only; 1/32 enables AuxK
    # the report's "MSE": the mean over elements. With Adam and no clipping the loss scale
    # barely matters (Adam is scale-invariant up to its epsilon); it would with AuxK or clipping
    reconstruction_loss: Literal["l2", "mse", "fvu"] = "mse"
    checkpoint_every: int = 100  # steps; a run interrupted later resumes from here
    dead_after_tokens: int = 10_000_000
    device: str = "auto"

    def check(self) -> None:
        """Impossible values stop here, before any compute."""
        require_positive(self, "max_tokens", "context_length", "harvest_batch_size", "batch_size")
        require_positive(self, "epochs", "lr", "dead_after_tokens")
        require_non_negative(self, "checkpoint_every", "auxk_alpha")
        require_fraction(self, "val_fraction")
        require_non_empty(self, "k_values", "latent_dims", "seeds")
        require_all_positive(self, "k_values", "latent_dims")
        require_unique(self, "k_values", "latent_dims")
        too_large = [(k, d) for k in self.k_values for d in self.latent_dims if k > d]
        if too_large:
            k, d = too_large[0]
            raise ParamsError(f"k={k} is larger than latent_dim={d}: TopK needs k <= latent_dim")
        grid = len(self.k_values) * len(self.seeds)  # SAEs per latent_dim
        self.check_shared([d for d in self.latent_dims for _ in range(grid)], "latent_dims")

    def train_config(self) -> TrainConfig:
        return super().train_config(grad_clip_norm=None)  # the report clips nothing


def config_name(k: int, latent_dim: int, seed: int) -> str:
    return f"k{k}_d{latent_dim}_s{seed}"


def build_specs(params: TopKGridParams, d_in: int) -> list[SAESpec]:
    specs = []
    for k in params.k_values:
        for latent_dim in params.latent_dims:
            for seed in params.seeds:
                config = TopKConfig(d_in, latent_dim, k, params.use_decoder_bias)
                sae = TopKSAE(config, generator=torch.Generator().manual_seed(seed))
                loss = TopKLoss(params.auxk_alpha, reconstruction=params.reconstruction_loss)
                name = config_name(k, latent_dim, seed)
                labels = {"k": k, "latent_dim": latent_dim, "seed": seed}
                specs.append(SAESpec(name, sae, loss, params.sae_metadata(), labels=labels))
    return specs


def train_grid(
    params: TopKGridParams, data: SplitData, checkpoint_dir: Path | None, progress: bool = True
) -> list[TrainResult]:
    """Every (k, latent_dim, seed) SAE, trained together: each batch is read once for all."""
    specs = build_specs(params, data.train.shape[1])
    return train_saes(
        specs, data.train, params.train_config(), checkpoint_dir=checkpoint_dir, progress=progress
    )


def evaluate_grid(results: list[TrainResult], data: SplitData) -> pd.DataFrame:
    """One row per trained SAE: its config, validation metrics and training time."""
    rows = []
    for result in results:
        metrics = evaluate(result.sae, data.val).to_dict()
        rows.append(
            result.labels
            | metrics
            | {"train_seconds": result.seconds, "steps": result.steps, "status": result.status}
        )
    return pd.DataFrame(rows)


METRIC_COLUMNS = [
    "explained_variance",
    "explained_variance_centred",  # the report's EV: 1 - var(residual) / var(x)
    "death_rate",
    "mean_activation",
    "max_activation",
    "mse",
    "cosine_similarity",
    "l0",
    "train_seconds",
]


def summarize(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (k, latent_dim); columns like ``mse_mean``.

    Diverged SAEs are left out (``n_seeds`` counts the rest).
    """
    return summarize_seeds(per_seed, ["k", "latent_dim"], METRIC_COLUMNS).reset_index()


def with_reported(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with the report's EV and death rate beside ours (NaN where not reported)."""
    keys = list(zip(summary["k"], summary["latent_dim"], strict=True))
    table = summary.copy()
    table["reported_ev"] = [REPORTED_EV.get(key, np.nan) for key in keys]
    table["reported_death_rate"] = [REPORTED_DEATH_PERCENT.get(key, np.nan) / 100 for key in keys]
    return table


PARETO_AXES = {
    # name -> [(column, maximize)]
    "ev_vs_k": [("explained_variance_mean", True), ("k", False)],
    "ev_vs_k_and_latent_dim": [
        ("explained_variance_mean", True),
        ("k", False),
        ("latent_dim", False),
    ],
    "ev_vs_l0": [("explained_variance_mean", True), ("l0_mean", False)],
}


def pareto_table(summary: pd.DataFrame) -> pd.DataFrame:
    """For each choice of axes, whether each config is Pareto-optimal."""
    table = summary[["k", "latent_dim", "explained_variance_mean", "l0_mean"]].copy()
    for name, axes in PARETO_AXES.items():
        points = summary[[column for column, _ in axes]].to_numpy()
        table[f"pareto_{name}"] = pareto_optimal(points, [maximize for _, maximize in axes])
    return table


def check_claims(summary: pd.DataFrame, pareto: pd.DataFrame) -> list[Claim]:
    """The report's four claims, each judged on our seed means, with the numbers behind it."""
    return [
        _claim_all_pareto(summary, pareto),
        _claim_k_dominates(summary),
        _claim_death_trends(summary),
        _claim_activation_size(summary),
    ]


def _pivot(summary: pd.DataFrame, column: str) -> pd.DataFrame:
    return summary.pivot(index="k", columns="latent_dim", values=column).sort_index()


def _claim_all_pareto(summary: pd.DataFrame, pareto: pd.DataFrame) -> Claim:
    counts = {name: int(pareto[f"pareto_{name}"].sum()) for name in PARETO_AXES}
    n = len(pareto)
    holds = counts["ev_vs_k_and_latent_dim"] == n
    parts = [f"{count}/{n} Pareto-optimal on axes {name}" for name, count in counts.items()]
    dominated = summary[~pareto["pareto_ev_vs_k_and_latent_dim"].to_numpy()]
    for row in dominated.itertuples():
        rivals = summary[(summary.k <= row.k) & (summary.latent_dim <= row.latent_dim)]
        best = rivals.loc[rivals.explained_variance_mean.idxmax()]
        margin = best.explained_variance_mean - row.explained_variance_mean
        spread = seed_spread(best.explained_variance_std, row.explained_variance_std)
        parts.append(
            f"K={row.k}, latent_dim={row.latent_dim} is dominated by K={best.k:.0f}, "
            f"latent_dim={best.latent_dim:.0f} by {margin:.4f} EV "
            f"({'within' if margin <= spread else 'beyond'} the seed spread {spread:.4f})"
        )
    statement = "All configs are Pareto-optimal (axes: EV up, K down, latent_dim down)"
    return Claim(statement, holds, "; ".join(parts), number=1)


def _claim_k_dominates(summary: pd.DataFrame) -> Claim:
    ev = _pivot(summary, "explained_variance_mean")
    dict_spread = ev.max(axis=1) - ev.min(axis=1)  # effect of dictionary size at each K
    k_spread = ev.max(axis=0) - ev.min(axis=0)  # effect of K at each dictionary size
    k_dominates = bool(k_spread.min() > dict_spread.max())
    dict_small = bool((dict_spread < 0.02).all())
    evidence = (
        f"K dominates: {'yes' if k_dominates else 'no'} (EV spread across K per latent_dim: "
        f"{_fmt(k_spread)}); dictionary size adds < 0.02 EV: {'yes' if dict_small else 'no'} "
        f"(EV spread across latent_dim per K: {_fmt(dict_spread)})"
    )
    statement = "K dominates quality; dictionary size adds < 2 EV points"
    return Claim(statement, k_dominates and dict_small, evidence, number=2)


def _claim_death_trends(summary: pd.DataFrame) -> Claim:
    death = _pivot(summary, "death_rate_mean")
    rises_with_dim = _monotone_pairs(death.to_numpy(), axis=1, increasing=True)
    falls_with_k = _monotone_pairs(death.to_numpy(), axis=0, increasing=False)
    holds = rises_with_dim[0] == rises_with_dim[1] and falls_with_k[0] == falls_with_k[1]
    evidence = (
        f"death rate rises with latent_dim in {rises_with_dim[0]}/{rises_with_dim[1]} adjacent "
        f"pairs and falls with K in {falls_with_k[0]}/{falls_with_k[1]}; "
        f"death rate (%) by K x latent_dim: {(death * 100).round(1).to_dict('index')}"
    )
    statement = "Death rate rises with dictionary size and falls with K"
    return Claim(statement, holds, evidence, number=3)


def _claim_activation_size(summary: pd.DataFrame) -> Claim:
    by_k = summary.groupby("k")[["mean_activation_mean", "max_activation_mean"]].mean()
    mean_falls = _monotone_pairs(by_k["mean_activation_mean"].to_numpy()[:, None], 0, False)
    max_falls = _monotone_pairs(by_k["max_activation_mean"].to_numpy()[:, None], 0, False)
    holds = mean_falls[0] == mean_falls[1] and max_falls[0] == max_falls[1]
    evidence = "mean / max activation by K: " + ", ".join(
        f"{k}: {row.mean_activation_mean:.3g} / {row.max_activation_mean:.3g}"
        for k, row in by_k.iterrows()
    )
    statement = "Smaller K gives larger activations (mean and max)"
    return Claim(statement, holds, evidence, number=4)


def _monotone_pairs(values: np.ndarray, axis: int, increasing: bool) -> tuple[int, int]:
    """(adjacent pairs in the expected direction, all adjacent pairs) along ``axis``."""
    steps = np.diff(values, axis=axis)
    agreeing = steps > 0 if increasing else steps < 0
    return int(agreeing.sum()), int(steps.size)


def _fmt(series: pd.Series) -> str:
    return ", ".join(f"{index}: {value:.3f}" for index, value in series.items())


# ------------------------------------------------------------------------ results and record


def write_results(
    run_dir: Path,
    params: TopKGridParams,
    data: SplitData,
    per_seed: pd.DataFrame,
    summary: pd.DataFrame,
    seconds: dict[str, float],
) -> StudyResults:
    """Judge the claims and write ``results.json`` (and the Pareto sets) into ``run_dir``."""
    pareto = pareto_table(summary)
    optimal = pareto[pareto["pareto_ev_vs_k_and_latent_dim"]]
    axes = {name: [{"column": c, "maximize": m} for c, m in chosen]
            for name, chosen in PARETO_AXES.items()}  # fmt: skip
    results = StudyResults.from_tables(
        STUDY.name, params, per_seed, with_reported(summary),
        claims=check_claims(summary, pareto),
        seconds=seconds,
        extra={
            "n_train_vectors": len(data.train),
            "n_val_vectors": len(data.val),
            "pareto": {"axes": axes, "configs": pareto.to_dict("records"),
                       "optimal_ev_vs_k_and_latent_dim":
                           optimal[["k", "latent_dim"]].to_dict("records")},
        },
    )  # fmt: skip
    results.save(run_dir)
    return results


def headlines(results: dict[str, Any]) -> dict[str, Headline]:
    """The index page's numbers for one run."""
    summary = results["summary"]
    best = max(summary, key=lambda row: as_float(row["explained_variance_mean"]))
    death = [as_float(row["death_rate_mean"]) for row in summary]
    return {
        "best EV": Headline(
            f"{as_float(best['explained_variance_mean']):.3f} "
            f"(K={best['k']}, latent_dim={best['latent_dim']})",
            f"highest validation explained variance (mean over seeds) of {len(summary)} configs",
        ),
        "mean death rate": Headline(f"{mean(death):.1%}", "mean over the grid's configs"),
        "claims held": claims_held(results["claims"]),
        "train vectors": Headline(f"{int(results['extra']['n_train_vectors']):,}"),
    }


STUDY = Study(
    name="topk_grid",
    params_class=TopKGridParams,
    description="TopK quality-sparsity grid: K x dictionary size, several seeds",
    headlines=headlines,
    key_params=("model", "layer", "dataset", "max_tokens", "k_values", "latent_dims", "seeds",
                "epochs"),
)  # fmt: skip
