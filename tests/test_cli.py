"""``python -m saelib run`` refuses bad input in one line, exit status 2, before any compute.

Each case runs the real command in a subprocess, in an empty working directory: no traceback
may reach stderr, and no ``outputs/`` folder may appear there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from saelib.studies import STUDIES

GRID_SMOKE = str(STUDIES["topk_grid"].smoke_params)
ORTHO_SMOKE = str(STUDIES["progressive_orthogonality"].smoke_params)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def run_cli(workdir: Path, study: str, *args: str) -> subprocess.CompletedProcess:
    """Run the study from the CLI in ``workdir``; assert that no run folder appeared there."""
    result = subprocess.run(
        [sys.executable, "-m", "saelib", "run", study, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert list(workdir.iterdir()) == [], "a refused run left files behind"
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a refused run (status 2, nothing on stdout)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def test_a_nan_override_is_refused(workdir: Path):
    line = error_line(run_cli(workdir, "topk_grid", "-f", GRID_SMOKE, "-p", "lr", "nan"))
    assert line == f"error: {GRID_SMOKE}: lr='nan' is not a finite number"


def test_malformed_yaml_is_refused_with_file_and_line(workdir: Path, tmp_path: Path):
    path = tmp_path / "grid.yaml"
    path.write_text("lr: 1.0e-3\nepochs: 2\nk_values: [5, 10\nseeds: [0]\n")
    line = error_line(run_cli(workdir, "topk_grid", "-f", str(path)))
    assert line == (
        f"error: {path}:4: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence started on line 3)"
    )


def test_a_malformed_override_is_refused_naming_the_parameter(workdir: Path):
    line = error_line(run_cli(workdir, "topk_grid", "-f", GRID_SMOKE, "-p", "k_values", "[5, 10"))
    assert line.startswith("error: -p k_values: '[5, 10' is not a valid YAML value: ")


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_an_empty_params_file_is_refused(workdir: Path, tmp_path: Path, text: str):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = error_line(run_cli(workdir, "progressive_orthogonality", "-f", str(path)))
    assert line == f"error: {path}: the file holds no parameters (it is empty or only comments)"


def test_a_missing_dataset_file_is_refused(workdir: Path):
    args = ("-f", ORTHO_SMOKE, "-p", "dataset", "./no_such_corpus.jsonl")
    line = error_line(run_cli(workdir, "progressive_orthogonality", *args))
    assert line == "error: dataset: file ./no_such_corpus.jsonl does not exist"


def test_a_latent_size_too_large_for_memory_is_refused(workdir: Path):
    args = ("-f", ORTHO_SMOKE, "-p", "d_sae", str(10**9))
    line = error_line(run_cli(workdir, "progressive_orthogonality", *args))
    pattern = r"error: d_sae=1000000000: training 8 SAE\(s\) on d_in=576 needs about [\d,.]+ GiB"
    assert re.match(pattern, line), line


def test_lab_refuses_a_missing_notebook_folder(workdir: Path):
    result = subprocess.run(
        [sys.executable, "-m", "saelib", "lab", "--notebook-dir", "nowhere"],
        cwd=workdir, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert error_line(result) == "error: --notebook-dir nowhere: no such folder"


@pytest.mark.parametrize("uid", [0, 1000])
def test_lab_serves_localhost_and_allows_root_only_as_root(monkeypatch, uid: int):
    from saelib.runs import lab

    monkeypatch.setattr(lab.os, "geteuid", lambda: uid)
    command = lab.lab_command("notebooks", "--no-browser")
    assert command[1:3] == ["-m", "jupyterlab"] and "--ip=127.0.0.1" in command
    assert ("--allow-root" in command) == (uid == 0)
    assert command[-1] == "--no-browser"


def test_a_process_count_below_one_is_refused(workdir: Path):
    line = error_line(run_cli(workdir, "topk_grid", "-f", GRID_SMOKE, "--processes", "0"))
    assert line == "error: processes must be a whole number >= 1, got 0"


def test_data_parallel_is_refused_for_a_study_whose_losses_keep_batch_statistics(workdir: Path):
    result = run_cli(workdir, "progressive_orthogonality", "-f", ORTHO_SMOKE,
                     "--processes", "2", "--parallel", "data")  # fmt: skip
    line = error_line(result)
    assert line.startswith("error: progressive_orthogonality trains losses that keep statistics")
    assert line.endswith("run it with parallel 'sae'")
