"""Command line: ``python -m saelib {run,sweep,fetch,list,lab,report}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saelib.params import ParamsError, parse_override


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ParamsError, FileNotFoundError) as error:
        lines = [line.strip() for line in str(error).splitlines()]
        message = " ".join(line for line in lines if line)  # one line, whatever the error holds
        print(f"error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saelib", description=__doc__)
    commands = parser.add_subparsers(required=True)

    run = commands.add_parser("run", help="run a study notebook with papermill")
    run.add_argument("study", nargs="?", help="a study name, or 'all' (optional with --resume)")
    run.add_argument(
        "--resume", metavar="RUN_DIR",
        help="re-execute a failed or interrupted run in its folder, with its params.yaml",
    )  # fmt: skip
    run.add_argument("-f", "--params-file", help="YAML params (default: params/<study>.yaml)")
    run.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="override one parameter (VALUE is read as YAML: 5, 1e-3, [5, 10], text)",
    )  # fmt: skip
    run.add_argument("--outputs", help="where run folders go (default: ./outputs)")
    run.add_argument(
        "--processes", type=int, default=1, metavar="N",
        help="run the notebook on N processes under torchrun (one per GPU; default 1)",
    )  # fmt: skip
    run.add_argument(
        "--parallel", choices=("sae", "data"), default="sae",
        help="with --processes: deal the SAEs out to the processes (sae, default) or split "
        "each batch over them (data)",
    )  # fmt: skip
    run.set_defaults(handler=_run)

    sweep = commands.add_parser(
        "sweep", help="one run per combination of parameter values, and a page comparing them"
    )
    sweep.add_argument("study", nargs="?", help="the study to sweep")
    sweep.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUES"),
        help="a parameter and the YAML list of its values to try",
    )  # fmt: skip
    sweep.add_argument("-f", "--params-file", help="YAML params (default: params/<study>.yaml)")
    sweep.add_argument("--jobs", type=int, default=1, help="members run at once (default 1)")
    sweep.add_argument("--outputs", help="the outputs folder (default: ./outputs)")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep")
    sweep.add_argument("--member", nargs=2, metavar=("SWEEP_DIR", "INDEX"), help=argparse.SUPPRESS)
    sweep.set_defaults(handler=_sweep)

    fetch = commands.add_parser("fetch", help="fetch the embedded model and datasets")
    fetch.set_defaults(handler=_fetch)

    listing = commands.add_parser("list", help="list the studies")
    listing.set_defaults(handler=_list)

    lab = commands.add_parser(
        "lab", help="JupyterLab on the notebooks (localhost, with a token; as root too)"
    )
    lab.add_argument("--notebook-dir", default="notebooks", help="what it serves")
    lab.add_argument("options", nargs=argparse.REMAINDER, help="more jupyter lab options")
    lab.set_defaults(handler=_lab)

    report = commands.add_parser("report", help="write an HTML index of the runs in outputs/")
    report.add_argument("--outputs", help="the outputs folder (default: ./outputs)")
    report.add_argument("--out", help="the index page (default: <outputs>/index.html)")
    report.set_defaults(handler=_report)
    return parser


def _run(args) -> int:
    from saelib.runs.launch import RunFailed
    from saelib.runs.runner import RunInterrupted, get_study, run_study
    from saelib.studies import STUDIES

    if args.resume:
        return _resume(args)
    if args.study is None:
        raise ParamsError("give a study name (or 'all'), or --resume RUN_DIR")
    overrides = {key: parse_override(value, key) for key, value in args.param}
    names = sorted(STUDIES) if args.study == "all" else [args.study]
    if args.study == "all" and (args.params_file or overrides):
        raise ParamsError("'run all' uses each study's default params; -f and -p need one study")
    for name in names:
        get_study(name)
    for name in names:
        try:
            outputs = Path(args.outputs) if args.outputs else None
            folder = run_study(name, args.params_file, overrides, outputs=outputs,
                               processes=args.processes, parallel=args.parallel)  # fmt: skip
        except RunInterrupted as stop:
            return _interrupted(name, stop)
        except RunFailed as failure:
            return _failed(name, failure)
        _print_outputs(name, folder, "outputs in")
    return 0


def _resume(args) -> int:
    from saelib.runs.launch import RunFailed
    from saelib.runs.runner import RunInterrupted, read_status, resume_run

    if args.params_file or args.param:
        raise ParamsError("--resume reuses the run's params.yaml; -f and -p cannot go with it")
    if args.study == "all":
        raise ParamsError("--resume resumes one run; leave out the study or name the run's")
    try:
        folder = resume_run(args.resume, args.study, processes=args.processes,
                            parallel=args.parallel)  # fmt: skip
    except RunInterrupted as stop:
        return _interrupted(read_status(stop.run_dir)["study"], stop)
    except RunFailed as failure:
        return _failed(read_status(failure.run_dir)["study"], failure)
    _print_outputs(read_status(folder)["study"], folder, "resumed; outputs in")
    return 0


def _interrupted(name: str, stop) -> int:
    command = f"python -m saelib run --resume {stop.run_dir}"
    print(f"{name}: interrupted ({stop.reason}); resume with: {command}", file=sys.stderr)
    return 130


def _failed(name: str, failure) -> int:
    command = f"python -m saelib run --resume {failure.run_dir}"
    print(f"{name}: failed: {failure}; resume with: {command}", file=sys.stderr)
    return 1


def _print_outputs(name: str, folder: Path, what: str) -> None:
    print(f"{name}: {what} {folder}")
    print(f"  notebook {folder / (name + '.ipynb')}\n  html     {folder / (name + '.html')}")


def _sweep(args) -> int:
    from saelib.runs import sweep

    if args.member:  # one member, in the process the sweep started for it
        sweep.run_member(Path(args.member[0]), int(args.member[1]))
        return 0
    if args.resume:
        if args.study or args.param or args.params_file:
            raise ParamsError("--resume continues a sweep as planned; leave out study, -p and -f")
        folder = Path(args.resume)
        sweep.read_sweep(folder)
    else:
        if args.study is None:
            raise ParamsError("give a study and -p NAME VALUES, or --resume SWEEP_DIR")
        grid = {key: parse_override(value, key) for key, value in args.param}
        outputs = Path(args.outputs) if args.outputs else None
        folder = sweep.plan_sweep(args.study, grid, args.params_file, outputs)
    print(f"sweep: {folder}")
    members = sweep.run_sweep(folder, args.jobs)
    for member in members:
        print(
            f"  {member['status']:>11}  {sweep.describe(member['overrides'])}  {member['run_dir']}"
        )
    print(f"  page {folder / sweep.PAGE_FILE}")
    return 0 if all(member["status"] == sweep.DONE for member in members) else 1


def _fetch(args) -> int:
    from saelib import assets
    from saelib.lm import load_lm

    for name, path in assets.fetch_all().items():
        print(f"{name}: {path}")
    load_lm("smollm2-135m")  # converts the GGUF weights once, so later loads are fast
    print(f"cache: {assets.cache_dir()}")
    return 0


def _list(args) -> int:
    from saelib.studies import STUDIES

    for name, study in STUDIES.items():
        print(f"{name}\t{study.description}\t{study.notebook}")
    return 0


def _lab(args) -> int:
    import subprocess

    from saelib.runs.lab import lab_command

    if not Path(args.notebook_dir).is_dir():
        raise FileNotFoundError(f"--notebook-dir {args.notebook_dir}: no such folder")
    return subprocess.call(lab_command(args.notebook_dir, *args.options))


def _report(args) -> int:
    from saelib.runs.report import build_index

    if args.outputs:
        outputs = Path(args.outputs)
    else:
        from saelib.runs.runner import outputs_root

        outputs = outputs_root()
    index = build_index(outputs, Path(args.out) if args.out else None)
    print(f"index: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
