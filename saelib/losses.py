"""Training losses. A loss maps (sae, batch, output, state) to named terms with a "total".

``state`` carries what the trainer knows: training progress p = step / total_steps in [0, 1]
and which latents are currently dead. Studies add a loss (or wrap one), never a new loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from saelib.saes import SAE, SAEOutput


@dataclass
class TrainState:
    step: int
    total_steps: int
    dead: Tensor  # (d_sae,) bool: latents that have not fired for dead_after_tokens tokens

    @property
    def progress(self) -> float:
        return self.step / max(self.total_steps, 1)


class Loss(Protocol):
    def __call__(
        self, sae: SAE, x: Tensor, output: SAEOutput, state: TrainState
    ) -> dict[str, Tensor]: ...


def reconstruction_mse(x: Tensor, recon: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    return (recon.float() - x.float()).pow(2).mean()


def auxk_loss(sae: SAE, x: Tensor, output: SAEOutput, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024): the top dead latents should explain the main reconstruction's error.

    Normalised by the error's variance, so it is comparable across layers and scales.
    """
    if not bool(dead.any()) or output.pre_acts is None:
        return x.new_zeros(())
    error = (x - output.recon).detach().float()
    acts, indices = sae.encode_aux(x, output.pre_acts, dead, k_aux)
    error_hat = sae.decode(acts, indices) - sae.b_dec  # the bias belongs to the main path
    denominator = (error - error.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    return (error_hat.float() - error).pow(2).sum(dim=-1).mean() / denominator


@dataclass
class TopKLoss:
    """MSE reconstruction plus ``auxk_alpha`` times the AuxK loss (0 disables it)."""

    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # default d_in // 2

    def __call__(self, sae: SAE, x: Tensor, output: SAEOutput, state: TrainState):
        mse = reconstruction_mse(x, output.recon)
        terms = {"mse": mse}
        total = mse
        if self.auxk_alpha > 0:
            aux = auxk_loss(sae, x, output, state.dead, self.k_aux or sae.d_in // 2)
            terms["auxk"] = aux
            total = total + self.auxk_alpha * aux
        terms["total"] = total
        return terms
