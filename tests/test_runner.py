"""The study notebooks executed by papermill on the real embedded model and data; the runner's
status.json, atomic outputs and resume, on a tiny notebook also executed by papermill."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from papermill.exceptions import PapermillExecutionError

from saelib.__main__ import main
from saelib.activations import HarvestConfig
from saelib.runs import runner
from saelib.runs.report import build_index
from saelib.runs.runner import new_run_dir, read_status, resolve_params, resume_run, run_study
from saelib.saes import load_sae
from saelib.studies import STUDIES, Study
from saelib.studies.record import Headline

pytestmark = pytest.mark.slow


def test_smoke_run_writes_every_output(smoke_run):
    for name in ("topk_grid.ipynb", "topk_grid.html", "params.yaml", "results.json",
                 "figures/heatmaps.png", "figures/pareto_frontier.png",
                 "figures/training_mse.png"):  # fmt: skip
        assert (smoke_run / name).exists(), name
    assert read_status(smoke_run)["status"] == "complete"
    checkpoints = sorted(path.name for path in (smoke_run / "checkpoints").iterdir())
    assert checkpoints == [f"k{k}_d{d}_s{s}" for k in (2, 8) for d in (32, 64) for s in (0, 1)]
    sae = load_sae(smoke_run / "checkpoints" / "k8_d64_s1")
    assert (sae.k, sae.d_sae, sae.d_in) == (8, 64, 576)


def test_checkpoints_record_their_labels_and_the_full_harvest(smoke_run):
    config = json.loads((smoke_run / "checkpoints" / "k8_d64_s1" / "config.json").read_text())
    assert config["labels"] == {"k": 8, "latent_dim": 64, "seed": 1}
    params = resolve_params(STUDIES["topk_grid"], smoke_run / "params.yaml")
    assert config["harvest"] == params.harvest_config().to_dict()
    assert HarvestConfig.from_dict(config["harvest"]) == params.harvest_config()
    assert (config["model"], config["layer"], config["dataset"]) == ("smollm2-135m", 3, "gsm8k")


def test_smoke_results_are_finite_and_claims_judged(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert set(results) == {"study", "params", "per_seed", "summary", "claims", "seconds", "extra"}
    assert results["study"] == "topk_grid"
    assert results["params"] == yaml.safe_load((smoke_run / "params.yaml").read_text())
    assert len(results["per_seed"]) == 8 and len(results["summary"]) == 4
    for row in results["per_seed"]:
        for key in ("explained_variance", "mse", "death_rate", "mean_activation", "max_activation"):
            assert math.isfinite(row[key]), (key, row)
        assert row["l0"] <= row["k"] and row["status"] == "complete"
    assert {(row["k"], row["latent_dim"]) for row in results["summary"]} == {
        (2, 32), (2, 64), (8, 32), (8, 64)
    }  # fmt: skip
    assert all(row["n_seeds"] == 2 for row in results["summary"])
    claims = results["claims"]
    assert [claim["number"] for claim in claims] == [1, 2, 3, 4]
    assert all(isinstance(claim["holds"], bool) and claim["evidence"] for claim in claims)
    assert set(results["seconds"]) == {"harvest", "train"}
    extra = results["extra"]
    assert extra["n_train_vectors"] + extra["n_val_vectors"] == 400
    assert len(extra["pareto"]["configs"]) == 4
    assert set(STUDIES["topk_grid"].headlines(results)) >= {"best EV", "claims held"}


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
        "progressive_orthogonality.html", "results.json", "feature_separation.json",
        "figures/results.png", "figures/separation_over_training.png", "evals/run1_s0.core.json",
        "evals/run1_s0.absorption.json", "evals/run1_s0.sparse_probing.json",
        "checkpoints/static_s1/sae.safetensors",
    ]  # fmt: skip
    for name in expected:
        assert (run_dir / name).exists(), name
    assert read_status(run_dir)["status"] == "complete"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["study"] == study.name
    assert {row["run"] for row in results["per_seed"]} == {"baseline", "static", "run1", "run5"}
    for row in results["per_seed"]:
        for key in ("explained_variance", "kl_div_score", "ce_loss_score", "probe_top1"):
            assert math.isfinite(row[key]), (key, row)
    assert [row["run"] for row in results["summary"]] == ["baseline", "static", "run1", "run5"]
    assert len(results["claims"]) == 3
    assert set(results["seconds"]) == {"harvest", "train", "evals"}
    config = json.loads((run_dir / "checkpoints" / "run5_s1" / "config.json").read_text())
    assert config["labels"] == {"run": "run5", "seed": 1}
    assert config["harvest"]["positions"] == "all"
    separation = json.loads((run_dir / "feature_separation.json").read_text())
    progress_points = [snap["progress"] for snap in separation["snapshots"]["run1_s0"]]
    assert progress_points == [0.25, 0.5, 0.75, 1.0]


# ------------------------------------------------------------------ status, atomicity, resume
# A tiny study (a two-cell notebook, no model) executed by real papermill: it records the
# status.json it sees, counts its attempts, waits ``wait`` seconds (or until a ``release`` file
# appears) and fails on request: ``fail`` = "always", or "first" (the first attempt only).

TINY_CELL = """\
import json, os, pathlib, time
run_dir = pathlib.Path(output_dir)
(run_dir / "cwd.txt").write_text(os.getcwd())
with open(run_dir / "attempts.txt", "a") as file:
    file.write("attempt\\n")
