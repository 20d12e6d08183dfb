"""Parameter sweeps: one ordinary run per combination of values, and a page comparing them.

``python -m saelib sweep <study> -p lr "[1e-3, 3e-4]" -p k "[16, 32]"`` validates every
combination before anything runs, writes ``outputs/sweeps/<study>-<id>/sweep.json`` and runs
each member as a normal run folder ``outputs/<study>/<run-id>/`` (the index page lists them),
each in its own process: one at a time, or ``--jobs N`` at once. Each ``-p`` value is the list of
values to try (a single value is a list of one); a parameter that is itself a list is swept as a
list of lists (``-p k_values "[[5, 10], [20]]"``). A member that fails is recorded as failed and
the others go on. ``sweep --resume <sweep folder>`` continues a sweep: complete members are kept,
failed or interrupted ones are resumed in their own folders (from their checkpoints), the rest
start. After every member the sweep page ``sweep.html`` is rewritten: a row per member (the
swept values, status, links, the study's headline numbers) and a seaborn figure of each headline
number against the first swept parameter.
"""

from __future__ import annotations

import html
import itertools
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from saelib.io import exclusive_lock, write_json, write_text
from saelib.params import ParamsError
from saelib.runs.report import CSS, SWEEPS_FOLDER, read_run, relative_link
from saelib.runs.runner import (
    RunError,
    get_study,
    outputs_root,
    read_status,
    resolve_params,
    resume_run,
    run_study,
)

SWEEP_FILE, PAGE_FILE, FIGURE_FILE = "sweep.json", "sweep.html", "sweep.png"
DONE = "complete"


# ------------------------------------------------------------------------------------ plan


def plan_sweep(
    study_name: str,
    grid: dict[str, Any],
    params_file: str | Path | None = None,
    outputs: Path | None = None,
) -> Path:
    """Validate every combination of ``grid`` and write a new sweep folder; return it."""
    study = get_study(study_name)
    if not grid:
        raise ParamsError("a sweep needs at least one -p NAME VALUES")
    values = {
        name: choices if isinstance(choices, list) else [choices] for name, choices in grid.items()
    }
    for name, choices in values.items():
        if not choices:
            raise ParamsError(f"-p {name}: the list of values to sweep is empty")
    members = [
        dict(zip(values, combination, strict=True))
        for combination in itertools.product(*values.values())
    ]
    for overrides in members:  # every member's params are checked before any runs
        try:
            params = resolve_params(study, params_file, overrides)
        except ParamsError as error:
            raise ParamsError(f"sweep member {describe(overrides)}: {error}") from None
        overrides.update({name: getattr(params, name) for name in overrides})  # as typed
    outputs = (outputs or outputs_root()).absolute()
    folder = _new_sweep_folder(outputs / SWEEPS_FOLDER, study_name)
    state = {
        "study": study_name,
        "params_file": str(Path(params_file).absolute()) if params_file else None,
        "outputs": str(outputs),
        "swept": list(values),
        "members": [_new_member(overrides) for overrides in members],
    }
    write_json(folder / SWEEP_FILE, state)
    write_page(folder)
    return folder


def _new_member(overrides: dict[str, Any]) -> dict[str, Any]:
    return {"overrides": overrides, "run_dir": None, "status": "pending", "error": ""}


def _new_sweep_folder(root: Path, study_name: str) -> Path:
    while True:
        folder = root / f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            continue


def describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{name}={json.dumps(value)}" for name, value in overrides.items())


# ------------------------------------------------------------------------------------- run


def run_sweep(folder: str | Path, jobs: int = 1) -> list[dict[str, Any]]:
    """Run (or continue) every member not yet complete, ``jobs`` at a time, each in its own
    process; return the members with their final status."""
    folder = Path(folder).absolute()
    if jobs < 1:
        raise ParamsError(f"--jobs must be at least 1, got {jobs}")
    state = read_sweep(folder)
    todo = [index for index, member in enumerate(state["members"]) if member["status"] != DONE]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(lambda index: _run_member_process(folder, index), todo):
            pass
    write_page(folder)
    return read_sweep(folder)["members"]


def read_sweep(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise RunError(f"{folder} is not a sweep folder (it has no {SWEEP_FILE})")
    return json.loads(path.read_text())


def _run_member_process(folder: Path, index: int) -> None:
    """One member in a child process (``python -m saelib sweep --member``); record how it ended."""
    command = [sys.executable, "-m", "saelib", "sweep", "--member", str(folder), str(index)]
    finished = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in finished.stderr.splitlines() if line.strip()]

    def record(member: dict[str, Any]) -> None:
        status = read_status(Path(member["run_dir"])) if member["run_dir"] else None
        member["status"] = status["status"] if status else "failed"
        if member["status"] == "running":  # the process is gone: it did not end in order
            member["status"] = "interrupted"
        if member["status"] == DONE:
            member["error"] = ""
        elif status is not None and status.get("error"):
            member["error"] = status["error"]
        else:  # it failed before its run folder said why
            member["error"] = lines[-1] if lines else f"exit status {finished.returncode}"

    _update_member(folder, index, record)
    write_page(folder)


