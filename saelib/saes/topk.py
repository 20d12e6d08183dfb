"""TopK sparse autoencoder (Gao et al. 2024; as in dictionary_learning and sparsify).

encode: pre = (x - b_dec) @ W_enc.T + b_enc; keep the k largest pre-activations per row, ReLU.
decode: x_hat = sum over the k kept latents of act * W_dec[latent] + b_dec.
The decoder directions (rows of W_dec) have unit norm. The decoder bias is optional; when used it
starts at the geometric median of the first training batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.saes.base import SAE, SAEConfig, SAEOutput, register
from saelib.saes.sparse_ops import LatentBags, gather_preacts, preact_columns, sparse_decode, top_k

# AuxK over the dead latents with dense products while they number at most this many times
# k_aux (TopKSAE.decode_aux): on CPU (d_in 576, k_aux 288, batch 1024, forward and backward) it
# took 0.26 of the sparse path's time at 1.6 k_aux dead latents, 0.46 at 4, 0.69 at 8, 1.03 at 12
AUX_DENSE_FACTOR = 8.0


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    use_decoder_bias: bool = True

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must lie in 1..d_sae={self.d_sae}, got k={self.k}")


@register
class TopKSAE(SAE):
    architecture = "topk"
    config_class = TopKConfig
    config: TopKConfig

    def __init__(self, config: TopKConfig, generator: torch.Generator | None = None):
        super().__init__(config)
        self.init_tied_weights(generator)
        bias = torch.zeros(config.d_in)
        if config.use_decoder_bias:
            self.b_dec = nn.Parameter(bias)
        else:
            self.register_buffer("b_dec", bias)  # stays zero, kept for a uniform formula

    @property
    def k(self) -> int:
        return self.config.k

    def forward(self, x: Tensor, k: int | None = None) -> SAEOutput:
        acts, indices, pre_acts, bags = self._encode(x, k)
        recon = sparse_decode(acts, indices, self.W_dec, bags) + self.b_dec
        return SAEOutput(recon, acts, indices, self.d_sae, pre_acts)

    def encode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(acts, indices, detached dense pre-activations) of the top-k latents per row."""
        return self._encode(x, k)[:3]

    def _encode(self, x: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor, LatentBags]:
        with torch.no_grad():
            pre_acts = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)
        values, indices = top_k(pre_acts, k or self.k)
        bags = LatentBags(indices, self.d_sae)  # one grouping for both weight gradients
        acts = gather_preacts(x, self.b_dec, self.W_enc, self.b_enc, values, indices, bags)
        return torch.relu(acts), indices, pre_acts, bags

    def decode(self, acts: Tensor, indices: Tensor) -> Tensor:
        return sparse_decode(acts, indices, self.W_dec) + self.b_dec

    def encode_aux(self, x: Tensor, pre_acts: Tensor, dead: Tensor, k_aux: int):
        """Top-``k_aux`` latents among the ``dead`` ones (for the AuxK loss)."""
        masked = pre_acts.masked_fill(~dead, float("-inf"))
        values, indices = masked.topk(min(k_aux, int(dead.sum())), dim=-1, sorted=False)
        acts = gather_preacts(x, self.b_dec, self.W_enc, self.b_enc, values, indices)
        return torch.relu(acts), indices

    def decode_aux(
        self,
        x: Tensor,
        pre_acts: Tensor,
        dead: Tensor,
        k_aux: int,
        dense_factor: float = AUX_DENSE_FACTOR,
    ) -> Tensor:
        """AuxK's estimate of the error, without the decoder bias: the top-``k_aux`` dead
        latents of each row, decoded.

        While the dead latents are few (at most ``dense_factor * k_aux``), dense products over
        the dead latents alone do it: their columns of ``pre_acts``, zeroed outside each row's
        top ``k_aux`` (a zero activates nothing and passes no gradient through the ReLU), with
        the encoder's gradients of those columns, times their decoder rows. That is faster than
        gathering and scattering k_aux of d_sae latents per row (:meth:`encode_aux`, used beyond
        it) and gives the same values and gradients.
        """
        dead_ids = dead.nonzero().squeeze(1)
        if len(dead_ids) > dense_factor * k_aux:
            acts, indices = self.encode_aux(x, pre_acts, dead, k_aux)
            return sparse_decode(acts, indices, self.W_dec)
        values = pre_acts.index_select(1, dead_ids)
        if k_aux < len(dead_ids):
            top, chosen = values.topk(k_aux, dim=-1, sorted=False)
            values = torch.zeros_like(values).scatter_(1, chosen, top)
        # index_select, not [dead_ids]: its backward (index_add_) beats index_put_'s with threads
        W, b = self.W_enc.index_select(0, dead_ids), self.b_enc.index_select(0, dead_ids)
        acts = torch.relu(preact_columns(x, self.b_dec, W, b, values))
        return acts @ self.W_dec.index_select(0, dead_ids)

    def on_first_batch(self, batch: Tensor) -> None:
        """Before the first training step: place the decoder bias."""
        self.init_decoder_bias(batch)

    @torch.no_grad()
    def init_decoder_bias(self, batch: Tensor) -> None:
        """Start b_dec at the geometric median of ``batch`` (no-op without a decoder bias)."""
        if self.config.use_decoder_bias:
            self.b_dec.copy_(geometric_median(batch))


@torch.no_grad()
def geometric_median(points: Tensor, iterations: int = 100, tolerance: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (updated - median).norm() <= tolerance * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median
