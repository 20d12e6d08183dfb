"""What every SAE in saelib shares: a config, a forward output, and checkpoint files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    """What an SAE's forward pass returns: the reconstruction and the code, in two views.

    The active-entries view ``(acts, indices)`` holds up to m latents per row (m = k for a TopK
    code; for a code with a varying number of active latents, such as ReLU/L1, JumpReLU or a
    binary code, m is the largest count in the batch and shorter rows are padded with zeros).
    A zero value means "not active". ``dense()`` gives the (batch, d_sae) matrix. Both views
    carry gradients to the encoder.
    """

    recon: Tensor  # (batch, d_in)
    acts: Tensor  # (batch, m) values of the active latents (zeros: padding or inactive)
    indices: Tensor  # (batch, m) which latents they are
    d_sae: int
    pre_acts: Tensor | None = None  # (batch, d_sae) dense pre-activations, detached
    dense_codes: Tensor | None = field(default=None, repr=False)  # (batch, d_sae) when known

    @classmethod
    def from_dense(cls, recon: Tensor, codes: Tensor, pre_acts: Tensor | None = None):
        """The output of an SAE whose code is a dense (batch, d_sae) matrix, mostly zeros."""
        width = max(int((codes != 0).sum(dim=-1).max()), 1) if codes.numel() else 1
        _, indices = codes.detach().abs().topk(min(width, codes.shape[-1]), dim=-1)
        acts = codes.gather(-1, indices)
        return cls(recon, acts, indices, codes.shape[-1], pre_acts, codes)

    def dense(self) -> Tensor:
        """(batch, d_sae) latent activations (differentiable)."""
        if self.dense_codes is not None:
            return self.dense_codes
        dense = self.acts.new_zeros(self.acts.shape[0], self.d_sae)
        return dense.scatter_add(-1, self.indices, self.acts)

    def active(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, latents, values) of every non-zero entry of the code."""
        mask = self.acts != 0
        rows = torch.arange(self.acts.shape[0], device=self.acts.device)[:, None]
        return rows.expand_as(mask)[mask], self.indices[mask], self.acts[mask]

    def l0(self) -> Tensor:
        """(batch,) number of active latents per row."""
        return (self.acts != 0).sum(dim=-1)

    @torch.no_grad()
    def fired(self) -> Tensor:
        """(d_sae,) bool: latents active on at least one row of the batch."""
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.acts.device)
        fired[self.indices[self.acts != 0]] = True
        return fired


class SAE(nn.Module):
    """Base class: subclasses set ``architecture`` and ``config_class`` and implement forward.

    The trainer calls ``before_optimizer_step`` after the backward pass (before gradient
    clipping and the update) and ``after_optimizer_step`` after each update; an SAE that needs
    the first training batch (e.g. to place its decoder bias) defines ``on_first_batch(batch)``.
    """

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

    def init_tied_weights(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder directions, the encoder starting as their transpose (as
        in Gao et al. 2024 and Conerly et al. 2024), and a zero encoder bias."""
        directions = torch.randn(self.d_sae, self.d_in, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(directions)
        self.W_enc = nn.Parameter(directions.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder direction to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder direction (it only changes the norm)."""
        if self.W_dec.grad is None:
            return
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1)[:, None]
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)  # no (d_sae, d_in) temporary

    def before_optimizer_step(self) -> None:
        """Keep the update from changing the decoder norms (they are renormalised anyway)."""
        self.remove_parallel_decoder_grad()

    def after_optimizer_step(self) -> None:
        self.normalize_decoder()

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
