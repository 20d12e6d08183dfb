"""Atomic file writes: every output file appears whole or not at all.

A write goes to a uniquely named temporary file in the target's folder (so two processes never
share one), is flushed to disk, then renamed over the target. A crash, a kill or a full disk
leaves the previous file (or none) and at most a stray ``.<name>.*.tmp`` file, never a torn one.
:func:`atomic_folder` does the same for a folder of files that belong together.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s content to; rename it over ``target`` on
    success, delete it on any error (the error propagates)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(target)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _new_temporary(target: Path) -> Path:
    """An empty file of a fresh name beside ``target``, with the permissions open() gives."""
    while True:
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return temporary
        except FileExistsError:
            continue


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder to write ``target``'s files into; on success swap it in
    for ``target`` (see :func:`replace_folder`), on any error delete it. A reader never sees
    the files of one write mixed with those of another."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync(path)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(source: str | Path, target: str | Path) -> None:
    """Rename the folder ``source`` to ``target``, replacing any folder there.

    Readers see the old folder, briefly none, or the new one. If another process puts a folder
    at ``target`` between the two renames, its folder stays and ``source`` is deleted: writers
    of one target are expected to write equivalent content.
    """
    source, target = Path(source), Path(target)
    previous = _sibling(target, "old")
    with suppress(FileNotFoundError):
        os.replace(target, previous)
    try:
        os.replace(source, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(source)
    shutil.rmtree(previous, ignore_errors=True)


def recover_folder(target: str | Path) -> None:
    """Clean up after a crash inside :func:`atomic_folder` or :func:`replace_folder`: delete
    staging copies and, when ``target`` is missing (the crash came between the two renames),
    put back the copy it was swapped out to."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    leftovers = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{12}}\.(tmp|old)")
    found = [path for path in target.parent.iterdir() if leftovers.fullmatch(path.name)]
    for partial in (path for path in found if path.name.endswith(".tmp")):
        shutil.rmtree(partial, ignore_errors=True)
    replaced = sorted((path for path in found if path.name.endswith(".old")),
                      key=lambda path: path.stat().st_mtime)  # fmt: skip
    if replaced and not target.exists():
        os.replace(replaced.pop(), target)
    for stale in replaced:
        shutil.rmtree(stale, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name beside ``target`` (random: two processes never share one)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.{kind}")


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, data: Any, indent: int | None = 2) -> Path:
    """``data`` (dataclasses, tensors and numpy values allowed) as JSON."""
    return write_text(target, json.dumps(to_jsonable(data), indent=indent))


def write_with(target: str | Path, writer: Callable[[Path], object]) -> Path:
    """Atomically write ``target`` with ``writer(temporary_path)`` (e.g. safetensors' save_file)."""
    with atomic_path(target) as temporary:
        writer(temporary)
    return Path(target)


class Locked(Exception):
    """Another process holds the lock (raised by :func:`exclusive_lock` with ``wait=False``)."""


@contextmanager
def exclusive_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on ``path``: a folder, or a file (created if absent and never
    deleted, so every process locks the same inode). The system releases it when the process
    ends, however it ends. With ``wait=False``, raise :class:`Locked` instead of waiting."""
    path = Path(path)
    flags = os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT
    handle = os.open(path, flags, 0o666)  # not inherited by child processes
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Locked(str(path)) from None
        yield
    finally:
        os.close(handle)  # closing releases the lock


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tensors, numpy values and paths as plain JSON types (no torch import)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_jsonable(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors, numpy arrays and numpy scalars
        return to_jsonable(value.tolist())
    return value
