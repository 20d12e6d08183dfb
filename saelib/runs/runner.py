"""Run a study notebook headlessly: validate params, execute with papermill, render HTML.

Every run gets its own folder ``outputs/<study>/<run-id>/``; an existing run is never
overwritten, only resumed: ``resume_run`` re-executes a failed or interrupted run into its own
folder (``output_dir``), where the study finds the checkpoints it left. Every file the runner
writes is atomic (``saelib.io``; papermill's saves of the executed notebook included), and
``status.json`` says how the run stands:

- ``running``: with the runner's ``pid`` and ``host``; ``read_status`` shows a running run whose
  process is gone from this host as ``interrupted``;
- ``complete``: with ``finished``;
- ``failed``: with the first ``error`` (one line), its ``error_type`` and the ``stage`` that
  failed (``notebook`` or ``html``);
- ``interrupted``: Ctrl-C, SIGTERM or SIGHUP (an orderly stop: the kernel is shut down), with
  its ``reason``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from saelib.io import Locked, exclusive_lock, write_json, write_text
from saelib.params import ParamsError, load_yaml, parse_params

if TYPE_CHECKING:  # saelib.studies imports torch; the report reads statuses without it
    from saelib.studies import Study

KERNEL_NAME = "saelib"
STATUS_FILE = "status.json"
STATUSES = ("running", "complete", "failed", "interrupted")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
log = logging.getLogger(__name__)


class RunError(ParamsError):
    """A run folder that cannot be read or resumed (on the command line: one line, status 2)."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped in order (Ctrl-C, SIGTERM, SIGHUP); ``run_dir`` can be resumed."""

    def __init__(self, reason: str, run_dir: Path | None = None) -> None:
        super().__init__(reason)
        self.reason, self.run_dir = reason, run_dir


OUTPUTS_VARIABLE = "SAELIB_OUTPUTS"


def outputs_root() -> Path:
    """Where runs go unless told otherwise: ``$SAELIB_OUTPUTS`` when set (``make lab`` sets it
    to the project's outputs/, so notebooks run from notebooks/ write there too), else
    ``outputs/`` in the working directory."""
    configured = os.environ.get(OUTPUTS_VARIABLE)
    return Path(configured).expanduser() if configured else Path.cwd() / "outputs"


def get_study(name: str) -> Study:
    from saelib.studies import STUDIES

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


# ------------------------------------------------------------------------------------ runs


def run_study(
    name: str,
    params_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    outputs: Path | None = None,
    progress: bool = True,
    on_created: Callable[[Path], None] | None = None,
    processes: int = 1,
    parallel: str = "sae",
) -> Path:
    """Validate, execute the notebook into a new run folder, render HTML; return the folder.

    ``on_created`` is told the folder as soon as it exists. A failure re-raises the first error
    (with a note naming the run folder); an interrupt raises :class:`RunInterrupted`. With
    ``processes`` > 1 the notebook runs on that many processes under torchrun, training in the
    ``parallel`` mode ("sae" or "data"; see :mod:`saelib.runs.launch`).
    """
    from saelib.runs import launch

    study = get_study(name)
    params = resolve_params(study, params_file, overrides)  # errors here, before any compute
    launch.check_launch(processes, parallel, study)
    run_dir = new_run_dir(name, outputs).absolute()
    if on_created is not None:
        on_created(run_dir)
    values = dataclasses.asdict(params)
    if processes > 1:
        write_text(run_dir / "params.yaml", yaml.safe_dump(values, sort_keys=False))
        launch.launch(run_dir, processes, parallel, resume=False, progress=progress)
        return run_dir
    with run_lock(run_dir):
        execute(
            study, run_dir, values, progress, params_yaml=yaml.safe_dump(values, sort_keys=False)
        )
    return run_dir


def resume_run(
    run_dir: str | Path,
    study: str | None = None,
    progress: bool = True,
    processes: int = 1,
    parallel: str = "sae",
) -> Path:
    """Re-execute a failed or interrupted run into its own folder with its ``params.yaml``
    (validated again); the study resumes from the checkpoints it finds there. Return the folder.
    ``processes`` and ``parallel`` as for :func:`run_study`.

    Raises :class:`RunError` for a folder that is not a run, a complete run, a run still going,
    or a run of another study than ``study`` (when given).
    """
    from saelib.runs import launch

    run_dir = Path(run_dir).absolute()
    found, _ = resumable(run_dir, study)  # the clear refusals first: complete, running (its pid)
    launch.check_launch(processes, parallel, found)
    if processes > 1:
        launch.launch(run_dir, processes, parallel, resume=True, progress=progress)
        return run_dir
    with run_lock(run_dir):
        found, previous = resumable(run_dir, study)  # again: another resume may have finished
        path = run_dir / "params.yaml"
        params = parse_params(found.params_class, load_yaml(path), source=str(path))
        execute(found, run_dir, dataclasses.asdict(params), progress, previous=previous)
    return run_dir


