"""The index page of study runs, built from a fake outputs tree."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from saelib.__main__ import main
from saelib.runs.report import build_index, headline_metrics, relative_link, scan_outputs
from saelib.studies.claims import Claim
from saelib.studies.results import StudyResults

GRID = "topk_grid"
ORTHO = "progressive_orthogonality"
GRID_OK, GRID_RUNNING, GRID_BAD = (
    "20261120-101500-aaaa",
    "20261121-090000-bbbb",
    "20261119-080000-cccc",
)
ORTHO_OK, ORTHO_FAILED = "20261122-120000-dddd", "20261118-230000-eeee"
OTHER_RUN = "20261117-070000-ffff"


def _results(study: str, summary: list[dict], holds: list[bool], **extra) -> str:
    """A run's results.json as the study writes it (StudyResults)."""
    claims = [Claim(f"claim <{i}>", held, "", number=i) for i, held in enumerate(holds, 1)]
    return json.dumps(asdict(StudyResults(study, {}, [], summary, claims, {}, extra)))


def _grid_results() -> str:
    summary = [
        {"k": k, "latent_dim": d, "explained_variance_mean": ev, "death_rate_mean": death}
        for k, d, ev, death in [(5, 512, 0.47, 0.8), (100, 2048, 0.81, 0.1), (20, 1024, 0.65, 0.3)]
    ]
    return _results(GRID, summary, [True, False, True, False], n_train_vectors=5905)


def _ortho_results() -> str:
    values = {"baseline": (0.15, 0.70, 0.60), "static": (0.9, 0.9, 0.9),
              "run1": (0.05, 0.74, 0.59), "run2": (0.07, 0.78, 0.61)}  # fmt: skip
    summary = [
        {"run": run, "absorption_rate_mean": a, "probe_top1_mean": p, "explained_variance_mean": e}
        for run, (a, p, e) in values.items()
    ]
    return _results(ORTHO, summary, [True, False, True])


def _run(root: Path, study: str, run_id: str, params: dict, **files: str) -> Path:
    folder = root / study / run_id
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    grid = {"model": "smollm2-135m", "layer": 26, "k_values": [5, 20, 100]}
    _run(root, GRID, GRID_OK, grid, topk_grid__html="<html>", topk_grid__ipynb="{}",
         results__json=_grid_results())  # fmt: skip
    _run(root, GRID, GRID_RUNNING, grid, topk_grid__ipynb="{}")
    _run(root, GRID, GRID_BAD, grid, topk_grid__html="x", results__json='{"summary": [')
    ortho = {"model": "smollm2-135m", "d_sae": 4096, "runs": ["baseline", "run1", "run2"]}
    notebook = {"progressive_orthogonality__html": "<html>", "progressive_orthogonality__ipynb": ""}
    _run(root, ORTHO, ORTHO_OK, ortho, **notebook, results__json=_ortho_results())
    _run(root, ORTHO, ORTHO_FAILED, ortho, progressive_orthogonality__html="<html>")
    metrics = json.dumps({"score": 0.25, "n": 12, "flag": True, "rows": [1]})
    _run(root, "my study", OTHER_RUN, {"alpha": 0.5}, my_study__html="x", result__json=metrics)
    (root / "screenshots").mkdir()
    (root / "screenshots" / "shot.png").write_bytes(b"png")
    (root / "README.md").write_text("# outputs")
    return root


def _row(page: str, run_id: str) -> str:
    match = re.search(rf"<tr><td><span class=\"run\">{run_id}</span>.*?</tr>", page, re.S)
    assert match, run_id
    return match.group(0)


def test_scan_finds_every_run_with_its_status(outputs):
    runs = scan_outputs(outputs)
    assert list(runs) == ["my study", ORTHO, GRID]  # screenshots/ holds no run folders
    statuses = {run.run_id: run.status for study in runs.values() for run in study}
    assert statuses == {
        GRID_OK: "complete", GRID_RUNNING: "incomplete", GRID_BAD: "error",
        ORTHO_OK: "complete", ORTHO_FAILED: "failed", OTHER_RUN: "complete",
    }  # fmt: skip
    assert [run.run_id for run in runs[GRID]] == [GRID_RUNNING, GRID_OK, GRID_BAD]


