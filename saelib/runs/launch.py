"""A study notebook on several processes: ``python -m saelib run STUDY --processes N``.

The runner starts N processes under torchrun (``torch.distributed.run --standalone``, one
machine: a process per GPU, or CPU processes on the gloo backend). Each executes the study's
notebook with papermill, in a kernel that joins the process group on its first ``harvest`` or
``train_saes`` (``$SAELIB_PARALLEL`` names the mode; see :mod:`saelib.training.distributed`),
so a study runs unchanged:

- the harvest is shared: each process forwards its run of the document batches into one cache;
- ``train_saes`` deals the SAEs out to the processes (``--parallel sae``, the default: each
  trains its share from the same stream, and every process then reads every SAE's result from
  the checkpoints) or splits each batch over them (``--parallel data``, for a few large SAEs;
  refused for losses that keep statistics of their batch, such as the ordering and
  orthogonality losses);
- everything after training (evals, figures, results) runs alike in every process.

Process 0 executes into the run folder, keeps its ``status.json`` and renders the HTML, as a
one-process run does. The others execute into temporary folders of their own, deleted when they
finish, whose ``checkpoints`` is a link to the run's: only process 0 writes the run's outputs,
except the checkpoints (in SAE mode each process writes its own SAEs') and the caches kept
beside them (feature statistics, which every process computes alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from saelib.params import ParamsError, load_yaml, parse_params
from saelib.runs import runner
from saelib.studies.record import CHECKPOINTS_FOLDER
from saelib.training.distributed import LAUNCH_VARIABLE

if TYPE_CHECKING:
    from saelib.studies import Study

PARALLEL_CHOICES = ("sae", "data")


def check_launch(processes: int, parallel: str, study: Study) -> None:
    """Refuse, in one line, a process count or mode the launcher cannot run ``study`` with."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ParamsError(f"processes must be a whole number >= 1, got {processes!r}")
    if parallel not in PARALLEL_CHOICES:
        raise ParamsError(f"parallel must be one of {PARALLEL_CHOICES}, got {parallel!r}")
    if processes > 1 and parallel == "data" and not study.data_parallel:
        raise ParamsError(
            f"{study.name} trains losses that keep statistics of each batch, which a process's "
            "slice of it would change; run it with parallel 'sae'"
        )


def launch(run_dir: Path, processes: int, parallel: str, resume: bool, progress: bool) -> None:
    """Execute the run in ``run_dir`` (its params.yaml written) on ``processes`` processes and
    wait. Raises :class:`runner.RunInterrupted` for an interrupted run and
    :class:`RunFailed` for a failed one, as the one-process runner does."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", __name__, str(run_dir)]  # fmt: skip
    command += ["--resume"] * resume + ["--quiet"] * (not progress)
    threads = str(max(1, (os.cpu_count() or 1) // processes))  # torchrun's default is 1
    environment = {"OMP_NUM_THREADS": threads} | os.environ | {LAUNCH_VARIABLE: parallel}
    try:
        exit_status = subprocess.call(command, env=environment)
    except KeyboardInterrupt:
        raise runner.RunInterrupted("KeyboardInterrupt", run_dir) from None
    state = runner.read_status(run_dir) or {}
    status = state.get("status")
    if status == "complete" and exit_status == 0:
        return
    # torchrun stops the other processes with SIGTERM when one fails; a user's stop is SIGINT
    stopped_by_torchrun = status == "interrupted" and state.get("reason") == "SIGTERM"
    if status == "interrupted" and not (stopped_by_torchrun and exit_status != 0):
        raise runner.RunInterrupted(state.get("reason", "interrupted"), run_dir)
    if status != "failed":  # another process failed (its error is in the log above)
        error = f"a process of the run failed (torchrun exit status {exit_status}); see above"
        state = runner.mark_failed(run_dir, error)
    raise RunFailed(f"{state.get('error_type')}: {state.get('error')}", run_dir)


class RunFailed(RuntimeError):
    """A run on several processes that failed; its status.json tells the first error."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(f"{message} (run folder: {run_dir})")
        self.run_dir = run_dir


def _execute_here(run_dir: Path, resume: bool, progress: bool) -> None:
    """This process's part: process 0 runs the study into ``run_dir`` (with its status and
    renders), any other one into a temporary folder of its own."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and resume:
        runner.resume_run(run_dir, progress=progress)
        return
    state = runner.read_status(run_dir)
    study = runner.get_study(str((state or {}).get("study") or run_dir.parent.name))
    path = run_dir / "params.yaml"
    values = dataclasses.asdict(parse_params(study.params_class, load_yaml(path), str(path)))
    if rank == 0:
        with runner.run_lock(run_dir):
            runner.execute(study, run_dir, values, progress)
        return
    with tempfile.TemporaryDirectory(prefix=f"saelib-{study.name}-process{rank}-") as scratch:
        # the checkpoints are shared: what the notebook reads back after training is process 0's
        shared = run_dir / CHECKPOINTS_FOLDER
        (Path(scratch) / CHECKPOINTS_FOLDER).symlink_to(shared, target_is_directory=True)
        executed = Path(scratch) / f"{study.name}.ipynb"
        runner.papermill_run(study, executed, values | {"output_dir": scratch}, progress=False)


def main(argv: list[str] | None = None) -> None:
    """One process of a launched run (torchrun starts this module in each)."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    _execute_here(args.run_dir.absolute(), args.resume, progress=not args.quiet)


if __name__ == "__main__":
    main()