def run_member(folder: str | Path, index: int) -> Path:
    """In the member's process: resume its run folder when it has one, else start a run."""
    folder = Path(folder)
    state = read_sweep(folder)
    member = state["members"][index]
    if member["run_dir"] is not None:
        return resume_run(member["run_dir"], state["study"], progress=False)

    def created(run_dir: Path) -> None:
        _update_member(
            folder, index, lambda member: member.update(run_dir=str(run_dir), status="running")
        )

    return run_study(
        state["study"], state["params_file"], member["overrides"], outputs=Path(state["outputs"]),
        progress=False, on_created=created,
    )  # fmt: skip


def _update_member(folder: Path, index: int, change) -> None:
    with exclusive_lock(folder / ".sweep.lock"):
        state = read_sweep(folder)
        change(state["members"][index])
        write_json(folder / SWEEP_FILE, state)


# ------------------------------------------------------------------------------------ page


_PAGE_LOCK = threading.Lock()  # members finishing at once: one page (and pyplot) at a time


def write_page(folder: Path) -> Path:
    """The sweep page: a table of the members and a figure of their headline numbers."""
    with _PAGE_LOCK:
        state = read_sweep(folder)
        rows = [_member_row(state, member) for member in state["members"]]
        figure = _figure(folder, state["swept"], rows)
        return write_text(folder / PAGE_FILE, _render(folder, state, rows, figure))


def _member_row(state: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
    row = {"overrides": member["overrides"], "status": member["status"], "error": member["error"]}
    row["run"] = read_run(state["study"], Path(member["run_dir"])) if member["run_dir"] else None
    return row


def _headline_number(text: str) -> float | None:
    """The first number of a headline's text ("0.658 ± 0.001" -> 0.658)."""
    found = re.search(r"[-+]?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?", text)
    return float(found.group().replace(",", "")) if found else None


def _figure(folder: Path, swept: list[str], rows: list[dict[str, Any]]) -> Path | None:
    """Each headline number against the first swept parameter (hue: the others), complete
    members only; None when there is nothing to draw."""
    import pandas as pd
    import seaborn as sns
    from matplotlib import pyplot as plt

    from saelib.runs.plots import save_figure

    records = []
    for row in rows:
        if row["status"] != DONE or row["run"] is None:
            continue
        for metric, headline in row["run"].metrics.items():
            number = _headline_number(headline.text)
            if number is not None:
                others = ", ".join(
                    f"{name}={json.dumps(row['overrides'][name])}" for name in swept[1:]
                )
                records.append(
                    {
                        "x": json.dumps(row["overrides"][swept[0]]),
                        "others": others or "-",
                        "metric": metric,
                        "value": number,
                    }
                )
    if not records:
        (folder / FIGURE_FILE).unlink(missing_ok=True)
        return None
    frame = pd.DataFrame(records)
    metrics = list(dict.fromkeys(frame.metric))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        part = frame[frame.metric == metric]
        sns.pointplot(part, x="x", y="value", hue="others", ax=axis, legend=axis is axes[0][-1])
        axis.set(title=metric, xlabel=swept[0], ylabel="")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(
            axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title=", ".join(swept[1:]) or None
        )
    figure.tight_layout()
    path = save_figure(figure, folder, Path(FIGURE_FILE).stem)
    plt.close(figure)
    return path


def _render(
    folder: Path, state: dict[str, Any], rows: list[dict[str, Any]], figure: Path | None
) -> str:
    metric_names = list(
        dict.fromkeys(name for row in rows if row["run"] for name in row["run"].metrics)
    )
    head = "".join(
        f"<th>{html.escape(name)}</th>"
        for name in ["#", *state["swept"], "status", "run", *metric_names]
    )
    body = []
    for number, row in enumerate(rows):
        cells = [str(number)] + [
            html.escape(json.dumps(row["overrides"][name])) for name in state["swept"]
        ]
        status = html.escape(row["status"]) + (
            f"<br><small>{html.escape(row['error'])}</small>" if row["error"] else ""
        )
        cells.append(status)
        cells.append(_run_link(folder, row["run"]))
        metrics = row["run"].metrics if row["run"] else {}
        cells += [
            html.escape(metrics[name].text) if name in metrics else "" for name in metric_names
        ]
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    done = sum(row["status"] == DONE for row in rows)
    image = (
        f'<p><img src="{FIGURE_FILE}" alt="headline numbers" style="max-width:100%"></p>'
        if figure
        else ""
    )
    study = html.escape(state["study"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>sweep of {study}</title>"
        f"<style>{' '.join(CSS.split())}</style></head><body><h1>Sweep of {study}</h1>"
        f"<p class='sub'>{done} of {len(rows)} members complete; {html.escape(folder.name)}</p>"
        f"{image}<table><tr>{head}</tr>{''.join(body)}</table></body></html>"
    )  # fmt: skip


def _run_link(folder: Path, run) -> str:
    if run is None:
        return ""
    link = html.escape(relative_link(run.html or run.folder, folder))
    return f"<a class='run' href='{link}'>{html.escape(run.run_id)}</a>"