def test_index_lists_runs_with_relative_links_and_metrics(outputs):
    page = build_index(outputs).read_text()
    assert (outputs / "index.html").exists()
    ok = _row(page, GRID_OK)
    assert f'href="topk_grid/{GRID_OK}/topk_grid.html"' in ok
    assert f'href="topk_grid/{GRID_OK}/topk_grid.ipynb"' in ok
    assert f'href="topk_grid/{GRID_OK}/results.json">results.json</a>' in ok
    assert "2026-11-20 10:15:00" in ok and "complete" in ok
    assert "0.810 (K=100, latent_dim=2048)" in ok and "40.0%" in ok and "2/4" in ok
    assert "5,905" in ok and "k_values=<b>5,20,100</b>" in ok
    assert "claim &lt;1&gt;" in ok and "claim <1>" not in page
    running = _row(page, GRID_RUNNING)
    assert "incomplete" in running and "topk_grid.html" not in running
    assert "topk_grid.ipynb" in running


def test_malformed_json_shows_an_error_cell(outputs):
    row = _row(build_index(outputs).read_text(), GRID_BAD)
    assert 'class="err"' in row and "malformed results.json" in row and "error" in row


def test_orthogonality_baseline_versus_runs(outputs):
    page = build_index(outputs).read_text()
    ok = _row(page, ORTHO_OK)
    assert "0.150 → 0.060" in ok  # absorption: baseline, mean of run1 and run2 (not static)
    assert "0.700 → 0.760" in ok and "0.600 → 0.600" in ok and "2/3" in ok
    failed = _row(page, ORTHO_FAILED)
    assert "failed" in failed and "results.json" not in failed


def test_unknown_study_shows_top_level_numbers(outputs):
    page = build_index(outputs).read_text()
    row = _row(page, OTHER_RUN)
    assert "0.25" in row and ">12<" in row and "alpha=<b>0.5</b>" in row
    assert 'href="my%20study/' in row and "result.json" in row
    assert "flag" not in page  # booleans are not headline numbers


def test_unexpected_content_is_an_error_not_a_crash(outputs):
    contents = [{"summary": []}, [1, 2], {"summary": [{"k": 5}], "claims": []}]
    for suffix, content in zip(("0001", "0002", "0003"), contents, strict=True):
        files = {"topk_grid__html": "", "results__json": json.dumps(content)}
        _run(outputs, GRID, f"20260101-000000-{suffix}", {}, **files)
    _run(outputs, GRID, "20260101-000000-0004", {}, topk_grid__html="", params__yaml="[a: b")
    page = build_index(outputs).read_text()
    for suffix in ("0001", "0002", "0003"):
        row = _row(page, f"20260101-000000-{suffix}")
        assert "unexpected content in results.json" in row and ">error<" in row
    assert "params.yaml unreadable" in _row(page, "20260101-000000-0004")
    with pytest.raises(TypeError):
        headline_metrics(GRID, {"summary": [{"explained_variance_mean": "high"}]})


def test_index_is_self_contained(outputs):
    page = build_index(outputs).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "http" not in page and "<link" not in page
    assert not list(outputs.glob(".index.html.*"))  # the temporary file is gone


def test_links_are_relative_to_the_page(outputs, tmp_path):
    target = outputs / GRID / GRID_OK / "topk_grid.html"
    assert (
        relative_link(target, tmp_path / "site") == f"../outputs/topk_grid/{GRID_OK}/topk_grid.html"
    )


def test_cli_writes_the_index(outputs, tmp_path, capsys):
    out = tmp_path / "site" / "runs.html"
    assert main(["report", "--outputs", str(outputs), "--out", str(out)]) == 0
    page = out.read_text()
    assert f'href="../outputs/topk_grid/{GRID_OK}/topk_grid.html"' in page
    assert str(out) in capsys.readouterr().out
    assert main(["report", "--outputs", str(tmp_path / "missing")]) == 2


