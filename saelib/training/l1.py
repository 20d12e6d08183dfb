"""The L1 loss of a ReLU SAE (the common recipe: SAELens's standard SAE, Anthropic's April 2024
update): reconstruction plus ``l1_coefficient`` times sum_i |f_i| ||W_dec_i||, averaged over the
batch.

Weighting each latent by its decoder norm makes the penalty independent of how a latent's scale
is split between its code and its direction; with unit-norm decoder rows (as
:class:`saelib.saes.ReLUSAE` keeps them) it is the plain L1 of the code. The coefficient only
means the same as another codebase's under the same reconstruction convention (see
:mod:`saelib.training.losses`).

``adaptive=True`` divides the coefficient by the batch's mean cosine between inputs and their
reconstructions, clamped to [``cosine_floor``, 1] and computed without gradient: the sparsity
pressure rises while reconstructions are poor and falls back to ``l1_coefficient`` as they
become exact (the frequency-ordering original's "base 0.04, scaled inversely with
reconstruction cosine"). The floor bounds the coefficient at ``l1_coefficient / cosine_floor``
when reconstructions point away from their inputs, as early in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.saes import SAE, SAEOutput
from saelib.training.distributed import batch_rows, batch_sum
from saelib.training.losses import (
    ReconstructionLoss,
    TrainState,
    reconstruction_loss,
    reconstruction_mse,
)


@dataclass
class L1Loss:
    """Terms: ``recon`` (convention ``reconstruction``), ``mse`` (per element, no gradient, for
    display), ``l1`` (the decoder-norm-weighted L1, before the coefficient) and ``total``; with
    ``adaptive``, also ``l1_coefficient`` (the coefficient this batch used, no gradient)."""

    l1_coefficient: float
    reconstruction: ReconstructionLoss = "l2"
    adaptive: bool = False
    cosine_floor: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.cosine_floor <= 1:
            raise ValueError(f"cosine_floor must lie in (0, 1], got {self.cosine_floor}")

    def check(self, model: nn.Module) -> None:
        """Refuse a model without decoder rows to weight the penalty by."""
        if not isinstance(getattr(model, "W_dec", None), Tensor):
            raise TypeError(f"L1Loss needs a model with a W_dec; {type(model).__name__} has none")

    def __call__(
        self, sae: SAE, x: Tensor, output: SAEOutput, state: TrainState
    ) -> dict[str, Tensor]:
        recon = reconstruction_loss(x, output.recon, self.reconstruction)
        l1 = weighted_l1(sae, output)
        terms = {"recon": recon, "mse": reconstruction_mse(x, output.recon.detach()), "l1": l1}
        if not self.adaptive:
            return terms | {"total": recon + self.l1_coefficient * l1}
        coefficient = adaptive_coefficient(x, output.recon, self.l1_coefficient, self.cosine_floor)
        return terms | {"l1_coefficient": coefficient, "total": recon + coefficient * l1}


@torch.no_grad()
def adaptive_coefficient(x: Tensor, recon: Tensor, base: float, cosine_floor: float) -> Tensor:
    """``base / clamp(mean_b cos(x_b, x_hat_b), cosine_floor, 1)``, a float32 scalar without
    gradient (the penalty's weight follows reconstruction quality; it is not optimised)."""
    cosines = torch.cosine_similarity(x.float(), recon.detach().float(), dim=-1)
    cosine = batch_sum(cosines.sum()) / batch_rows(x)  # the global batch's, in data parallel
    return base / cosine.clamp(cosine_floor, 1.0)


def weighted_l1(sae: SAE, output: SAEOutput) -> Tensor:
    """Mean over the batch of sum_i |f_i| ||W_dec_i||, in float32, from the active entries."""
    norms = sae.W_dec.float().norm(dim=1)
    return (output.acts.float().abs() * norms[output.indices]).sum(dim=-1).mean()
