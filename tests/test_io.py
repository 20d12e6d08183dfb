"""Atomic writes: a failed write leaves the previous file and no temporary behind."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from saelib import io


def test_a_write_that_fails_half_way_keeps_the_previous_file(tmp_path):
    target = tmp_path / "report.html"
    io.write_text(target, "old")

    def half_then_full_disk(path):
        path.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        io.write_with(target, half_then_full_disk)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["report.html"]


def test_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_write_json_takes_tensors_numpy_and_paths(tmp_path):
    value = {"t": torch.tensor([1.5, 2.0]), "n": np.float32(0.25), "p": tmp_path, 3: (1, 2)}
    stored = json.loads(io.write_json(tmp_path / "x.json", value).read_text())
    assert stored == {"t": [1.5, 2.0], "n": 0.25, "p": str(tmp_path), "3": [1, 2]}


def test_a_folder_write_that_fails_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "stats"
    with io.atomic_folder(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), io.atomic_folder(target) as staging:
        (staging / "a.txt").write_text("second, half written")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stats"]  # no staging left


def test_a_folder_write_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "stats"
    with io.atomic_folder(target) as staging:
        (staging / "old.txt").write_text("x")
    with io.atomic_folder(target) as staging:
        (staging / "new.txt").write_text("y")
    assert sorted(path.name for path in target.iterdir()) == ["new.txt"]


def test_recover_folder_after_a_crash_between_the_two_renames(tmp_path):
    target = tmp_path / "ckpt"
    swapped = tmp_path / ".ckpt.00000000abcd.old"  # the old copy, renamed away; no new one yet
    swapped.mkdir()
    (swapped / "w.bin").write_text("weights")
    (tmp_path / ".ckpt.0000000000ff.tmp").mkdir()  # a staging copy cut short
    (tmp_path / ".ckpt2.00000000abcd.old").mkdir()  # another folder's leftovers stay
    io.recover_folder(target)
    assert (target / "w.bin").read_text() == "weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".ckpt2.00000000abcd.old", "ckpt"]
