"""The SparsAE study: its cells, its params checks, its criteria on synthetic tables, and a smoke
run of its notebook (real text, real training of every method and ablation)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from saelib.params import ParamsError, parse_params
from saelib.runs.runner import read_status, run_study
from saelib.sparse import DistillationLoss, NextTokenLoss, TextConfig, load_text, masked_layers
from saelib.studies import STUDIES
from saelib.studies import sparsae as study

SMALL = {"sparsities": [0.8, 0.9], "ablation_sparsity": 0.8, "seeds": [0, 1]}


def test_cells_cover_methods_sparsities_and_ablations_once():
    cells = study.build_cells(study.SparsAEParams(**SMALL))
    names = [cell.name for cell in cells]
    assert len(names) == len(set(names))
    assert names[:5] == ["dense", "static-s80", "set-s80", "rigl-s80", "sparsae-s80"]
    assert "sparsae-s90" in names and "sparsae-s80-ce_only" in names
    assert len(cells) == 1 + 4 * 2 + 4
    variants = {cell.variant for cell in cells}
    assert "sparsae (no distillation)" in variants and "rigl" in variants


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"methods": ["dense", "gmp"]}, "methods"),
        ({"ablations": ["no_teacher"]}, "ablations"),
        ({"proxy": "ce+entropy"}, "proxy"),
        ({"sparsities": [0.8, 1.0]}, "sparsities"),
        ({"ablation_sparsity": 0.7}, "ablation_sparsity"),
        ({"methods": ["dense", "rigl"]}, "ablations"),
        ({"density_bounds": [0.5, 0.05]}, "density_bounds"),
        ({"proxy_weights": [1.0, 0.01]}, "proxy_weights"),
        ({"d_model": 66, "n_heads": 4}, "d_model"),
        ({"max_tokens": 2048 * 10}, "max_tokens"),
        ({"teacher_beta": 1.5}, "teacher_beta"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_impossible_params_stop_with_one_line_naming_the_parameter(change, named):
    with pytest.raises(ParamsError) as error:
        parse_params(study.SparsAEParams, SMALL | change)
    message = str(error.value)
    assert named in message and "\n" not in message


def test_each_ablation_switches_off_its_part_only():
    params = study.SparsAEParams(**SMALL)
    data = load_text(TextConfig(max_documents=40))
    hooks = {name: study.sparsae_hook(params, study.Cell("sparsae", 0.8, name), data)
             for name in ("", *study.ABLATIONS)}  # fmt: skip
    full = hooks[""]
    assert (full.proxy, full.burn_in_steps, full.reset_probability) == (params.proxy, 5, 0.01)
    assert hooks["ce_only"].proxy == "ce" and hooks["ce_only"].burn_in_steps == 5
    assert hooks["no_burn_in"].burn_in_steps == 0 and hooks["no_burn_in"].proxy == params.proxy
    assert hooks["no_reset"].reset_probability == hooks["no_reset"].stalled_reset_probability == 0
    assert isinstance(study.build_loss(params, study.Cell("sparsae", 0.8)), DistillationLoss)
    plain = study.build_loss(params, study.Cell("sparsae", 0.8, "no_distillation"))
    assert isinstance(plain, NextTokenLoss)


def _summary(rigl: float, sparsae: float, std: float, overhead: float) -> pd.DataFrame:
    rows = []
    for variant, value in (("rigl", rigl), ("sparsae", sparsae)):
        rows.append({"variant": variant, "sparsity": 0.8, "perplexity_mean": value,
                     "perplexity_std": std, "search_overhead_pct_mean": overhead,
                     "search_overhead_pct_std": 0.1, "update_cost_steps_mean": 4.0})  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("sparsae", "holds", "verdict"),
    [(3.00, True, "tie"), (2.50, True, "better"), (3.60, False, "worse")],
)
def test_matching_rigl_counts_a_difference_only_beyond_the_seed_spread(sparsae, holds, verdict):
    summary = _summary(rigl=3.1, sparsae=sparsae, std=0.2, overhead=1.0)
    mine = summary[summary.variant == "sparsae"].set_index("sparsity")
    theirs = summary[summary.variant == "rigl"].set_index("sparsity")
    claim = study.claim_matches_rigl(mine, theirs)
    assert claim.holds is holds and verdict in claim.evidence


@pytest.mark.parametrize(("overhead", "holds"), [(1.0, True), (4.95, False), (12.0, False)])
def test_the_overhead_criterion_needs_mean_plus_std_below_five_percent(overhead, holds):
    summary = _summary(rigl=3.0, sparsae=3.0, std=0.1, overhead=overhead)
    mine = summary[summary.variant == "sparsae"].set_index("sparsity")
    assert study.claim_overhead(mine, study.SparsAEParams(**SMALL)).holds is holds


@pytest.mark.slow
def test_smoke_run_trains_every_method_at_its_density_and_writes_the_study(tmp_path):
    smoke = STUDIES[study.STUDY.name].smoke_params
    run_dir = run_study(study.STUDY.name, smoke, outputs=tmp_path, progress=False)
    assert read_status(run_dir)["status"] == "complete"
    results = json.loads((run_dir / "results.json").read_text())
    params = study.SparsAEParams(**results["params"])
    rows = pd.DataFrame(results["per_seed"])
    assert set(rows.cell) == {cell.name for cell in study.build_cells(params)}
    assert (rows.status == "complete").all()
    sparse = rows[rows.method != "dense"]
    assert ((sparse.density - (1 - sparse.sparsity)).abs() < 1e-3).all()  # exact global density
    assert rows[rows.method == "dense"].density.eq(1.0).all()
    assert rows.perplexity.between(1, 257).all()
    dense_flops = rows[rows.method == "dense"].train_flops.iloc[0]
    assert (sparse.train_flops < dense_flops).all()
    searched = rows[rows.method == "sparsae"]
    assert (searched.search_overhead_pct > 0).all() and (searched.extra_flops > 0).all()
    assert (rows[rows.method != "sparsae"].extra_flops == 0).all()
    assert [claim["number"] for claim in results["claims"]] == [1, 2, 3]
    for figure in ("perplexity", "proxy_vs_validation", "mask_stability", "layer_density"):
        assert (run_dir / "figures" / f"{figure}.png").stat().st_size > 0
    html = (run_dir / "sparsae.html").read_text()
    assert "Criterion 3" in html and "rigl-s80-seed0" in html


def test_structurally_dead_neurons_are_those_without_inputs_or_outputs():
    params = study.SparsAEParams(**SMALL, d_model=16, n_heads=2, d_mlp=8, n_layers=1)
    model = study.build_model(params, study.Cell("dense", 0.0), 257, seed=0)
    layers = masked_layers(model)
    up, down = layers["blocks.0.mlp.up"], layers["blocks.0.mlp.down"]
    up_mask, down_mask = up.mask.clone(), down.mask.clone()
    up_mask[0] = False  # neuron 0: no input
    down_mask[:, 1] = False  # neuron 1: no output
    up.set_mask(up_mask)
    down.set_mask(down_mask)
    structure = study._structure(model)
    assert structure["dead_neurons"] == pytest.approx(2 / 8)