attempt = len((run_dir / "attempts.txt").read_text().split())
(run_dir / "seen_status.json").write_text((run_dir / "status.json").read_text())
deadline = time.time() + wait
while time.time() < deadline and not (run_dir / "release").exists():
    time.sleep(0.05)
if fail == "always" or (fail == "first" and attempt == 1):
    raise ValueError("boom\\nsecond line")
(run_dir / "results.json").write_text(json.dumps({"attempt": attempt}))
"""
KERNELSPEC = {"name": "python3", "language": "python", "display_name": "Python 3"}


@dataclasses.dataclass
class TinyParams:
    wait: float = 0.0
    fail: str = ""


@dataclasses.dataclass(frozen=True)
class TinyStudy(Study):
    folder: Path = Path()

    @property
    def notebook(self) -> Path:
        return self.folder / "tiny.ipynb"

    @property
    def default_params(self) -> Path:
        return self.folder / "tiny.yaml"


def make_tiny_study(folder: Path) -> TinyStudy:
    """Write the tiny study's notebook and default params into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = nbformat.v4.new_code_cell('wait = 0.0\nfail = ""\noutput_dir = None')
    parameters.metadata["tags"] = ["parameters"]
    metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    notebook = nbformat.v4.new_notebook(metadata=metadata)
    notebook.cells = [parameters, nbformat.v4.new_code_cell(TINY_CELL)]
    nbformat.write(notebook, folder / "tiny.ipynb")
    (folder / "tiny.yaml").write_text("wait: 0.0\nfail: ''\n")
    return TinyStudy("tiny", TinyParams, "a tiny study", _tiny_headlines, folder=folder)


def _tiny_headlines(results: dict) -> dict[str, Headline]:
    return {"attempt": Headline(str(results["attempt"]))}


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> TinyStudy:
    study = make_tiny_study(tmp_path / "study")
    monkeypatch.setitem(STUDIES, "tiny", study)
    return study


def _tiny_run(tmp_path: Path, **overrides) -> Path:
    return run_study("tiny", overrides=overrides, outputs=tmp_path / "outputs", progress=False)


def _only_run(tmp_path: Path) -> Path:
    (folder,) = (tmp_path / "outputs" / "tiny").iterdir()
    return folder


def _no_temporaries(folder: Path) -> bool:
    return not list(folder.glob(".*.tmp"))


