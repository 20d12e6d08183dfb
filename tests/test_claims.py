"""Claim logic on small synthetic tables: claims that hold, claims that fail, and differences
that lie within the seed spread."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from saelib.studies import progressive_orthogonality as ortho
from saelib.studies import topk_grid as grid
from saelib.studies.claims import (
    Claim,
    compare_to_reference,
    describe,
    seed_spread,
    summarize_seeds,
)

# ------------------------------------------------------------------------- shared helpers


def test_seed_spread_combines_standard_deviations():
    assert seed_spread(0.03, 0.04) == pytest.approx(0.05)
    assert seed_spread(float("nan"), 0.04) == pytest.approx(0.04)  # one seed: no spread
    assert seed_spread(float("nan")) == 0.0
    assert seed_spread() == 0.0


def test_summarize_seeds_gives_mean_std_and_seed_count_without_diverged_runs():
    per_seed = pd.DataFrame(
        [
            {"run": "a", "seed": 0, "x": 1.0, "status": "complete"},
            {"run": "a", "seed": 1, "x": 3.0, "status": "complete"},
            {"run": "a", "seed": 2, "x": 1e9, "status": "diverged"},
            {"run": "b", "seed": 0, "x": 5.0, "status": "complete"},
        ]
    )
    summary = summarize_seeds(per_seed, "run", ["x"])
    assert list(summary.columns) == ["x_mean", "x_std", "n_seeds"]
    assert summary.loc["a", "x_mean"] == 2.0 and summary.loc["a", "n_seeds"] == 2
    assert summary.loc["a", "x_std"] == pytest.approx(math.sqrt(2))  # sample std (ddof 1)
    assert summary.loc["b", "x_mean"] == 5.0 and math.isnan(summary.loc["b", "x_std"])


def test_compare_to_reference_measures_differences_against_the_combined_spread():
    summary = pd.DataFrame(
        {"m_mean": [0.50, 0.60, 0.52, 0.70], "m_std": [0.03, 0.04, 0.04, float("nan")]},
        index=pd.Index(["base", "clear", "within", "one_seed"], name="run"),
    )
    comparisons = {c.run: c for c in compare_to_reference(summary, "m", "base")}
    assert list(comparisons) == ["clear", "within", "one_seed"]
    clear, within, one_seed = comparisons.values()
    assert clear.difference == pytest.approx(0.10) and clear.spread == pytest.approx(0.05)
    assert clear.beyond_spread
    assert within.difference == pytest.approx(0.02) and not within.beyond_spread
    assert one_seed.spread == pytest.approx(0.03) and one_seed.beyond_spread
    chosen = compare_to_reference(summary, "m", "base", runs=["within"])
    assert [c.run for c in chosen] == ["within"]
    assert describe(chosen) == "within: +0.0200 (spread 0.0500)"


def test_a_claim_serialises_to_a_plain_dict():
    claim = Claim("s", True, "e", number=3)
    assert claim.to_dict() == {"statement": "s", "holds": True, "evidence": "e", "number": 3}


# ------------------------------------------------------------------------------- TopK grid


def grid_summary(rows: dict[tuple[int, int], dict[str, float]], ev_std: float = 0.001):
    """A seed summary of the grid: (k, latent_dim) -> ev, death, mean and max activation."""
    records = [
        {
            "k": k,
            "latent_dim": latent_dim,
            "explained_variance_mean": row["ev"],
            "explained_variance_std": ev_std,
            "death_rate_mean": row["death"],
            "mean_activation_mean": row["mean_act"],
            "max_activation_mean": row["max_act"],
            "l0_mean": row.get("l0", float(k)),
        }
        for (k, latent_dim), row in rows.items()
    ]
    return pd.DataFrame(records)


# Every claim of the report holds: K sets quality (+0.20 EV), the dictionary adds 0.01; death
# rises with latent_dim and falls with K; smaller K, larger activations.
HOLDING = {
    (5, 512): {"ev": 0.60, "death": 0.5, "mean_act": 10.0, "max_act": 40.0},
    (5, 1024): {"ev": 0.61, "death": 0.7, "mean_act": 10.0, "max_act": 40.0},
    (20, 512): {"ev": 0.80, "death": 0.2, "mean_act": 5.0, "max_act": 20.0},
    (20, 1024): {"ev": 0.81, "death": 0.4, "mean_act": 5.0, "max_act": 20.0},
}
# Every claim fails: the larger dictionary loses 0.05 EV at K=5 (dominated, and more than 0.02
# apart), death falls with latent_dim, activations grow with K.
FAILING = {
    (5, 512): {"ev": 0.60, "death": 0.7, "mean_act": 5.0, "max_act": 20.0},
    (5, 1024): {"ev": 0.55, "death": 0.5, "mean_act": 5.0, "max_act": 20.0},
    (20, 512): {"ev": 0.80, "death": 0.4, "mean_act": 10.0, "max_act": 40.0},
    (20, 1024): {"ev": 0.81, "death": 0.2, "mean_act": 10.0, "max_act": 40.0},
}


def _claims(rows: dict, ev_std: float = 0.001) -> dict[int, Claim]:
    summary = grid_summary(rows, ev_std)
    claims = grid.check_claims(summary, grid.pareto_table(summary))
    assert [claim.number for claim in claims] == [1, 2, 3, 4]
    return {claim.number: claim for claim in claims}


def test_pareto_table_marks_the_optimal_configs_on_each_choice_of_axes():
    rows = {key: dict(row) for key, row in FAILING.items()}
    rows[(20, 1024)]["l0"] = 30.0  # measured L0 above the others: still the best EV
    rows[(20, 512)]["l0"] = 3.0  # fewer active latents than K=5 with more EV
    pareto = grid.pareto_table(grid_summary(rows)).set_index(["k", "latent_dim"])
    assert pareto["pareto_ev_vs_k_and_latent_dim"].to_dict() == {
        (5, 512): True, (5, 1024): False, (20, 512): True, (20, 1024): True,
    }  # fmt: skip
    # EV against K alone: K=5 at 0.60 and K=20 at 0.81 (the other two are dominated)
    assert pareto["pareto_ev_vs_k"].to_dict() == {
        (5, 512): True, (5, 1024): False, (20, 512): False, (20, 1024): True,
    }  # fmt: skip
    assert pareto["pareto_ev_vs_l0"].to_dict() == {
        (5, 512): False, (5, 1024): False, (20, 512): True, (20, 1024): True,
    }  # fmt: skip


def test_the_reports_claims_hold_on_a_grid_that_agrees():
    claims = _claims(HOLDING)
    assert all(claim.holds for claim in claims.values()), claims
    assert "4/4 Pareto-optimal on axes ev_vs_k_and_latent_dim" in claims[1].evidence
    assert "dominated" not in claims[1].evidence
    assert claims[2].evidence == (
        "K dominates: yes (EV spread across K per latent_dim: 512: 0.200, 1024: 0.200); "
        "dictionary size adds < 0.02 EV: yes (EV spread across latent_dim per K: 5: 0.010, "
        "20: 0.010)"
    )
    assert "rises with latent_dim in 2/2 adjacent pairs and falls with K in 2/2" in (
        claims[3].evidence
    )
    assert claims[4].evidence == "mean / max activation by K: 5: 10 / 40, 20: 5 / 20"


def test_the_reports_claims_fail_on_a_grid_that_disagrees():
    claims = _claims(FAILING)
    assert not any(claim.holds for claim in claims.values()), claims
    assert "3/4 Pareto-optimal on axes ev_vs_k_and_latent_dim" in claims[1].evidence
    assert (
        "K=5, latent_dim=1024 is dominated by K=5, latent_dim=512 by 0.0500 EV "
        "(beyond the seed spread 0.0014)"
    ) in claims[1].evidence
    assert "dictionary size adds < 0.02 EV: no" in claims[2].evidence
    assert "5: 0.050" in claims[2].evidence
    assert "rises with latent_dim in 0/2 adjacent pairs and falls with K in 2/2" in (
        claims[3].evidence
    )
    assert claims[4].evidence == "mean / max activation by K: 5: 5 / 20, 20: 10 / 40"


def test_a_dominated_config_within_the_seed_spread_is_named_as_such():
    claims = _claims(FAILING, ev_std=0.05)
    assert not claims[1].holds  # the verdict counts Pareto-optimal configs
    assert (
        "K=5, latent_dim=1024 is dominated by K=5, latent_dim=512 by 0.0500 EV "
        "(within the seed spread 0.0707)"
    ) in claims[1].evidence


def test_k_must_beat_the_dictionary_everywhere_for_claim_2():
    rows = {key: dict(row) for key, row in HOLDING.items()}
    rows[(20, 512)]["ev"] = 0.605  # K adds only 0.005 EV at latent_dim 512
    claims = _claims(rows)
    assert not claims[2].holds
    assert "K dominates: no" in claims[2].evidence
    assert "dictionary size adds < 0.02 EV: no" in claims[2].evidence  # 0.205 at K=20


def test_grid_summary_averages_seeds_and_drops_diverged_saes():
    rows = []
    for k, latent_dim in HOLDING:
        for seed, offset in ((0, -0.01), (1, 0.01), (2, 5.0)):
            metrics = dict.fromkeys(grid.METRIC_COLUMNS, 1.0)
            metrics["explained_variance"] = HOLDING[(k, latent_dim)]["ev"] + offset
            status = "diverged" if seed == 2 else "complete"
            labels = {"k": k, "latent_dim": latent_dim, "seed": seed, "status": status}
            rows.append(labels | metrics)
    summary = grid.summarize(pd.DataFrame(rows))
    assert list(summary[["k", "latent_dim"]].itertuples(index=False, name=None)) == list(HOLDING)
    assert (summary["n_seeds"] == 2).all()
    assert summary["explained_variance_mean"].tolist() == pytest.approx([0.60, 0.61, 0.80, 0.81])
    assert summary["explained_variance_std"].tolist() == pytest.approx([0.01 * math.sqrt(2)] * 4)
    table = grid.with_reported(summary)
    assert table.loc[0, "reported_ev"] == 0.702 and table.loc[0, "reported_death_rate"] == 0.855
    unreported = grid.with_reported(grid_summary({(2, 32): HOLDING[(5, 512)]}))
    assert math.isnan(unreported.loc[0, "reported_ev"])


# ----------------------------------------------------------------- progressive orthogonality


def ortho_summary(runs: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """The seed summary of per-seed rows: run -> metric -> one value per seed."""
    rows = []
    for run, metrics in runs.items():
        n_seeds = len(next(iter(metrics.values())))
        for seed in range(n_seeds):
            row = {"run": run, "seed": seed, "status": "complete"}
            rows.append(row | {metric: values[seed] for metric, values in metrics.items()})
    return summarize_seeds(pd.DataFrame(rows), "run", list(next(iter(runs.values()))))


BASELINE = {
    "absorption_rate": [0.15, 0.16, 0.14],
    "probe_top1": [0.70, 0.71, 0.69],
    "explained_variance": [0.60, 0.61, 0.59],
}


def _verdicts(summary: pd.DataFrame) -> list[bool]:
    claims = ortho.check_claim(summary)
    assert len(claims) == 3
    return [claim.holds for claim in claims]


def test_the_original_claim_holds_when_every_run_clears_the_baseline():
    runs = {
        "baseline": BASELINE,
        # a static control that would fail every part: not one of the progressive runs
        "static": {
            "absorption_rate": [0.9] * 3,
            "probe_top1": [0.1] * 3,
            "explained_variance": [0.1] * 3,
        },
        "run1": {
            "absorption_rate": [0.05, 0.06, 0.04],
            "probe_top1": [0.75, 0.76, 0.74],
            "explained_variance": [0.605, 0.615, 0.595],
        },
    }
    claims = ortho.check_claim(ortho_summary(runs))
    assert [claim.holds for claim in claims] == [True, True, True]
    absorption, probing, reconstruction = (claim.evidence for claim in claims)
    assert absorption == "run1: -0.1000 (spread 0.0141)"
    assert probing == "run1: +0.0500 (spread 0.0141)"
    assert reconstruction == "run1: +0.0050 (spread 0.0141)"


def test_the_original_claim_fails_when_a_run_does_not_clear_the_baseline():
    runs = {
        "baseline": BASELINE,
        "run1": {
            "absorption_rate": [0.05, 0.06, 0.04],
            "probe_top1": [0.75, 0.76, 0.74],
            "explained_variance": [0.60, 0.61, 0.59],
        },
        # absorption only 0.01 lower, probing lower, EV 0.05 lower with a small spread
        "run2": {
            "absorption_rate": [0.14, 0.15, 0.13],
            "probe_top1": [0.65, 0.66, 0.64],
            "explained_variance": [0.55, 0.56, 0.54],
        },
    }
    claims = ortho.check_claim(ortho_summary(runs))
    assert [claim.holds for claim in claims] == [False, False, False]
    assert claims[0].evidence == "run1: -0.1000 (spread 0.0141); run2: -0.0100 (spread 0.0141)"
    assert "run2: -0.0500 (spread 0.0141)" in claims[1].evidence
    assert "run2: -0.0500 (spread 0.0141)" in claims[2].evidence


def test_absorption_must_also_fall_by_a_third_of_the_baseline():
    runs = {"baseline": BASELINE,
            "run1": {"absorption_rate": [0.115, 0.116, 0.114], "probe_top1": [0.75, 0.76, 0.74],
                     "explained_variance": [0.60, 0.61, 0.59]}}  # fmt: skip
    # 0.035 lower: beyond the spread (0.0100) but less than a third of 0.15
    assert _verdicts(ortho_summary(runs)) == [False, True, True]


def test_differences_within_the_seed_spread_neither_clear_nor_break_the_claim():
    noisy = [-0.05, 0.0, 0.05]  # std 0.05 on each side: spread 0.0707
    runs = {
        "baseline": {
            "absorption_rate": [0.15, 0.16, 0.14],
            "probe_top1": [0.70 + d for d in noisy],
            "explained_variance": [0.60 + d for d in noisy],
        },
        "run1": {
            "absorption_rate": [0.05, 0.06, 0.04],
            "probe_top1": [0.72 + d for d in noisy],  # +0.02: not beyond the spread
            "explained_variance": [0.57 + d for d in noisy],  # -0.03: roughly equal
        },
    }
    claims = ortho.check_claim(ortho_summary(runs))
    assert [claim.holds for claim in claims] == [True, False, True]
    assert claims[1].evidence == "run1: +0.0200 (spread 0.0707)"
    assert claims[2].evidence == "run1: -0.0300 (spread 0.0707)"
    # the same -0.03 with a tight spread is not "roughly equal"
    runs["baseline"]["explained_variance"] = [0.60, 0.61, 0.59]
    runs["run1"]["explained_variance"] = [0.57, 0.58, 0.56]
    assert _verdicts(ortho_summary(runs)) == [True, False, False]


def test_no_verdict_without_a_baseline_or_a_progressive_run():
    assert ortho.check_claim(ortho_summary({"baseline": BASELINE, "static": BASELINE})) == []
    assert ortho.check_claim(ortho_summary({"run1": BASELINE, "static": BASELINE})) == []


def test_ortho_summary_keeps_the_run_order_of_the_study():
    runs = {run: BASELINE for run in ("run3", "static", "baseline", "run1")}
    rows = [{"run": run, "seed": s, "status": "complete"}
            | {m: values[s] for m, values in metrics.items()}
            for run, metrics in runs.items() for s in range(3)]  # fmt: skip
    summary = ortho.summarize(pd.DataFrame(rows), list(BASELINE))
    assert list(summary.index) == ["baseline", "static", "run1", "run3"]
