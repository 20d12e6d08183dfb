"""What the evals share: JSON output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelib.io import to_jsonable, write_json

__all__ = ["save_json", "to_jsonable"]


def save_json(value: Any, path: str | Path) -> Path:
    """Write ``value`` as indented JSON, atomically."""
    return write_json(path, value)
