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
