"""End-to-end checks of what users open: study HTML, the explorer notebook, JupyterLab.

Browser tests drive headless Chromium (Debian's /usr/bin/chromium) with Playwright; all tests
here share one small topk_grid smoke run (``smoke_run``).

Playwright's own browser downloads are never used: the browser is launched from
``CHROMIUM`` (``make browser-deps`` installs it). Every test here skips, with a message saying
so, when that binary is absent. Screenshots go under the test's tmp folder and, when writable,
are copied to ``outputs/screenshots/``; their paths are printed even when pytest captures output.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from saelib.runs.runner import kernel_name, outputs_root, render_html
from saelib.studies.record import NOTEBOOKS_DIR

CHROMIUM = Path(os.environ.get("SAELIB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}
EXPLORER_SAES = ["k2_d32_s0", "k8_d64_s1"]  # checkpoints of the smoke run the notebook loads


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: `make browser-deps` (as root) installs Chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture
def page(browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A fresh page; when the test fails, a screenshot of it is saved and its path printed."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    if request.node.stash.get(FAILED, False):
        path = tmp_path / f"{request.node.name}-failure.png"
        page.screenshot(path=str(path))
        paths = [path, *_copy_to_outputs(path)]
        print(f"\nscreenshot of the failure: {' and '.join(map(str, paths))}")
    context.close()


@pytest.fixture(scope="session")
def explorer_notebook_run(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """notebooks/feature_explorer.ipynb executed by papermill on the smoke run (with its HTML)."""
    import papermill

    notebook = NOTEBOOKS_DIR / "feature_explorer.ipynb"
    executed = tmp_path_factory.mktemp("explorer") / "feature_explorer.ipynb"
    papermill.execute_notebook(
        str(notebook),
        str(executed),
        parameters={"run_dir": str(smoke_run), "sae_names": EXPLORER_SAES},
        kernel_name=kernel_name(),
        cwd=str(notebook.parent),
        progress_bar=False,
    )
    render_html(executed)
    return executed


@pytest.fixture
def save_screenshot(
    page, tmp_path: Path, capsys: pytest.CaptureFixture
) -> Callable[..., list[Path]]:
    """``save_screenshot(name, target=None)``: a PNG of the page (or of the locator ``target``)
    in tmp_path and, when writable, in outputs/screenshots/; returns and prints the paths."""

    def save(name: str, target=None, full_page: bool = True) -> list[Path]:
        path = tmp_path / f"{name}.png"
        if target is not None:
            target.screenshot(path=str(path))
        else:
            page.screenshot(path=str(path), full_page=full_page)
        paths = [path, *_copy_to_outputs(path)]
        with capsys.disabled():
            print(f"\nscreenshot: {' and '.join(str(p) for p in paths)}")
        return paths

    return save


def _copy_to_outputs(path: Path) -> list[Path]:
    target = outputs_root() / "screenshots" / path.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    except OSError:
        return []
    return [target]
