"""The package as installed from its wheel: the notebooks and params ship inside it, and
``python -m saelib run`` and plain papermill work from any folder, outside a source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from saelib.runs.runner import read_status
from saelib.studies import STUDIES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GRID_FILES = ("topk_grid.ipynb", "topk_grid.html", "params.yaml", "results.json", "status.json")


def _source_copy(target: Path) -> Path:
    """The working tree's files (tracked and not ignored), links kept as links: a clean build
    folder, so nothing stale from an earlier build can slip into the wheel."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if not source.exists() and not source.is_symlink():  # deleted, not yet committed
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name, follow_symlinks=False)
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed (without dependencies) into a folder."""
    root = tmp_path_factory.mktemp("installed")
    source = _source_copy(root / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "wheel"), str(source)], check=True)  # fmt: skip
    [wheel] = (root / "wheel").glob("saelib-*.whl")
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)  # fmt: skip
    return target


def _run(site: Path, cwd: Path, *args: str, timeout: float = 600) -> str:
    """A Python command with the installed package first on the path; its stdout."""
    env = os.environ | {"PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def test_the_wheel_ships_the_notebooks_and_params(site):
    studies = site / "saelib" / "studies"
    for folder in ("notebooks", "params"):
        assert (studies / folder).is_dir() and not (studies / folder).is_symlink()
    for name in STUDIES:
        assert (studies / "notebooks" / f"{name}.ipynb").is_file()
        assert (studies / "params" / f"{name}.yaml").is_file()
        assert (studies / "params" / f"{name}.smoke.yaml").is_file()
        shipped = (studies / "params" / f"{name}.yaml").read_bytes()
        assert shipped == (REPO / "params" / f"{name}.yaml").read_bytes()


def test_the_installed_cli_lists_and_runs_a_study_into_local_outputs(site, workdir):
    where = _run(site, workdir, "-c", "import saelib; print(saelib.__file__)")
    assert Path(where.strip()) == site / "saelib" / "__init__.py"
    listing = _run(site, workdir, "-m", "saelib", "list").splitlines()
    assert sorted(line.split("\t")[0] for line in listing) == sorted(STUDIES)
    for line in listing:
        assert Path(line.split("\t")[2]).is_relative_to(site), line

    smoke = site / "saelib" / "studies" / "params" / "topk_grid.smoke.yaml"
    args = ("-m", "saelib", "run", "topk_grid", "-f", str(smoke), "-p", "epochs", "1")
    _run(site, workdir, *args)
    [run_dir] = (workdir / "outputs" / "topk_grid").iterdir()
    for name in GRID_FILES:
        assert (run_dir / name).is_file(), name
    assert read_status(run_dir)["status"] == "complete"
    executed = json.loads((run_dir / "topk_grid.ipynb").read_text())
    assert Path(executed["metadata"]["papermill"]["input_path"]).is_relative_to(site)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["study"] == "topk_grid" and results["params"]["epochs"] == 1.0
    assert len(results["per_seed"]) == 8 and len(results["claims"]) == 4
    assert sorted(path.name for path in workdir.iterdir()) == ["outputs"]


def test_plain_papermill_runs_a_shipped_notebook_with_a_list_given_as_text(site, workdir):
    studies = site / "saelib" / "studies"
    smoke = yaml.safe_load((studies / "params" / "topk_grid.smoke.yaml").read_text())
    rest = {key: value for key, value in smoke.items() if key not in ("epochs", "k_values")}
    output_dir = workdir / "run"
    args = ("-m", "papermill", str(studies / "notebooks" / "topk_grid.ipynb"), "out.ipynb",
            "-p", "epochs", "1", "-p", "k_values", "[2, 8]", "-y", yaml.safe_dump(rest),
            "-p", "output_dir", str(output_dir), "--no-progress-bar")  # fmt: skip
    _run(site, workdir, *args)
    executed = json.loads((workdir / "out.ipynb").read_text())
    injected = "".join(
        "".join(cell["source"])
        for cell in executed["cells"]
        if "injected-parameters" in cell["metadata"].get("tags", [])
    )
    assert 'k_values = "[2, 8]"' in injected  # papermill passed the list as text
    results = json.loads((output_dir / "results.json").read_text())
    assert results["params"]["k_values"] == [2, 8] and results["params"]["epochs"] == 1.0
    assert results["params"]["latent_dims"] == smoke["latent_dims"]
    assert {row["k"] for row in results["per_seed"]} == {2, 8}
    assert not (workdir / "outputs").exists()
