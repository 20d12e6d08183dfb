"""The grid notebook executed by papermill on the real embedded model and data."""

from __future__ import annotations

import json
import math

import nbformat
import pytest

from saelib.runner import new_run_dir, run_study
from saelib.saes import load_sae
from saelib.studies import STUDIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    run_dir = run_study(
        "topk_grid", STUDIES["topk_grid"].smoke_params, outputs=outputs, progress=False
    )
    return run_dir


def test_smoke_run_writes_every_output(smoke_run):
    for name in ("topk_grid.ipynb", "topk_grid.html", "params.yaml", "grid_metrics.json",
                 "pareto_optimal_configs.json", "figures/heatmaps.png",
                 "figures/pareto_frontier.png"):  # fmt: skip
        assert (smoke_run / name).exists(), name
    checkpoints = sorted(path.name for path in (smoke_run / "checkpoints").iterdir())
    assert checkpoints == [f"k{k}_d{d}_s{s}" for k in (2, 8) for d in (32, 64) for s in (0, 1)]
    sae = load_sae(smoke_run / "checkpoints" / "k8_d64_s1")
    assert (sae.k, sae.d_sae, sae.d_in) == (8, 64, 576)


def test_smoke_metrics_are_finite_and_claims_judged(smoke_run):
    metrics = json.loads((smoke_run / "grid_metrics.json").read_text())
    assert len(metrics["per_seed"]) == 8 and len(metrics["summary"]) == 4
    for row in metrics["per_seed"]:
        for key in ("explained_variance", "mse", "death_rate", "mean_activation", "max_activation"):
            assert math.isfinite(row[key]), (key, row)
        assert row["l0"] <= row["k"]
    assert [claim["number"] for claim in metrics["claims"]] == [1, 2, 3, 4]
    assert metrics["n_train_vectors"] + metrics["n_val_vectors"] == 400


def test_executed_notebook_and_html_carry_the_results(smoke_run):
    notebook = nbformat.read(smoke_run / "topk_grid.ipynb", as_version=4)
    injected = [
        cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", [])
    ]
    assert injected and "latent_dims = [32, 64]" in injected[0].source
    html = (smoke_run / "topk_grid.html").read_text()
    assert "data:image/png;base64" in html, "figures must be embedded in the HTML"
    assert "Claim 4" in html


def test_runs_never_overwrite_each_other(tmp_path):
    first, second = new_run_dir("topk_grid", tmp_path), new_run_dir("topk_grid", tmp_path)
    assert first != second and first.exists() and second.exists()


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    for study in STUDIES.values():
        notebook = nbformat.read(study.notebook, as_version=4)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs for cell in code_cells), study.notebook
        tagged = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, study.notebook


def test_progressive_orthogonality_smoke_run(tmp_path):
    study = STUDIES["progressive_orthogonality"]
    run_dir = run_study(study.name, study.smoke_params, outputs=tmp_path, progress=False)
    expected = [
        "progressive_orthogonality.html", "ortho_metrics.json", "feature_separation.json",
        "figures/results.png", "figures/separation_over_training.png", "evals/run1_s0.core.json",
        "evals/run1_s0.absorption.json", "evals/run1_s0.sparse_probing.json",
        "checkpoints/static_s1/sae.safetensors",
    ]  # fmt: skip
    for name in expected:
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "ortho_metrics.json").read_text())
    assert {row["run"] for row in metrics["per_seed"]} == {"baseline", "static", "run1", "run5"}
    for row in metrics["per_seed"]:
        for key in ("explained_variance", "kl_div_score", "ce_loss_score", "probe_top1"):
            assert math.isfinite(row[key]), (key, row)
    assert len(metrics["claim"]) == 3
    separation = json.loads((run_dir / "feature_separation.json").read_text())
    progress_points = [snap["progress"] for snap in separation["snapshots"]["run1_s0"]]
    assert progress_points == [0.25, 0.5, 0.75, 1.0]
