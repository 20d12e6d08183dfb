"""Study records: each study's files exist, its defaults are one set (the dataclass's, which the
YAML file and the notebook's parameters cell must repeat exactly), its results file reads back
into headline numbers, and no other part of the library names it."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

import saelib
from saelib.params import load_yaml
from saelib.runs.runner import resolve_params
from saelib.studies import STUDIES, Study
from saelib.studies import progressive_orthogonality as ortho
from saelib.studies import topk_grid as grid
from saelib.studies.common import SplitData
from saelib.studies.record import NOTEBOOKS_DIR, PARAMS_DIR, RESULTS_FILE, Headline
from saelib.studies.results import StudyResults

STUDY_PARAMS = list(STUDIES.values())


def _ids(study: Study) -> str:
    return study.name


def test_studies_are_found_by_their_module():
    assert {"topk_grid", "progressive_orthogonality"} <= set(STUDIES)
    for name, study in STUDIES.items():
        assert study.name == name
        assert importlib.import_module(f"saelib.studies.{name}").STUDY is study


@pytest.mark.parametrize("study", STUDY_PARAMS, ids=_ids)
def test_a_study_has_its_notebook_and_params_files(study):
    for path in (study.notebook, study.default_params, study.smoke_params):
        assert path.is_file(), path
    assert study.notebook.parent == NOTEBOOKS_DIR and study.default_params.parent == PARAMS_DIR
    fields = {field.name for field in dataclasses.fields(study.params_class)}
    assert set(study.key_params) <= fields
    assert study.description


def _parameters_cell(notebook: Path) -> dict:
    """The assignments of the cell tagged "parameters", their values read as literals."""
    cells = nbformat.read(notebook, as_version=4).cells
    [cell] = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        [target] = node.targets
        assert isinstance(target, ast.Name), ast.unparse(node)
        assert target.id not in values, f"{target.id} is assigned twice"
        values[target.id] = ast.literal_eval(node.value)
    return values


def _same(a, b) -> bool:
    """Equal values of the same type; an integer stands for an equal float (YAML's ``25``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("study", STUDY_PARAMS, ids=_ids)
def test_defaults_agree_in_yaml_dataclass_and_notebook(study):
    defaults = dataclasses.asdict(study.params_class())
    yaml_values = load_yaml(study.default_params)
    notebook = _parameters_cell(study.notebook)
    assert notebook.pop("output_dir") is None
    assert set(yaml_values) == set(defaults), "YAML keys differ from the dataclass fields"
    assert set(notebook) == set(defaults), "notebook parameters differ from the dataclass fields"
    assert list(notebook) == list(defaults), "notebook parameters in another order"
    for name, default in defaults.items():
        assert _same(yaml_values[name], default), (name, yaml_values[name], default)
        assert _same(notebook[name], default), (name, notebook[name], default)


@pytest.mark.parametrize("study", STUDY_PARAMS, ids=_ids)
def test_the_notebook_builds_its_params_from_the_parameters_cell(study):
    namespace = _parameters_cell(study.notebook) | load_yaml(study.smoke_params)
    params = study.params_from(namespace)
    assert params == resolve_params(study, study.smoke_params)


@pytest.mark.parametrize("study", STUDY_PARAMS, ids=_ids)
def test_smoke_params_are_valid_and_small(study):
    params = resolve_params(study, study.smoke_params)
    defaults = study.params_class()
    assert params.max_tokens < defaults.max_tokens and params.device == "cpu"


# ------------------------------------------------------------------ results and headlines


def _split(n_train: int, n_val: int) -> SplitData:
    return SplitData(None, torch.zeros(n_train, 4), torch.zeros(n_val, 4))


def _grid_per_seed() -> pd.DataFrame:
    ev = {(2, 32): 0.50, (2, 64): 0.52, (8, 32): 0.70, (8, 64): 0.74}
    death = {(2, 32): 0.4, (2, 64): 0.6, (8, 32): 0.1, (8, 64): 0.3}
    rows = []
    for (k, latent_dim), value in ev.items():
        for seed, offset in ((0, -0.01), (1, 0.01)):
            metrics = dict.fromkeys(grid.METRIC_COLUMNS, 1.0) | {
                "explained_variance": value + offset,
                "death_rate": death[(k, latent_dim)],
                "mean_activation": 10.0 / k,
                "max_activation": 40.0 / k,
                "l0": float(k),
            }
            labels = {"k": k, "latent_dim": latent_dim, "seed": seed}
            rows.append(labels | metrics | {"steps": 10, "status": "complete"})
    return pd.DataFrame(rows)


def test_topk_grid_results_are_written_read_back_and_headlined(tmp_path):
    params = grid.TopKGridParams(k_values=[2, 8], latent_dims=[32, 64], seeds=[0, 1])
    per_seed = _grid_per_seed()
    summary = grid.summarize(per_seed)
    seconds = {"harvest": 1.5, "train": 20.0}
    written = grid.write_results(tmp_path, params, _split(30, 10), per_seed, summary, seconds)
    data = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert set(data) == {"study", "params", "per_seed", "summary", "claims", "seconds", "extra"}
    assert data["study"] == "topk_grid" and data["params"]["k_values"] == [2, 8]
    assert len(data["per_seed"]) == 8 and len(data["summary"]) == 4
    assert data["summary"][0]["reported_ev"] is None  # K=2 is not in the report: null
    assert [claim["number"] for claim in data["claims"]] == [1, 2, 3, 4]
    assert set(data["claims"][0]) == {"statement", "holds", "evidence", "number"}
    assert data["seconds"] == seconds
    extra = data["extra"]
    assert (extra["n_train_vectors"], extra["n_val_vectors"]) == (30, 10)
    optimal = extra["pareto"]["optimal_ev_vs_k_and_latent_dim"]
    assert optimal == [{"k": k, "latent_dim": d} for k, d in [(2, 32), (2, 64), (8, 32), (8, 64)]]
    loaded = StudyResults.load(tmp_path / RESULTS_FILE)
    assert loaded.claims == written.claims and loaded.summary == data["summary"]
    assert list(loaded.claims_table().columns) == ["statement", "holds", "evidence", "number"]

    headlines = grid.headlines(data)
    assert all(isinstance(value, Headline) for value in headlines.values())
    assert headlines["best EV"].text == "0.740 (K=8, latent_dim=64)"
    assert headlines["mean death rate"].text == "35.0%"
    held = sum(claim.holds for claim in written.claims)
    assert headlines["claims held"].text == f"{held}/4"
    assert headlines["train vectors"].text == "30"
    assert headlines == grid.STUDY.headlines(data)


def _ortho_per_seed() -> pd.DataFrame:
    values = {"baseline": (0.15, 0.70, 0.60), "static": (0.9, 0.9, 0.9),
              "run1": (0.05, 0.74, 0.595), "run5": (0.07, 0.78, 0.605)}  # fmt: skip
    rows = []
    for run, (absorption, probe, ev) in values.items():
        for seed in (0, 1):
            metrics = dict.fromkeys([*ortho.EVAL_COLUMNS, "probe_residual"], 0.5) | {
                "absorption_rate": absorption,
                "probe_top1": probe,
                "explained_variance": ev,
            }
            rows.append({"run": run, "seed": seed} | metrics | {"status": "complete"})
    return pd.DataFrame(rows)


def test_progressive_orthogonality_results_are_written_read_back_and_headlined(tmp_path):
    params = ortho.ProgressiveOrthoParams(runs=["baseline", "static", "run1", "run5"])
    per_seed = _ortho_per_seed()
    summary = ortho.summarize(per_seed, [*ortho.EVAL_COLUMNS, "probe_residual"])
    seconds = {"harvest": 1.0, "train": 2.0, "evals": 3.0}
    split = _split(90, 10)
    written = ortho.write_results(tmp_path, params, split, per_seed, summary, seconds, 12)
    data = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert data["study"] == "progressive_orthogonality" and data["params"]["runs"][2] == "run1"
    assert [row["run"] for row in data["summary"]] == ["baseline", "static", "run1", "run5"]
    assert data["extra"] == {"n_train_vectors": 90, "n_val_vectors": 10, "total_steps": 12}
    # one value per seed: no spread, so every difference clears it
    assert [claim["holds"] for claim in data["claims"]] == [True, True, True]
    assert data["claims"][0]["evidence"] == (
        "run1: -0.1000 (spread 0.0000); run5: -0.0800 (spread 0.0000)"
    )
    assert StudyResults.load(tmp_path / RESULTS_FILE).claims == written.claims

    headlines = ortho.headlines(data)
    assert headlines["absorption (baseline → runs)"].text == "0.150 → 0.060"  # not static
    assert headlines["probe top-1 (baseline → runs)"].text == "0.700 → 0.760"
    assert headlines["EV (baseline → runs)"].text == "0.600 → 0.600"
    assert headlines["claim parts held"].text == "3/3"
    assert "✓" in headlines["claim parts held"].tooltip


def test_headlines_without_a_baseline_or_claims_still_read():
    summary = [{"run": "run1", "absorption_rate_mean": 0.1, "probe_top1_mean": 0.7,
                "explained_variance_mean": 0.6}]  # fmt: skip
    headlines = ortho.headlines({"summary": summary, "claims": []})
    assert headlines["absorption (baseline → runs)"].text == "– → 0.100"
    assert headlines["claim parts held"].text == "not judged"


def test_headlines_raise_on_unexpected_content():
    with pytest.raises(TypeError):
        grid.headlines({"summary": [{"explained_variance_mean": "high"}], "claims": []})
    with pytest.raises(KeyError):
        grid.headlines({"summary": [{"k": 5}], "claims": []})


# ------------------------------------------------------------- no study named elsewhere


def _library_sources() -> list[Path]:
    """Every file of the package, the links to the notebooks and params folders not followed."""
    root = Path(saelib.__file__).resolve().parent
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        found += [Path(folder) / name for name in files if not name.endswith((".pyc", ".pyo"))]
    return [path for path in found if not path.is_symlink()]


@pytest.mark.parametrize("study", STUDY_PARAMS, ids=_ids)
def test_no_study_is_named_outside_its_own_module(study):
    own = Path(importlib.import_module(f"saelib.studies.{study.name}").__file__).resolve()
    sources = _library_sources()
    assert own in sources
    mentions = [
        f"{path.relative_to(own.parents[2])}:{number}"
        for path in sources
        if path != own
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if study.name in line
    ]
    assert not mentions, f"{study.name} is named in {mentions}"
