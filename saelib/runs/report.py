"""An index page of every study run in ``outputs/``: ``python -m saelib report``.

Per study, a table of its runs (newest first): the run id and start time, its status, relative
links to the files that exist (HTML render, executed notebook, params, results), a few key
params and headline numbers read from the run's results.json (the study's record says which; a
run written before results.json shows the first numbers of its metrics JSON). The status comes
from the run's ``status.json`` (running, complete, failed with its error, interrupted; a running
run whose process is gone reads as interrupted); a run folder older than status.json is judged
by its files: incomplete without its HTML render, failed without its results. A malformed file
shows as an error cell, never as a crash. The page is self-contained (inline CSS, no scripts)
and written atomically.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from saelib.io import write_text
from saelib.runs.runner import REPORT_SUFFIX, STATUS_FILE, RunError, read_status
from saelib.studies.record import RESULTS_FILE, Headline, Study

SWEEPS_FOLDER = "sweeps"  # outputs/sweeps/<study>-<id>/: see saelib.runs.sweep
N_GENERIC = 6  # params / numbers shown for a study this module does not know
STATUS_NOTES = {
    "running": "the run's process is alive",
    "complete": "notebook executed, results written",
    "interrupted": "stopped before the end; resume with python -m saelib run --resume <folder>",
    "incomplete": "no HTML render yet: the run is still going or was interrupted",
    "failed": "the run stopped with an error (a run without status.json: before its results)",
    "error": "a status, metrics or params file could not be read",
}


@dataclass
class RunInfo:
    study: str
    folder: Path
    html: Path | None = None
    report: Path | None = None  # the render for reading: code hidden
    notebook: Path | None = None
    params_file: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics_file: Path | None = None
    metrics: dict[str, Headline] = field(default_factory=dict)
    params_error: str | None = None
    metrics_error: str | None = None
    state: dict[str, Any] | None = None  # status.json; None for a run older than it
    status_error: str | None = None

    @property
    def run_id(self) -> str:
        return self.folder.name

    @property
    def started(self) -> str:
        return run_time(self.folder)

    @property
    def status(self) -> str:
        if self.status_error:
            return "error"
        if self.state is not None and self.state["status"] != "complete":
            return self.state["status"]
        if self.params_error or self.metrics_error:
            return "error"
        if self.state is not None:
            return "complete"
        if self.html is None:  # a run older than status.json: judged by its files
            return "incomplete"
        return "complete" if self.metrics_file is not None else "failed"

    @property
    def status_detail(self) -> str:
        """What the status holds beyond its name: the error, the interruption, the process."""
        state = self.state or {}
        if self.status_error:
            return self.status_error
        if self.status == "failed" and state.get("error_type"):
            error = ": ".join(
                str(text) for text in (state["error_type"], state.get("error")) if text
            )
            if state.get("stage") == "html":
                return f"rendering the HTML: {error}"
            if state.get("html_error"):
                return f"{error} (and the HTML render: {state['html_error']})"
            return error
        if self.status == "interrupted":
            return str(state.get("reason", ""))
        if self.status == "running":
            return f"pid {state.get('pid')} on {state.get('host')}"
        return ""


# -------------------------------------------------------------------------------------- scan


def scan_outputs(outputs: Path) -> dict[str, list[RunInfo]]:
    """Every run folder ``outputs/<study>/<run-id>/``, by study, newest run first.

    A folder of ``outputs`` without subfolders (e.g. of screenshots) is not a study.
    """
    outputs = Path(outputs)
    if not outputs.is_dir():
        raise FileNotFoundError(f"no outputs folder {outputs}")
    studies = {
        study.name: _subfolders(study, newest_first=True)
        for study in _subfolders(outputs)
        if study.name != SWEEPS_FOLDER  # sweep pages, listed apart
    }
    return {
        study: [read_run(study, folder) for folder in folders]
        for study, folders in studies.items()
        if folders
    }


def _subfolders(folder: Path, newest_first: bool = False) -> list[Path]:
    found = [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")]
    return sorted(found, key=lambda path: path.name, reverse=newest_first)


def read_run(study: str, folder: Path) -> RunInfo:
    """What one run folder holds; unreadable files become error messages, never exceptions."""
    run = RunInfo(study, folder)
    try:
        run.state = read_status(folder)
    except RunError as error:
        run.status_error = str(error)
    run.html = _existing(folder / f"{study}.html") or _first(folder, "*.html")
    run.report = _existing(folder / f"{study}{REPORT_SUFFIX}")
    run.notebook = _existing(folder / f"{study}.ipynb") or _first(folder, "*.ipynb")
    run.params_file = _existing(folder / "params.yaml")
    if run.params_file is not None:
        _read_params(run)
    run.metrics_file = _metrics_file(folder)
    if run.metrics_file is not None:
        _read_metrics(run)
    return run


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _first(folder: Path, pattern: str) -> Path | None:
    return next(iter(sorted(folder.glob(pattern))), None)


def _metrics_file(folder: Path) -> Path | None:
    """The run's results.json; for a run written before it (or by another tool), its JSON file
    with "metrics" in the name, else its first JSON file (never status.json)."""
    results = _existing(folder / RESULTS_FILE)
    if results is not None:
        return results
    candidates = [path for path in folder.glob("*.json") if path.name != STATUS_FILE]
    candidates.sort(key=lambda path: ("metrics" not in path.name, path))
    return candidates[0] if candidates else None


def _read_params(run: RunInfo) -> None:
    try:
        params = yaml.safe_load(run.params_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        run.params_error = f"params.yaml unreadable: {_first_line(error)}"
        return
    if not isinstance(params, dict):
        run.params_error = "params.yaml is not a mapping"
        return
    run.params = params


def _read_metrics(run: RunInfo) -> None:
    name = run.metrics_file.name
    try:
        data = json.loads(run.metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        run.metrics_error = f"malformed {name}: {_first_line(error)}"
        return
    try:
        run.metrics = headline_metrics(run.study, data, from_results=name == RESULTS_FILE)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        run.metrics_error = f"unexpected content in {name}: {type(error).__name__} {error}"


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def run_time(folder: Path) -> str:
    """The start time in a run id (``%Y%m%d-%H%M%S-xxxx``), else the folder's change time."""
    try:
        started = datetime.strptime(folder.name[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        started = datetime.fromtimestamp(folder.stat().st_mtime)
    return started.strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------------- metrics


def headline_metrics(study: str, data: Any, from_results: bool = True) -> dict[str, Headline]:
    """A few headline numbers from a run's JSON (raises on unexpected content): the study's own
    headlines from its results.json, the first numbers found in any other JSON."""
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, found {type(data).__name__}")
    record = _record(study) if from_results else None
    return record.headlines(data) if record is not None else _generic_metrics(data)


def _record(study: str) -> Study | None:
    from saelib.studies import STUDIES  # the study modules import torch: only when needed

    return STUDIES.get(study)


def _generic_metrics(data: dict) -> dict[str, Headline]:
    numbers = {
        key: value
        for key, value in data.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    if not numbers:
        return {"keys": Headline(", ".join(list(data)[:N_GENERIC]) or "(empty)")}
    return {
        key: Headline(_format_number(value)) for key, value in list(numbers.items())[:N_GENERIC]
    }


def _format_number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


# ------------------------------------------------------------------------------------ render


def build_index(outputs: Path, out: Path | None = None) -> Path:
    """Scan ``outputs`` and write the index page (default ``outputs/index.html``) atomically."""
    outputs = Path(outputs)
    out = Path(out) if out is not None else outputs / "index.html"
    page = render_index(scan_outputs(outputs), out.parent)
    write_text(out, page)
    return out


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;
 margin:24px;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px}
.sub{color:#57606a;margin:0 0 12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f6f8fa;font-weight:600}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.run{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:nowrap}
.time{color:#57606a;white-space:nowrap}
.status{font-weight:600;white-space:nowrap}
.complete{color:#116329}.incomplete,.interrupted{color:#9a6700}.failed,.error{color:#b42318}
.running{color:#0969da}
.why{display:block;font-weight:400;white-space:normal;color:#57606a;font-size:12px}
td.err{background:#fff1f0;color:#b42318}
.params{font-size:12px;color:#57606a}
.params b{color:#1f2328;font-weight:600}
a{color:#0969da;text-decoration:none}
a:hover{text-decoration:underline}
[title]{cursor:help}
a[title]{cursor:pointer}
"""


def render_index(runs_by_study: dict[str, list[RunInfo]], base: Path) -> str:
    """The whole page; links are relative to ``base`` (the folder the page is written to)."""
    n_runs = sum(len(runs) for runs in runs_by_study.values())
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    sections = [_study_section(study, runs, base) for study, runs in runs_by_study.items()]
    body = (
        "".join(sections) or "<p>No runs yet: <code>python -m saelib run &lt;study&gt;</code></p>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>saelib study runs</title><style>{' '.join(CSS.split())}</style></head><body>"
        f'<h1>saelib study runs</h1><p class="sub">{n_runs} run(s) in '
        f"{len(runs_by_study)} stud{'y' if len(runs_by_study) == 1 else 'ies'}; "
        f"generated {generated}</p>{body}</body></html>\n"
    )


def _study_section(study: str, runs: list[RunInfo], base: Path) -> str:
    columns = _metric_columns(runs)
    head = "".join(
        f"<th>{html.escape(name)}</th>"
        for name in ["Run", "Status", "Files", "Key params", *columns]
    )
    rows = "".join(_run_row(run, columns, base) for run in runs)
    counts = _status_counts(runs)
    return (
        f'<h2 id="{html.escape(study)}">{html.escape(study)}</h2>'
        f'<p class="sub">{counts}</p><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def _metric_columns(runs: list[RunInfo]) -> list[str]:
    columns: dict[str, None] = {}
    for run in runs:
        columns.update(dict.fromkeys(run.metrics))
    return list(columns) or ["Metrics"]


def _status_counts(runs: list[RunInfo]) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return f"{len(runs)} run(s): " + ", ".join(f"{n} {status}" for status, n in counts.items())


def _run_row(run: RunInfo, columns: list[str], base: Path) -> str:
    cells = [
        f'<td><span class="run">{html.escape(run.run_id)}</span><br>'
        f'<span class="time">{html.escape(run.started)}</span></td>',
        _status_cell(run),
        f"<td>{_links(run, base)}</td>",
        _params_cell(run),
        _metric_cells(run, columns),
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _status_cell(run: RunInfo) -> str:
    status = run.status
    note = html.escape(_status_note(run))
    detail = html.escape(run.status_detail)
    why = f'<span class="why">{detail}</span>' if detail else ""
    return f'<td><span class="status {status}" title="{note}">{status}</span>{why}</td>'


def _status_note(run: RunInfo) -> str:
    note = STATUS_NOTES[run.status]
    if run.state is None:
        return note
    times = [f"{key} {run.state[key]}" for key in ("started", "resumed", "updated", "finished")
             if run.state.get(key)]  # fmt: skip
    return "\n".join([note, *times])


def _links(run: RunInfo, base: Path) -> str:
    targets = [("report", run.report), ("HTML", run.html), ("notebook", run.notebook),
               ("params", run.params_file),
               (run.metrics_file.name if run.metrics_file else "", run.metrics_file)]  # fmt: skip
    links = [
        f'<a href="{html.escape(relative_link(path, base))}">{html.escape(label)}</a>'
        for label, path in targets
        if path is not None
    ]
    return " · ".join(links) if links else "–"


def relative_link(path: Path, base: Path) -> str:
    """``path`` relative to the folder ``base``, as a percent-encoded URL path."""
    relative = os.path.relpath(Path(path).resolve(), Path(base).resolve())
    return quote(Path(relative).as_posix())


def _params_cell(run: RunInfo) -> str:
    if run.params_error:
        return f'<td class="err">{html.escape(run.params_error)}</td>'
    return f'<td class="params">{_params(run)}</td>'


def _params(run: RunInfo) -> str:
    record = _record(run.study)
    keys = (record.key_params if record is not None else ()) or [
        key for key, value in run.params.items() if not isinstance(value, dict | list)
    ][:N_GENERIC]
    shown = [
        f"{html.escape(str(key))}={_value(run.params[key])}" for key in keys if key in run.params
    ]
    return " ".join(shown) if shown else "–"


def _value(value: Any, limit: int = 40) -> str:
    """A param value in bold; a long one cut short, in full in its tooltip."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if len(text) <= limit:
        return f"<b>{html.escape(text)}</b>"
    return f'<b title="{html.escape(text)}">{html.escape(text[: limit - 1])}…</b>'


def _metric_cells(run: RunInfo, columns: list[str]) -> str:
    if run.metrics_error:
        message = html.escape(run.metrics_error)
        return f'<td class="err" colspan="{len(columns)}">{message}</td>'
    return "".join(_metric_cell(run.metrics.get(column)) for column in columns)


def _metric_cell(metric: Headline | None) -> str:
    if metric is None:
        return "<td>–</td>"
    tooltip = f' title="{html.escape(metric.tooltip)}"' if metric.tooltip else ""
    return f'<td class="num"{tooltip}>{html.escape(metric.text)}</td>'
