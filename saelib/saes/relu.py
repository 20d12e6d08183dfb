"""ReLU sparse autoencoder, trained with an L1 penalty (:class:`saelib.training.l1.L1Loss`).

encode: f = relu(pre), pre = (x - b_dec) @ W_enc.T + b_enc, a dense code with a varying number
of active latents per row. decode: x_hat = f @ W_dec + b_dec.

The decoder directions (rows of W_dec) start as random unit vectors, the encoder as their
transpose, and stay at unit norm: like a TopK SAE it keeps the base class's optimizer-step hooks
(drop the gradient along each direction before the update, renormalise after it). So every
eval that reads W_dec rows as directions applies unchanged, and the L1 term's decoder-norm
factor (the SAELens / Anthropic form, sum_i f_i ||W_dec_i||) is 1; the loss keeps it so that it
stays right for a model whose decoder norms are left free. The decoder bias starts at the
geometric median of the first training batch.

Encoder options (off by default; any combination composes):

- ``layer_norm``: LayerNorm (learned scale and shift) over the d_sae pre-activations, before
  the ReLU: pre = LN((x - b_dec) @ W_enc.T + b_enc).
- ``skip="encoder"``: pre += skip_scale * Linear(d_in, d_sae)(x), a dense path into the code.
- ``skip="output"``: x_hat += skip_scale * Linear(d_in, d_in)(x), a dense path around the code.
  It can reconstruct x without any active latent, so the reconstruction no longer measures the
  dictionary: :meth:`ReLUSAE.code_path` gives the part that passes through the code, and
  :func:`saelib.evals.encoder_honesty.code_path_explained_variance` measures it.
- ``attention``: single-head self-attention across the rows of the batch, pre += softmax(q k^T /
  sqrt(d_in)) v with q, k = Linear(d_in, d_in)(x) and v = Linear(d_in, d_sae)(x). A row's code
  then depends on the other rows of its batch
  (:func:`saelib.evals.encoder_honesty.batch_dependence` measures how much).

LayerNorm applies first, then the encoder skip and the attention are added. Every extra
parameter is drawn from the generator after the base weights (in the order skip, attention), so
a plain SAE's initialisation and checkpoint are unchanged by the options' existence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from saelib.saes.base import SAE, SAEConfig, SAEOutput, register
from saelib.saes.topk import geometric_median

SkipPosition = Literal["none", "encoder", "output"]
SKIP_POSITIONS = ("none", "encoder", "output")


@dataclass
class ReLUConfig(SAEConfig):
    layer_norm: bool = False
    skip: SkipPosition = "none"
    skip_scale: float = 0.1
    attention: bool = False

    def validate(self) -> None:
        super().validate()
        if self.skip not in SKIP_POSITIONS:
            raise ValueError(f"skip must be one of {SKIP_POSITIONS}, got {self.skip!r}")


def seeded_linear(d_in: int, d_out: int, generator: torch.Generator | None) -> nn.Linear:
    """nn.Linear with PyTorch's default uniform(+-1/sqrt(d_in)) init, drawn from ``generator``
    (weight, then bias) instead of the global RNG, so that the SAE's init stays reproducible."""
    layer = nn.utils.skip_init(nn.Linear, d_in, d_out)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        for parameter in (layer.weight, layer.bias):
            values = torch.rand(parameter.shape, generator=generator)
            parameter.copy_((2 * values - 1) * bound)
    return layer


class BatchAttention(nn.Module):
    """Single-head self-attention across the rows of a batch: row b's output is the
    softmax(q_b . k_c / sqrt(d_in))-weighted mean over rows c of v_c."""

    def __init__(self, d_in: int, d_out: int, generator: torch.Generator | None = None):
        super().__init__()
        self.q = seeded_linear(d_in, d_in, generator)
        self.k = seeded_linear(d_in, d_in, generator)
        self.v = seeded_linear(d_in, d_out, generator)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).T / math.sqrt(x.shape[-1])
        return torch.softmax(scores, dim=-1) @ self.v(x)


@register
class ReLUSAE(SAE):
    architecture = "relu"
    config_class = ReLUConfig
    config: ReLUConfig

    def __init__(self, config: ReLUConfig, generator: torch.Generator | None = None):
        super().__init__(config)
        self.init_tied_weights(generator)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        d_in, d_sae = config.d_in, config.d_sae
        if config.layer_norm:
            self.layer_norm = nn.LayerNorm(d_sae)
        if config.skip != "none":
            d_out = d_sae if config.skip == "encoder" else d_in
            self.skip = seeded_linear(d_in, d_out, generator)
        if config.attention:
            self.attention = BatchAttention(d_in, d_sae, generator)

    def forward(self, x: Tensor) -> SAEOutput:
        pre_acts = self.pre_acts(x)
        codes = torch.relu(pre_acts)
        recon = self.code_path(codes)
        if self.config.skip == "output":
            recon = recon + self.config.skip_scale * self.skip(x)
        return SAEOutput.from_dense(recon, codes, pre_acts.detach())

    def pre_acts(self, x: Tensor) -> Tensor:
        """(batch, d_sae) pre-activations (x - b_dec) @ W_enc.T + b_enc, through the encoder
        options that are on. With attention, a row's value depends on the whole batch."""
        pre_acts = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)
        if self.config.layer_norm:
            pre_acts = self.layer_norm(pre_acts)
        if self.config.skip == "encoder":
            pre_acts = pre_acts + self.config.skip_scale * self.skip(x)
        if self.config.attention:
            pre_acts = pre_acts + self.attention(x)
        return pre_acts

    def encode(self, x: Tensor) -> Tensor:
        """(batch, d_sae) dense code."""
        return torch.relu(self.pre_acts(x))

    def decode(self, codes: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, codes, self.W_dec)

    def code_path(self, codes: Tensor) -> Tensor:
        """The reconstruction through the sparse code alone, W_dec f + b_dec: the whole
        reconstruction unless ``skip="output"`` adds a dense path around the code."""
        return self.decode(codes)

    @torch.no_grad()
    def on_first_batch(self, batch: Tensor) -> None:
        """Before the first training step: b_dec starts at the geometric median of ``batch``."""
        self.b_dec.copy_(geometric_median(batch))