def _status_file(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def _disk_full_for(monkeypatch, name: str) -> None:
    """Writes of ``name`` stop half-way with ENOSPC, as on a full disk."""
    original = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name.startswith(f".{name}."):  # saelib.io's temporary file for ``name``
            original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_complete_run_status_goes_from_running_to_complete(tiny, tmp_path):
    run_dir = _tiny_run(tmp_path)
    seen = json.loads((run_dir / "seen_status.json").read_text())
    assert seen["status"] == "running" and seen["study"] == "tiny"
    assert (seen["pid"], seen["host"]) == (os.getpid(), socket.gethostname())
    assert seen["started"] == seen["updated"]
    final = read_status(run_dir)
    assert final == _status_file(run_dir)
    assert final["status"] == "complete" and final["finished"]
    assert final["started"] == seen["started"]
    assert "error" not in final
    assert yaml.safe_load((run_dir / "params.yaml").read_text()) == {"wait": 0.0, "fail": ""}
    assert (run_dir / "tiny.html").exists() and _no_temporaries(run_dir)
    executed = nbformat.read(run_dir / "tiny.ipynb", as_version=4)
    assert f'output_dir = "{run_dir}"' in executed.cells[1].source  # the injected parameters


def test_runs_go_to_the_outputs_of_the_working_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = run_study("tiny", progress=False)
    assert run_dir.parent == tmp_path / "outputs" / "tiny"
    assert (run_dir / "cwd.txt").read_text() == str(run_dir)  # the notebook runs in its folder
    assert read_status(run_dir)["status"] == "complete"
    page = build_index(tmp_path / "outputs").read_text()
    assert "<th>attempt</th>" in page and '<td class="num">1</td>' in page  # its headline


def test_the_cli_puts_runs_where_outputs_says(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny", "--outputs", "elsewhere"]) == 0
    [run_dir] = (tmp_path / "elsewhere" / "tiny").iterdir()
    assert f"tiny: outputs in {run_dir}\n" in capsys.readouterr().out  # an absolute path
    assert read_status(run_dir)["status"] == "complete"
    assert not (tmp_path / "outputs").exists()


def test_failed_run_reports_the_first_error(tiny, tmp_path):
    with pytest.raises(PapermillExecutionError) as raised:
        _tiny_run(tmp_path, fail="always")
    assert raised.value.ename == "ValueError"
    run_dir = _only_run(tmp_path)
    assert any(str(run_dir) in note for note in raised.value.__notes__)
    status = read_status(run_dir)
    assert status["status"] == "failed" and status["stage"] == "notebook"
    assert (status["error_type"], status["error"]) == ("ValueError", "boom")  # its first line
    assert "boom" in (run_dir / "tiny.html").read_text()  # rendered up to the failing cell


def test_a_failed_render_after_a_failed_run_keeps_the_original_error(tiny, tmp_path, monkeypatch):
    _disk_full_for(monkeypatch, "tiny.html")
    with pytest.raises(PapermillExecutionError):  # not the render's OSError
        _tiny_run(tmp_path, fail="always")
    run_dir = _only_run(tmp_path)
    assert not (run_dir / "tiny.html").exists() and _no_temporaries(run_dir)
    status = read_status(run_dir)
    assert (status["status"], status["error_type"], status["error"]) == (
        "failed",
        "ValueError",
        "boom",
    )
    assert "No space left on device" in status["html_error"]


def test_a_failed_render_after_the_notebook_fails_the_run(tiny, tmp_path, monkeypatch):
    _disk_full_for(monkeypatch, "tiny.html")
    with pytest.raises(OSError, match="No space left"):
        _tiny_run(tmp_path)
    run_dir = _only_run(tmp_path)
    assert not (run_dir / "tiny.html").exists() and _no_temporaries(run_dir)
    status = read_status(run_dir)
    assert (status["status"], status["stage"], status["error_type"]) == (
        "failed",
        "html",
        "OSError",
    )
    assert (run_dir / "results.json").exists()


def test_params_yaml_is_written_atomically(tiny, tmp_path, monkeypatch):
    _disk_full_for(monkeypatch, "params.yaml")
    with pytest.raises(OSError, match="No space left"):
        _tiny_run(tmp_path)
    run_dir = _only_run(tmp_path)
    assert not (run_dir / "params.yaml").exists() and _no_temporaries(run_dir)
    assert read_status(run_dir)["status"] == "failed"
    assert not (run_dir / "tiny.ipynb").exists()  # stopped before any compute


SIGTERM_SCRIPT = """\
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
from test_runner import make_tiny_study

from saelib.runs import runner
from saelib.__main__ import main
from saelib.studies import STUDIES

STUDIES["tiny"] = make_tiny_study(Path({folder!r}) / "study")
sys.exit(main(["run", "tiny", "-p", "wait", "120"]))
"""


def test_sigterm_interrupts_the_run_and_resume_completes_it(tiny, tmp_path, capsys):
    script = SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    process = subprocess.Popen(  # in tmp_path: its run goes to ./outputs there
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        seen = _wait_for(lambda: list(tmp_path.glob("outputs/tiny/*/seen_status.json")))
        process.send_signal(signal.SIGTERM)  # while the notebook's cell runs
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    run_dir = seen[0].parent
    assert process.returncode == 130
    resume_hint = (
        f"tiny: interrupted (SIGTERM); resume with: python -m saelib run --resume {run_dir}"
    )
    assert stderr.strip().splitlines()[-1] == resume_hint
    status = read_status(run_dir)
    assert (status["status"], status["reason"]) == ("interrupted", "SIGTERM")
    nbformat.read(run_dir / "tiny.ipynb", as_version=4)  # saved whole
    (run_dir / "release").touch()
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert f"tiny: resumed; outputs in {run_dir}" in capsys.readouterr().out
    status = read_status(run_dir)
    assert (status["status"], status["attempts"], status["pid"]) == ("complete", 2, os.getpid())
    assert status["started"] <= status["resumed"]
    assert json.loads((run_dir / "results.json").read_text()) == {"attempt": 2}
    assert [path.name for path in run_dir.parent.iterdir()] == [run_dir.name]


def _wait_for(found, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (result := found()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return result


def test_resume_reexecutes_a_failed_run_in_the_same_folder(tiny, tmp_path):
    with pytest.raises(PapermillExecutionError):
        _tiny_run(tmp_path, fail="first")
    run_dir = _only_run(tmp_path)
    assert read_status(run_dir)["status"] == "failed"
    assert resume_run(run_dir, progress=False) == run_dir
    status = read_status(run_dir)
    assert status["status"] == "complete" and "error" not in status and status["attempts"] == 2
    assert json.loads((run_dir / "results.json").read_text()) == {"attempt": 2}
    assert json.loads((run_dir / "seen_status.json").read_text())["status"] == "running"
    assert (run_dir / "tiny.html").exists() and _no_temporaries(run_dir)
    assert list((tmp_path / "outputs" / "tiny").iterdir()) == [run_dir]


def _fake_run(tmp_path: Path, run_id: str, **state) -> Path:
    folder = tmp_path / "outputs" / "tiny" / run_id
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text("wait: 0.0\nfail: ''\n")
    if state:
        (folder / "status.json").write_text(json.dumps({"study": "tiny", **state}))
    return folder


def _refused(capsys, *argv: str) -> str:
    assert main(["run", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


def test_resume_refuses_a_run_that_is_complete_or_still_running(tiny, tmp_path, capsys):
    here = {"pid": os.getpid(), "host": socket.gethostname()}
    complete = _fake_run(tmp_path, "complete", status="complete")
    live = _fake_run(tmp_path, "live", status="running", **here)
    elsewhere = _fake_run(tmp_path, "elsewhere", status="running", pid=1, host="other-host")
    assert "is complete" in _refused(capsys, "--resume", str(complete))
    assert f"still running (pid {os.getpid()} on" in _refused(capsys, "--resume", str(live))
    assert "still running (pid 1 on other-host)" in _refused(capsys, "--resume", str(elsewhere))
    interrupted = _fake_run(tmp_path, "interrupted", status="interrupted", **here)
    with runner.run_lock(interrupted):  # another process resuming it right now
        assert "in use by another process" in _refused(capsys, "--resume", str(interrupted))
    for folder in (complete, live, elsewhere, interrupted):
        assert sorted(path.name for path in folder.iterdir()) == ["params.yaml", "status.json"]


def test_resume_refuses_a_folder_that_is_not_a_run(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a run folder" in _refused(capsys, "--resume", str(empty))
    assert "no such folder" in _refused(capsys, "--resume", str(tmp_path / "missing"))
    stray = tmp_path / "elsewhere" / "run"
    stray.mkdir(parents=True)
    (stray / "params.yaml").write_text("wait: 0.0\n")
    assert "not a run of a known study" in _refused(capsys, "--resume", str(stray))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "status.json").write_text("{truncated")
    assert "status.json is unreadable" in _refused(capsys, "--resume", str(tmp_path / "bad"))


def test_resume_refuses_params_and_other_studies(tiny, tmp_path, capsys):
    failed = str(_fake_run(tmp_path, "failed", status="failed"))
    assert "-f and -p" in _refused(capsys, "--resume", failed, "-p", "wait", "1")
    assert "-f and -p" in _refused(capsys, "--resume", failed, "-f", str(tiny.default_params))
    assert "a run of tiny, not of topk_grid" in _refused(capsys, "topk_grid", "--resume", failed)
    assert "resumes one run" in _refused(capsys, "all", "--resume", failed)
    assert "--resume RUN_DIR" in _refused(capsys)
    assert read_status(failed)["status"] == "failed"


def test_read_status_shows_a_dead_or_reused_pid_as_interrupted(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    here = {"study": "tiny", "status": "running", "host": socket.gethostname()}
    (tmp_path / "status.json").write_text(json.dumps(here | {"pid": finished.pid}))
    status = read_status(tmp_path)
    assert status["status"] == "interrupted" and "process is gone" in status["reason"]
    (tmp_path / "status.json").write_text(json.dumps(here | {"pid": os.getpid()}))
    assert read_status(tmp_path)["status"] == "running"
    reused = here | {"pid": os.getpid(), "pid_started": 1}  # another process's start time
    (tmp_path / "status.json").write_text(json.dumps(reused))
    assert read_status(tmp_path)["status"] == "interrupted"
    assert read_status(tmp_path / "missing") is None  # a run older than status.json
