"""The frequency-ordering study: its variants, its claim logic on synthetic tables, and a smoke
run of its notebook (real model and data) whose numbers show what the original's runs did."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from saelib.runs.runner import read_status, run_study
from saelib.studies import STUDIES
from saelib.studies import frequency_ordering as study
from saelib.studies.common import drop_norm_outliers
from saelib.training import TrainResult


def test_each_cumulative_run_adds_one_change_to_the_previous():
    runs = list(study.CUMULATIVE.values())
    for before, after in zip(runs, runs[1:], strict=False):
        changed = [f.name for f in dataclasses.fields(after)
                   if getattr(before, f.name) != getattr(after, f.name)]  # fmt: skip
        assert len(changed) == 1, changed
    assert runs[-1].attention and runs[-1].skip and runs[-1].layer_norm and runs[-1].resample


def test_a_configuration_is_trained_once_under_its_first_name():
    assert study.ALIASES["relu_none"] == "run0" and study.ALIASES["relu_published"] == "run2"
    assert len(set(study.VARIANTS.values())) == len(study.VARIANTS)
    assert set(study.ALIASES.values()) == set(study.VARIANTS)


def test_bit_identical_saes_are_grouped_under_the_first():
    def result(name: str, seed: int, nudge: float = 0.0) -> TrainResult:
        sae = study.ReLUSAE(study.ReLUConfig(8, 16), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            sae.b_enc[0] += nudge
        return TrainResult(name, sae, [], steps=0, seconds=0.0, checkpoint=None)

    results = [result("a", 0), result("b", 1), result("c", 0), result("d", 0, nudge=1e-6)]
    assert study.same_weights(results) == {"a": "a", "b": "b", "c": "a", "d": "d"}


def test_norm_outliers_are_left_out():
    vectors = torch.ones(100, 4)
    vectors[7] *= 20  # a "massive activation": 20x the median norm
    kept, n_dropped = drop_norm_outliers(vectors, 10.0)
    assert n_dropped == 1 and len(kept) == 99 and kept.norm(dim=1).max() == 2.0


def _summary(rows: dict[str, dict[str, tuple[float, float]]]) -> pd.DataFrame:
    table = {name: {f"{m}_{stat}": value for m, (mean, std) in metrics.items()
                    for stat, value in (("mean", mean), ("std", std))}
             for name, metrics in rows.items()}  # fmt: skip
    return pd.DataFrame.from_dict(table, orient="index")


def test_claims_on_a_table_where_only_the_soft_penalty_orders():
    same = {"spearman": (0.2, 0.01), "explained_variance": (0.8, 0.01), "l0": (30.0, 1.0),
            "absorption_rate": (0.1, 0.01)}  # fmt: skip
    summary = _summary({
        "run0": same, "run2": same, "run3": same,
        "relu_soft": {"spearman": (-0.5, 0.02), "explained_variance": (0.795, 0.01)},
    })  # fmt: skip
    claims = {claim.number: claim for claim in study.check_claims(summary)}
    assert not claims[1].holds and "+0.0000" in claims[1].evidence  # published: no change
    assert not claims[2].holds  # the ramp changes nothing either
    tiny = {**same, "explained_variance": (0.8 + 1e-7, 0.01)}  # float rounding, not a change
    summary.loc["run3"] = _summary({"run3": tiny}).loc["run3"]
    assert not {c.number: c for c in study.check_claims(summary)}[2].holds
    assert claims[5].holds  # absorption equal for runs 0, 2, 3
    assert claims[6].holds and "-0.7000" in claims[6].evidence
    better = {"spearman": (-0.5, 0.02), "explained_variance": (0.85, 0.01)}  # no cost: a gain
    summary.loc["relu_soft"] = _summary({"relu_soft": better}).loc["relu_soft"]
    assert {c.number: c for c in study.check_claims(summary)}[6].holds


def test_a_soft_penalty_within_the_seed_spread_does_not_count():
    summary = _summary({
        "run0": {"spearman": (0.2, 0.3), "explained_variance": (0.8, 0.01)},
        "relu_soft": {"spearman": (0.1, 0.3), "explained_variance": (0.8, 0.01)},
    })  # fmt: skip
    [claim] = [c for c in study.check_claims(summary) if c.number == 6]
    assert not claim.holds and "spread 0.4243" in claim.evidence


@pytest.mark.slow
def test_smoke_run_shows_the_published_penalty_changes_nothing(tmp_path):
    smoke = STUDIES["frequency_ordering"].smoke_params
    run_dir = run_study("frequency_ordering", smoke, outputs=tmp_path, progress=False)
    assert read_status(run_dir)["status"] == "complete"
    results = json.loads((run_dir / "results.json").read_text())
    rows = pd.DataFrame(results["per_seed"]).set_index(["variant", "seed"])
    metrics = ["explained_variance", "l0", "spearman", "absorption_rate", "tpp_score"]
    for run in ("run2", "run3"):  # no gradient: bit-identical training, identical evals
        twins = rows.loc[run, "same_weights_as"]
        assert list(twins) == [f"run0_s{seed}" for seed in results["params"]["seeds"]]
        pd.testing.assert_frame_equal(
            rows.loc[run, metrics], rows.loc["run0", metrics], check_exact=True
        )
    # the hard re-sort orders latents by frequency on held-out vectors; the baseline does not
    assert (rows.loc["relu_resort", "spearman"] < rows.loc["run0", "spearman"]).all()
    dependence = rows["batch_dependence"]
    assert (dependence.loc["run9"] > 1e-3).all()  # attention mixes the samples of a batch
    # per-sample encoders: only float rounding of batched products (about 1e-9)
    assert (dependence.drop(index="run9", level="variant") < 1e-6).all()
    claims = {claim["number"]: claim for claim in results["claims"]}
    assert claims[1]["holds"] is False and claims[2]["holds"] is False
    figures = (
        "training_loss",
        "cumulative",
        "ordering_methods",
        "feature_frequencies",
        "feature_frequencies_cumulative",
    )
    for figure in figures:
        assert (run_dir / "figures" / f"{figure}.png").stat().st_size > 0
