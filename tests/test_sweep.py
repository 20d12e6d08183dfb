"""``python -m saelib sweep``: every combination checked before anything runs, one real papermill
run per member, a failed member recorded while the others finish, the sweep page, --resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saelib.runs.report import scan_outputs
from saelib.runs.runner import read_status
from saelib.studies import STUDIES

pytestmark = pytest.mark.slow

GRID_SMOKE = str(STUDIES["topk_grid"].smoke_params)


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "saelib", "sweep", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)


def write_problems(path: Path, n: int = 40) -> None:
    """Question/answer records in the dataset file format."""
    lines = []
    for i in range(n):
        question = f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples now?"
        answer = f"He has {i + 3} + {2 * i + 5} = {3 * i + 8} apples in total. #### {3 * i + 8}"
        lines.append(json.dumps({"question": question, "answer": answer}))
    path.write_text("\n".join(lines) + "\n")


def test_a_member_with_bad_values_stops_the_sweep_before_anything_runs(tmp_path):
    result = sweep(tmp_path, "topk_grid", "-f", GRID_SMOKE, "-p", "k_values", "[[2], [999]]")
    assert result.returncode == 2
    assert result.stderr.startswith("error: sweep member k_values=[999]:")
    assert list(tmp_path.iterdir()) == []  # no outputs folder, no sweep folder


def test_sweep_runs_every_member_keeps_going_past_a_failure_and_resumes(tmp_path):
    dataset = tmp_path / "problems.jsonl"
    dataset.write_text("{this line is not JSON\n")  # valid path, fails when the run reads it
    outputs = tmp_path / "outputs"
    values = json.dumps(["gsm8k", str(dataset)])
    result = sweep(
        tmp_path, "topk_grid", "-f", GRID_SMOKE, "-p", "lr", "[1e-3, 3e-3]", "-p", "dataset",
        values, "-p", "epochs", "2", "--jobs", "2", "--outputs", str(outputs),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # a member failed
    [folder] = (outputs / "sweeps").iterdir()
    members = json.loads((folder / "sweep.json").read_text())["members"]
    assert [(m["overrides"]["lr"], m["overrides"]["dataset"]) for m in members] == [
        (1e-3, "gsm8k"), (1e-3, str(dataset)), (3e-3, "gsm8k"), (3e-3, str(dataset)),
    ]  # fmt: skip
    assert [m["status"] for m in members] == ["complete", "failed", "complete", "failed"]
    assert all("JSON" in m["error"] or "Expecting" in m["error"] for m in members[1::2])
    for member in members:  # each member is an ordinary run of the study, with its own values
        run_dir = Path(member["run_dir"])
        assert run_dir.parent == outputs / "topk_grid"
        assert read_status(run_dir)["status"] == member["status"]
        params = (run_dir / "params.yaml").read_text()
        assert f"dataset: {member['overrides']['dataset']}" in params and "epochs: 2" in params
    page = (folder / "sweep.html").read_text()
    assert "2 of 4 members complete" in page and page.count("<tr>") == 5
    assert (folder / "sweep.png").is_file()
    assert set(scan_outputs(outputs)) == {"topk_grid"}  # the index lists runs, not the sweep

    write_problems(dataset)  # mend the data; the failed members resume in their own folders
    resumed = sweep(tmp_path, "--resume", str(folder))
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads((folder / "sweep.json").read_text())["members"]
    assert [m["status"] for m in after] == ["complete"] * 4
    assert [m["run_dir"] for m in after] == [m["run_dir"] for m in members]
    assert "4 of 4 members complete" in (folder / "sweep.html").read_text()