def test_cli_reads_the_outputs_of_the_working_directory(outputs, monkeypatch, capsys):
    monkeypatch.chdir(outputs.parent)
    assert main(["report"]) == 0
    assert f'href="topk_grid/{GRID_OK}/topk_grid.html"' in (outputs / "index.html").read_text()
    assert str(outputs / "index.html") in capsys.readouterr().out


def test_cli_reads_saelib_outputs_when_set(outputs, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as JupyterLab's kernels run in notebooks/ under `make lab`
    monkeypatch.setenv("SAELIB_OUTPUTS", str(outputs))
    assert main(["report"]) == 0
    assert (outputs / "index.html").exists() and not (elsewhere / "outputs").exists()


def _status(folder: Path, **state) -> None:
    (folder / "status.json").write_text(json.dumps({"study": GRID, **state}))


def test_status_comes_from_status_json(tmp_path):
    root, grid = tmp_path / "outputs", {"model": "smollm2-135m"}
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    here = {"status": "running", "host": socket.gethostname()}
    runs = {
        "20260101-000000-0001": {"status": "complete", "finished": "2026-01-01T01:00:00+00:00"},
        "20260101-000000-0002": here | {"pid": os.getpid()},
        "20260101-000000-0003": here | {"pid": finished.pid},  # killed: its process is gone
        "20260101-000000-0004": {"status": "failed", "error_type": "ValueError",
                                 "error": "boom <b>", "stage": "notebook"},
        "20260101-000000-0005": {"status": "interrupted", "reason": "SIGTERM"},
        "20260101-000000-0006": {"status": "failed", "error_type": "OSError",
                                 "error": "[Errno 28] No space left on device", "stage": "html"},
        "20260101-000000-0008": {"status": "failed", "error_type": "KeyError", "error": "'k'",
                                 "stage": "notebook", "html_error": "OSError: disk full"},
    }  # fmt: skip
    for run_id, state in runs.items():
        _status(_run(root, GRID, run_id, grid, topk_grid__ipynb="{}"), **state)
    (root / GRID / "20260101-000000-0001" / "results.json").write_text(_grid_results())
    _run(root, GRID, "20260101-000000-0007", grid, status__json="{truncated")
    page = build_index(root).read_text()
    expected = {
        "0001": ("complete", ""), "0002": ("running", f"pid {os.getpid()} on"),
        "0003": ("interrupted", "its process is gone"),
        "0004": ("failed", "ValueError: boom &lt;b&gt;"), "0005": ("interrupted", "SIGTERM"),
        "0006": ("failed", "rendering the HTML: OSError: [Errno 28] No space left on device"),
        "0007": ("error", "status.json is unreadable"),
        "0008": ("failed", "KeyError: &#x27;k&#x27; (and the HTML render: OSError: disk full)"),
    }  # fmt: skip
    for suffix, (status, detail) in expected.items():
        row = _row(page, f"20260101-000000-{suffix}")
        assert f'<span class="status {status}"' in row and detail in row, row
        assert "topk_grid.html" not in row  # no HTML file, no link, even for a complete run
    assert "0.810 (K=100" in _row(page, "20260101-000000-0001")


def test_a_run_written_before_results_json_shows_its_metrics_file(tmp_path):
    """An older grid run (grid_metrics.json, no results.json, no status.json) reads as complete
    with the top-level numbers of its metrics file, not as an error or a failure."""
    legacy = json.dumps({"n_train_vectors": 5905, "train_seconds": 12.5, "summary": []})
    _run(tmp_path, GRID, GRID_OK, {"layer": 26}, topk_grid__html="x", grid_metrics__json=legacy)
    [run] = scan_outputs(tmp_path)[GRID]
    assert run.status == "complete" and run.metrics_file.name == "grid_metrics.json"
    assert run.metrics["n_train_vectors"].text == "5,905"


def test_status_json_is_never_read_as_metrics(tmp_path):
    folder = _run(tmp_path, "my study", OTHER_RUN, {"alpha": 0.5}, my_study__html="x")
    (folder / "status.json").write_text(json.dumps({"study": "my study", "status": "complete"}))
    [run] = scan_outputs(tmp_path)["my study"]
    assert run.metrics_file is None and run.status == "complete"
