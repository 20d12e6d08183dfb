"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024; Gemma Scope's architecture).

encode: f = relu(pre) * (pre > threshold), pre = (x - b_dec) @ W_enc.T + b_enc, one threshold
per latent (the relu only matters for a negative threshold; SAELens applies it too).
decode: x_hat = f @ W_dec + b_dec. saelib has no trainer for it (its threshold needs a
straight-through estimator of the step): it is here so that published JumpReLU SAEs (SAELens's
format, :mod:`saelib.saes.formats`) work with every eval, the feature statistics and explorer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.saes.base import SAE, SAEConfig, SAEOutput, register


@dataclass
class JumpReLUConfig(SAEConfig):
    pass


@register
class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    config_class = JumpReLUConfig
    config: JumpReLUConfig

    def __init__(self, config: JumpReLUConfig, generator: torch.Generator | None = None):
        super().__init__(config)
        self.init_tied_weights(generator)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        self.threshold = nn.Parameter(torch.zeros(config.d_sae))

    def forward(self, x: Tensor) -> SAEOutput:
        pre_acts = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)
        codes = self._jump(pre_acts)
        return SAEOutput.from_dense(self.decode(codes), codes, pre_acts.detach())

    def encode(self, x: Tensor) -> Tensor:
        """(batch, d_sae) dense code."""
        return self._jump(torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T))

    def _jump(self, pre_acts: Tensor) -> Tensor:
        return torch.relu(pre_acts) * (pre_acts > self.threshold)

    def decode(self, codes: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, codes, self.W_dec)
