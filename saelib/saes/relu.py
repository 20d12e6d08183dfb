"""ReLU sparse autoencoder, trained with an L1 penalty (:class:`saelib.training.l1.L1Loss`).

encode: f = relu((x - b_dec) @ W_enc.T + b_enc), a dense code with a varying number of active
latents per row. decode: x_hat = f @ W_dec + b_dec.

The decoder directions (rows of W_dec) start as random unit vectors, the encoder as their
transpose, and stay at unit norm: like a TopK SAE it keeps the base class's optimizer-step hooks
(drop the gradient along each direction before the update, renormalise after it). So every
eval that reads W_dec rows as directions applies unchanged, and the L1 term's decoder-norm
factor (the SAELens / Anthropic form, sum_i f_i ||W_dec_i||) is 1; the loss keeps it so that it
stays right for a model whose decoder norms are left free. The decoder bias starts at the
geometric median of the first training batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.saes.base import SAE, SAEConfig, SAEOutput, register
from saelib.saes.topk import geometric_median


@dataclass
class ReLUConfig(SAEConfig):
    pass


@register
class ReLUSAE(SAE):
    architecture = "relu"
    config_class = ReLUConfig
    config: ReLUConfig

    def __init__(self, config: ReLUConfig, generator: torch.Generator | None = None):
        super().__init__(config)
        self.init_tied_weights(generator)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))

    def forward(self, x: Tensor) -> SAEOutput:
        pre_acts = self.pre_acts(x)
        codes = torch.relu(pre_acts)
        return SAEOutput.from_dense(self.decode(codes), codes, pre_acts.detach())

    def pre_acts(self, x: Tensor) -> Tensor:
        """(batch, d_sae) pre-activations (x - b_dec) @ W_enc.T + b_enc."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)

    def encode(self, x: Tensor) -> Tensor:
        """(batch, d_sae) dense code."""
        return torch.relu(self.pre_acts(x))

    def decode(self, codes: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, codes, self.W_dec)

    @torch.no_grad()
    def on_first_batch(self, batch: Tensor) -> None:
        """Before the first training step: b_dec starts at the geometric median of ``batch``."""
        self.b_dec.copy_(geometric_median(batch))
