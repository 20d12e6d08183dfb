"""Run a study notebook headlessly: validate params, execute with papermill, render HTML.

Every run gets its own folder ``outputs/<study>/<run-id>/``; an existing run is never
overwritten.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import yaml

from saelib.params import ParamsError, load_yaml, parse_params
from saelib.studies import PROJECT_ROOT, STUDIES, Study

KERNEL_NAME = "saelib"


def outputs_root() -> Path:
    return PROJECT_ROOT / "outputs"


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ParamsError(f"unknown study {name!r}; studies: {sorted(STUDIES)}")
    return STUDIES[name]


def resolve_params(
    study: Study, params_file: str | Path | None = None, overrides: dict[str, Any] | None = None
):
    """The study's params: defaults file (or ``params_file``) plus overrides, validated."""
    path = Path(params_file) if params_file else study.default_params
    raw = load_yaml(path) | (overrides or {})
    return parse_params(study.params_class, raw, source=str(path))


def new_run_dir(study_name: str, root: Path | None = None) -> Path:
    """A fresh, empty run folder named by time and a random suffix."""
    root = root or outputs_root()
    while True:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        folder = root / study_name / run_id
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            continue


def run_study(
    name: str,
    params_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    outputs: Path | None = None,
    progress: bool = True,
) -> Path:
    """Validate, execute the notebook into a new run folder, render HTML; return the folder."""
    import papermill

    study = get_study(name)
    params = resolve_params(study, params_file, overrides)  # errors here, before any compute
    run_dir = new_run_dir(name, outputs)
    values = dataclasses.asdict(params)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    executed = run_dir / f"{name}.ipynb"
    try:
        papermill.execute_notebook(
            str(study.notebook),
            str(executed),
            parameters=values | {"output_dir": str(run_dir)},
            kernel_name=kernel_name(),
            cwd=str(study.notebook.parent),
            progress_bar=progress,
        )
    finally:
        if executed.exists():
            render_html(executed)
    return run_dir


def kernel_name() -> str:
    """The project's registered kernel, or the default one when it is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def render_html(notebook: Path) -> Path:
    """A self-contained HTML page of an executed notebook (figures embedded as data URIs)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target
