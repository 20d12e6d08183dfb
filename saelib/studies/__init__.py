"""The studies: one notebook, one params dataclass and one default params file each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelib.studies.progressive_orthogonality import ProgressiveOrthoParams
from saelib.studies.topk_grid import TopKGridParams

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Study:
    name: str
    params_class: type

    @property
    def notebook(self) -> Path:
        return PROJECT_ROOT / "notebooks" / f"{self.name}.ipynb"

    @property
    def default_params(self) -> Path:
        return PROJECT_ROOT / "params" / f"{self.name}.yaml"

    @property
    def smoke_params(self) -> Path:
        return PROJECT_ROOT / "params" / f"{self.name}.smoke.yaml"


STUDIES: dict[str, Study] = {
    "topk_grid": Study("topk_grid", TopKGridParams),
    "progressive_orthogonality": Study("progressive_orthogonality", ProgressiveOrthoParams),
}
