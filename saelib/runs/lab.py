"""JupyterLab on the study notebooks, as ``make lab`` starts it: on localhost, behind Jupyter's
token, and also as root (a container or a cloud notebook VM), where Jupyter otherwise refuses
to start ("Running as root is not recommended")."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def lab_command(notebook_dir: str | Path, *options: str) -> list[str]:
    """The ``jupyter lab`` command line serving ``notebook_dir``, then ``options``."""
    command = [
        sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={notebook_dir}",
        "--ip=127.0.0.1",  # this machine only; Jupyter's token guards it
    ]  # fmt: skip
    if running_as_root():
        command.append("--allow-root")
    return command + list(options)


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
