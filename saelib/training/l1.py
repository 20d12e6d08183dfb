"""The L1 loss of a ReLU SAE (the common recipe: SAELens's standard SAE, Anthropic's April 2024
update): reconstruction plus ``l1_coefficient`` times sum_i |f_i| ||W_dec_i||, averaged over the
batch.

Weighting each latent by its decoder norm makes the penalty independent of how a latent's scale
is split between its code and its direction; with unit-norm decoder rows (as
:class:`saelib.saes.ReLUSAE` keeps them) it is the plain L1 of the code. The coefficient only
means the same as another codebase's under the same reconstruction convention (see
:mod:`saelib.training.losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from saelib.saes import SAE, SAEOutput
from saelib.training.losses import (
    ReconstructionLoss,
    TrainState,
    reconstruction_loss,
    reconstruction_mse,
)


@dataclass
class L1Loss:
    """Terms: ``recon`` (convention ``reconstruction``), ``mse`` (per element, no gradient, for
    display), ``l1`` (the decoder-norm-weighted L1, before the coefficient) and ``total``."""

    l1_coefficient: float
    reconstruction: ReconstructionLoss = "l2"

    def check(self, model: nn.Module) -> None:
        """Refuse a model without decoder rows to weight the penalty by."""
        if not isinstance(getattr(model, "W_dec", None), Tensor):
            raise TypeError(f"L1Loss needs a model with a W_dec; {type(model).__name__} has none")

    def __call__(
        self, sae: SAE, x: Tensor, output: SAEOutput, state: TrainState
    ) -> dict[str, Tensor]:
        recon = reconstruction_loss(x, output.recon, self.reconstruction)
        l1 = weighted_l1(sae, output)
        return {
            "recon": recon,
            "mse": reconstruction_mse(x, output.recon.detach()),
            "l1": l1,
            "total": recon + self.l1_coefficient * l1,
        }


def weighted_l1(sae: SAE, output: SAEOutput) -> Tensor:
    """Mean over the batch of sum_i |f_i| ||W_dec_i||, in float32, from the active entries."""
    norms = sae.W_dec.float().norm(dim=1)
    return (output.acts.float().abs() * norms[output.indices]).sum(dim=-1).mean()
