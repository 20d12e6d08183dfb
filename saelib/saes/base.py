"""What every SAE in saelib shares: a config, a forward output, and checkpoint files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelib.io import write_json, write_with


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int

    def validate(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")


@dataclass
class SAEOutput:
    recon: Tensor  # (batch, d_in)
    acts: Tensor  # (batch, k) values of the active latents (zeros allowed)
    indices: Tensor  # (batch, k) which latents they are
    pre_acts: Tensor | None = None  # (batch, d_sae) dense pre-activations, detached


class SAE(nn.Module):
    """Base class: subclasses set ``architecture`` and ``config_class`` and implement forward."""

    architecture: ClassVar[str]
    config_class: ClassVar[type[SAEConfig]]
    W_dec: nn.Parameter  # (d_sae, d_in): one unit-norm direction per latent

    def __init__(self, config: SAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.metadata: dict = {}  # e.g. model, layer, dataset: where the SAE reads its input

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder direction to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder direction (it only changes the norm)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``sae.safetensors`` and ``config.json`` into ``folder`` (each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()
        }
        write_with(folder / "sae.safetensors", lambda path: save_file(tensors, str(path)))
        config = {"architecture": self.architecture, **asdict(self.config), **(extra or {})}
        write_json(folder / "config.json", config)
        return folder


SAE_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    SAE_REGISTRY[cls.architecture] = cls
    return cls


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load any SAE written by :meth:`SAE.save`."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no SAE checkpoint (config.json missing)")
    stored = json.loads((folder / "config.json").read_text())
    architecture = stored.pop("architecture", None)
    if architecture not in SAE_REGISTRY:
        raise ValueError(f"{folder}: unknown SAE architecture {architecture!r}")
    cls = SAE_REGISTRY[architecture]
    fields = cls.config_class.__dataclass_fields__
    sae = cls(cls.config_class(**{key: stored[key] for key in fields if key in stored}))
    sae.load_state_dict(load_file(folder / "sae.safetensors"))
    sae.metadata = {key: value for key, value in stored.items() if key not in fields}
    return sae.to(device)
