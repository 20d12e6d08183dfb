"""JupyterLab in headless Chromium: open the explorer notebook, run all cells, use the widget.

The server runs on 127.0.0.1 at a free port with a random token, in a temp copy of notebooks/
whose feature_explorer.ipynb gets papermill's injected parameters (``run_dir`` = the smoke run),
exactly as a headless run would. It is shut down through its REST API when the test ends.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from saelib.runs.lab import lab_command
from saelib.runs.runner import kernel_name
from saelib.studies.record import NOTEBOOKS_DIR

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOK = "feature_explorer.ipynb"
PARAMETERS = {
    "sae_names": ["k8_d32_s0", "k8_d64_s0"],
    "n_cards": 2,
    "example_text": "Tom has 3 apples.",
}

LAB_SETTINGS = {  # no news pop-up; start the notebook's kernel without asking
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True},
}


@dataclass
class Lab:
    url: str
    token: str
    process: subprocess.Popen
    log: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> int:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status


@pytest.fixture
def lab(browser, smoke_run: Path, tmp_path: Path) -> Iterator[Lab]:
    """The server, stopped at teardown (after the page: ``lab`` comes first in the test)."""
    root = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS_DIR, root, ignore=shutil.ignore_patterns(".ipynb_*"))
    _inject_parameters(root / NOTEBOOK, {"run_dir": str(smoke_run), **PARAMETERS})
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            _lab_command(root, port, token),
            cwd=root,
            env=_lab_env(tmp_path),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = Lab(f"http://127.0.0.1:{port}", token, process, log)
    try:
        _wait_until_ready(server)
        yield server
    finally:
        _stop(server)


def test_explorer_runs_in_jupyterlab(lab, page, save_screenshot):
    page.set_default_timeout(60_000)
    page.set_viewport_size({"width": 1400, "height": 1300})
    kernel_dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    page.add_locator_handler(kernel_dialog, lambda: _accept(kernel_dialog))  # if still asked
    page.goto(lab.notebook_url(NOTEBOOK))
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for()
    _wait_kernel_idle(page)
    _run_all_cells(page)

    explorer = page.locator(".saelib-explorer")
    explorer.wait_for(state="visible", timeout=120_000)
    assert page.locator(".jp-OutputArea-output .saelib-card").count() >= 2  # the static cards
    card = explorer.locator(".saelib-explorer-card")
    assert card.get_attribute("data-latent") == "0"

    neighbour = explorer.locator(".saelib-neighbour:visible").first
    target = neighbour.inner_text().strip()
    neighbour.click()
    _expect_card(card, target)

    token_latent = explorer.locator(".saelib-token-latent").first  # from example_text
    target = token_latent.inner_text().split(":")[0].strip()
    token_latent.click()
    _expect_card(card, target)

    explorer.evaluate("element => element.scrollIntoView({block: 'start'})")
    save_screenshot("explorer_jupyterlab", full_page=False)


def _expect_card(card, latent: str) -> None:
    from playwright.sync_api import expect

    expect(card).to_have_attribute("data-latent", latent, timeout=15_000)
    expect(card.locator(".saelib-card-id")).to_have_text(f"Latent {latent}")


def _accept(dialog) -> None:
    dialog.locator("button.jp-mod-accept").click()


def _wait_kernel_idle(page, attempts: int = 3) -> None:
    """Wait for the status bar's "<kernel> | Idle"; reload the page when the kernel connection
    is stuck (JupyterLab can lose a kernel it replaced during start-up)."""
    idle = page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\|\s*Idle"))
    for attempt in range(attempts):
        try:
            idle.first.wait_for(state="visible", timeout=30_000)
            return
        except Exception:  # playwright's TimeoutError
            if attempt == attempts - 1:
                raise
            page.reload()
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for()


def _run_all_cells(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


# ----- the server -----


def _inject_parameters(path: Path, parameters: dict) -> None:
    """Papermill's injected-parameters cell, and the kernel this machine has registered."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = load_notebook_node(str(path))
    name = kernel_name()
    notebook.metadata["kernelspec"]["name"] = name
    notebook = parameterize_notebook(notebook, parameters, kernel_name=name)
    nbformat.write(notebook, path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lab_command(root: Path, port: int, token: str) -> list[str]:
    """``make lab``'s command (as root here, when the tests run as root), with a known port and
    token and no browser of its own."""
    return lab_command(
        root, "--no-browser", f"--port={port}", "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--MultiKernelManager.default_kernel_name={kernel_name()}",
        "--LabApp.news_url=None", "--LabApp.collaborative=False",
    )  # fmt: skip


def _lab_env(tmp_path: Path) -> dict[str, str]:
    """Fresh runtime, settings and workspace folders: no state from a user's own Lab."""
    folders = {
        "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter-runtime",
        "JUPYTERLAB_SETTINGS_DIR": tmp_path / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp_path / "lab-workspaces",
    }
    for folder in folders.values():
        folder.mkdir()
    for plugin, values in LAB_SETTINGS.items():
        path = folders["JUPYTERLAB_SETTINGS_DIR"] / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return os.environ | {key: str(value) for key, value in folders.items()}


def _wait_until_ready(lab: Lab, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited:\n{lab.log.read_text()[-3000:]}")
        try:
            if lab.api("/api/status") == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab not ready in {timeout} s:\n{lab.log.read_text()[-3000:]}")


def _stop(lab: Lab) -> None:
    """Shut the server (and its kernels) down through the API; signal it if that fails."""
    try:
        lab.api("/api/shutdown", method="POST")
        lab.process.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        lab.process.terminate()
        try:
            lab.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lab.process.kill()
            lab.process.wait()
