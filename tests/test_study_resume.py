"""A study run killed in the middle of training resumes and ends with the same metrics as an
uninterrupted run (real papermill, real kernel, real model and data at smoke size)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from saelib.runs.runner import read_status, resume_run
from saelib.studies import STUDIES

pytestmark = pytest.mark.slow

# the smoke params train 100 steps with a checkpoint every 10: a kill lands mid-training
RUN_SCRIPT = textwrap.dedent(
    """
    from pathlib import Path
    from saelib.runs.runner import run_study
    run_study("topk_grid", {params!r}, outputs=Path({outputs!r}), progress=False)
    """
)


def _only_run(outputs: Path) -> Path:
    [run_dir] = (outputs / "topk_grid").iterdir()
    return run_dir


def _per_seed(run_dir: Path) -> list[dict]:
    """Each SAE's validation metrics and step count (training time left out)."""
    rows = json.loads((run_dir / "results.json").read_text())["per_seed"]
    return [{k: v for k, v in row.items() if k != "train_seconds"} for row in rows]


def _checkpoint_steps(outputs: Path) -> list[int]:
    """trained_steps of every complete checkpoint (hidden folders are saves in progress)."""
    steps = []
    for config in outputs.glob("*/checkpoints/[!.]*/config.json"):
        try:
            steps.append(json.loads(config.read_text())["trained_steps"])
        except (OSError, ValueError):  # replaced while we read it
            continue
    return steps


def _kill_after_first_checkpoint(process: subprocess.Popen, outputs: Path) -> None:
    """SIGKILL the runner and its kernel as soon as a checkpoint is on disk."""
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(outputs):
        assert process.poll() is None, "the run ended before it wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    runner = psutil.Process(process.pid)
    family = [runner, *runner.children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may have just ended
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)


def test_a_killed_study_run_resumes_to_the_uninterrupted_metrics(smoke_run, tmp_path):
    reference = smoke_run  # the same smoke params, never interrupted
    outputs = tmp_path / "outputs"
    script = RUN_SCRIPT.format(params=str(STUDIES["topk_grid"].smoke_params), outputs=str(outputs))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    _kill_after_first_checkpoint(process, outputs / "topk_grid")
    run_dir = _only_run(outputs)
    total = _per_seed(reference)[0]["steps"]
    steps_at_kill = _checkpoint_steps(outputs / "topk_grid")
    assert 0 < min(steps_at_kill) < total, steps_at_kill  # killed in the middle of training
    assert not (run_dir / "results.json").exists()
    assert read_status(run_dir)["status"] == "interrupted"  # its pid is dead

    assert resume_run(run_dir, progress=False) == run_dir
    assert read_status(run_dir)["status"] == "complete"
    resumed = _per_seed(run_dir)
    assert [row["steps"] for row in resumed] == [total] * len(resumed)
    for row, expected in zip(resumed, _per_seed(reference), strict=True):
        assert row.pop("status") == expected.pop("status") == "complete"
        assert row == pytest.approx(expected, rel=1e-6), row
    assert _verdicts(run_dir) == _verdicts(reference)


def _verdicts(run_dir: Path) -> list[bool]:
    return [
        claim["holds"] for claim in json.loads((run_dir / "results.json").read_text())["claims"]
    ]