def resumable(run_dir: Path, study: str | None = None) -> tuple[Study, dict[str, Any] | None]:
    """The study of a run folder that can be resumed and its last status (None for a run older
    than status.json); :class:`RunError` when it cannot be."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a run folder (no such folder)")
    state = read_status(run_dir)
    if state is None and not (run_dir / "params.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (it has no status.json or params.yaml)")
    found = _study_of(run_dir, state)
    if study is not None and study != found.name:
        raise RunError(f"{run_dir} is a run of {found.name}, not of {study}")
    if not (run_dir / "params.yaml").is_file():
        raise RunError(f"{run_dir} has no params.yaml; the run cannot be resumed")
    status = state["status"] if state else _status_from_files(found.name, run_dir)
    if status == "complete":
        raise RunError(f"run {run_dir} is complete; start a new run instead")
    if status == "running":
        where = f"pid {state.get('pid')} on {state.get('host')}"
        raise RunError(f"run {run_dir} is still running ({where}); stop it first")
    return found, state


def _study_of(run_dir: Path, state: dict[str, Any] | None) -> Study:
    name = str((state or {}).get("study") or run_dir.parent.name)
    try:
        return get_study(name)
    except ParamsError as error:
        raise RunError(f"{run_dir} is not a run of a known study: {error}") from None


def _status_from_files(study: str, run_dir: Path) -> str:
    """The status of a run without status.json, as the report infers it from its files."""
    from saelib.runs.report import read_run

    return read_run(study, run_dir).status


def execute(
    study: Study,
    run_dir: Path,
    values: dict[str, Any],
    progress: bool,
    previous: dict[str, Any] | None = None,
    params_yaml: str | None = None,
) -> None:
    """Execute the notebook into ``run_dir`` and render it, keeping status.json up to date."""
    state = _start_status(run_dir, study.name, previous)
    executed, stage = run_dir / f"{study.name}.ipynb", "notebook"
    try:
        with _stop_on_signals():
            if params_yaml is not None:
                write_text(run_dir / "params.yaml", params_yaml)
            for render in (".html", REPORT_SUFFIX):  # a previous attempt's renders
                executed.with_suffix(render).unlink(missing_ok=True)
            papermill_run(study, executed, values | {"output_dir": str(run_dir)}, progress)
            stage = "html"
            render_html(executed)
    except BaseException as error:
        _raise_if_interrupted(run_dir, state, error)
        if stage == "notebook":
            _record_failure(run_dir, state, executed, error)
        else:
            _quietly(_set_status, run_dir, state, "failed", stage=stage, **error_fields(error))
        raise
    _set_status(run_dir, state, "complete", finished=_now())


def papermill_run(study: Study, executed: Path, parameters: dict[str, Any], progress: bool) -> None:
    import papermill

    _atomic_notebook_saves()
    papermill.execute_notebook(
        str(study.notebook),
        str(executed),
        parameters=parameters,
        kernel_name=kernel_name(),
        cwd=str(executed.parent),  # the run folder: relative paths a notebook writes land there
        progress_bar=progress,
    )


def _record_failure(
    run_dir: Path, state: dict[str, Any], executed: Path, error: BaseException
) -> None:
    """Record a failed run and render what the notebook got to; nothing here replaces the
    error, which gets a note naming the run folder."""
    fields = {"stage": "notebook", **error_fields(error)}
    _quietly(_set_status, run_dir, state, "failed", **fields)
    if executed.exists():  # the notebook up to the failing cell, with its traceback
        try:
            render_html(executed)
        except Exception as render_error:
            log.error("rendering %s failed: %s", executed.name, _one_line(render_error))
            _quietly(_set_status, run_dir, state, "failed", **fields,
                     html_error=_one_line(render_error))  # fmt: skip
    error.add_note(f"run folder: {run_dir} (resume with: python -m saelib run --resume {run_dir})")


def mark_failed(run_dir: Path, error: str, error_type: str = "ProcessFailed") -> dict[str, Any]:
    """Record a run as failed from outside its notebook (a process of it died); returns the
    status written."""
    state = read_status(run_dir) or {"study": run_dir.parent.name}
    state.pop("reason", None)
    return _set_status(run_dir, state, "failed", stage="notebook", error_type=error_type,
                       error=error)  # fmt: skip


def _raise_if_interrupted(run_dir: Path, state: dict[str, Any], error: BaseException) -> None:
    """For an interrupt: record the run as interrupted and raise RunInterrupted."""
    reason = _interrupt_reason(error)
    if reason is None:
        return
    _quietly(_set_status, run_dir, state, "interrupted", reason=reason)
    if not isinstance(error, RunInterrupted):
        raise RunInterrupted(reason, run_dir) from error
    error.run_dir = run_dir
    raise error


def _interrupt_reason(error: BaseException) -> str | None:
    """Why a run stopped, if it was an interrupt (of the runner, or of the kernel's cell)."""
    if isinstance(error, RunInterrupted):
        return error.reason
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt"
    if getattr(error, "ename", None) == "KeyboardInterrupt":  # papermill: the cell was interrupted
        return "KeyboardInterrupt in the notebook"
    return None


def _quietly(function, *args: Any, **kwargs: Any) -> None:
    """Call ``function``; log an error instead of raising it (the run's own error comes first)."""
    try:
        function(*args, **kwargs)
    except Exception as error:
        log.error("%s failed: %s", function.__name__, _one_line(error))


def error_fields(error: BaseException) -> dict[str, Any]:
    """An error's type and the first line of its message (a notebook error: the cell's)."""
    if getattr(error, "ename", None):  # papermill's PapermillExecutionError
        fields = {"error_type": error.ename, "error": _first_line(str(error.evalue))}
        return fields | {"cell": error.exec_count}
    return {"error_type": type(error).__name__, "error": _first_line(str(error))}


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _one_line(error: BaseException) -> str:
    fields = error_fields(error)
    return ": ".join(text for text in (fields["error_type"], fields["error"]) if text)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP stop the run in order: the first raises RunInterrupted (papermill
    then shuts the kernel down and saves the notebook); later ones wait for that stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise RunInterrupted(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process at a time in a run folder: an exclusive lock on the folder itself."""
    try:
        with exclusive_lock(run_dir, wait=False):
            yield
    except Locked:
        raise RunError(f"run {run_dir} is in use by another process") from None


@functools.cache
def _atomic_notebook_saves() -> None:
    """Route papermill's saves of the executed notebook (after every cell) through saelib.io.

    Papermill picks an I/O handler by path prefix, newest first; the runner's paths are absolute,
    so a handler for "/" takes them. Registered once per process.
    """
    from papermill.iorw import LocalHandler, papermill_io

    class AtomicLocalHandler(LocalHandler):
        def write(self, buf: str, path: str) -> None:
            write_text(path, buf)

    papermill_io.register("/", AtomicLocalHandler())


def kernel_name() -> str:
    """The project's registered kernel, or the default one when it is not registered."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


REPORT_SUFFIX = ".report.html"


def render_html(notebook: Path) -> Path:
    """Self-contained HTML pages of an executed notebook (figures embedded as data URIs), each
    written atomically (a render that fails leaves no file): the full render ``<name>.html``,
    and beside it a report render for reading, ``<name>.report.html`` (:func:`reading_copy`).
    Returns the full render."""
    import nbformat
    from nbconvert import HTMLExporter

    executed = nbformat.read(notebook, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(executed)
    full = write_text(notebook.with_suffix(".html"), body)
    reading = HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = reading.from_notebook_node(reading_copy(executed))
    write_text(notebook.with_suffix(REPORT_SUFFIX), body)
    return full


def reading_copy(notebook):
    """The notebook as a reader wants it (code is hidden by the exporter): without the return
    values of helper calls (an ``Out[n]`` of plain text only, such as a saved figure's path)
    and without stderr (progress bars, warnings); text, tables, figures, cards and errors stay."""
    import copy

    notebook = copy.deepcopy(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if not _helper_noise(output)]
    return notebook


def _helper_noise(output) -> bool:
    if output.output_type == "execute_result":
        return set(output.get("data", {})) <= {"text/plain"}
    return output.output_type == "stream" and output.get("name") == "stderr"


# ---------------------------------------------------------------------------------- status


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's status.json, or None for a folder without one (a run older than status.json).

    A ``running`` run whose process is gone from this host reads as ``interrupted``. Raises
    :class:`RunError` for an unreadable file.
    """
    path = Path(run_dir) / STATUS_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunError(f"{path} is unreadable: {_first_line(str(error))}") from None
    if not isinstance(state, dict) or state.get("status") not in STATUSES:
        raise RunError(f"{path} holds no run status (one of {', '.join(STATUSES)})")
    if state["status"] == "running" and not process_alive(state):
        state = state | {"status": "interrupted", "reason": "its process is gone (killed?)"}
    return state


def process_alive(state: dict[str, Any]) -> bool:
    """Whether the process of a running run lives; True where that cannot be told (another
    host). A pid taken over by a later process (another start time) is not the run's."""
    pid = state.get("pid")
    if state.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(pid)
    if stat is None:
        return True
    zombie = stat[0] in ("Z", "X")
    return not zombie and state.get("pid_started") in (None, int(stat[19]))


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux), None where absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _start_status(run_dir: Path, study: str, previous: dict[str, Any] | None) -> dict[str, Any]:
    now, stat = _now(), _proc_stat(os.getpid())
    state = {"study": study, "status": "running", "pid": os.getpid(),
             "pid_started": int(stat[19]) if stat else None, "host": socket.gethostname(),
             "started": now}  # fmt: skip
    if previous is not None:  # a resumed run keeps its start time and counts its attempts
        attempts = previous.get("attempts", 1)
        state |= {"started": previous.get("started", now), "resumed": now,
                  "attempts": (attempts if isinstance(attempts, int) else 1) + 1}  # fmt: skip
    return _set_status(run_dir, state, "running")


def _set_status(run_dir: Path, state: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    """Write ``state`` with this status and fields (atomically); return what was written."""
    written = state | {"status": status, **fields, "updated": _now()}
    write_json(run_dir / STATUS_FILE, written)
    return written


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
