"""The Matryoshka loss: every prefix of the dictionary must reconstruct the input on its own.

For prefix sizes m, the reconstruction from latents [0, m) is x_hat_m = f[:, :m] @ W_dec[:m] +
b_dec, and the loss is the mean over the sizes of reconstruction_loss(x, x_hat_m). A latent
with a low index serves every longer prefix, so the frequent, general directions settle at low
indices and the index orders latents by construction: Bussmann et al. 2025 ("Learning
multi-level features with Matryoshka SAEs") use fixed nested sizes (``prefixes``; they sum over
the prefixes, which only rescales the mean by their number); Nabeshima 2024 draws prefix sizes
at random each step (``n_random``).

x_hat_m is computed as the model's full reconstruction minus the contribution of latents
[m, d_sae) (one pass over the code for all sizes), so anything the model adds outside the code
(a ReLU SAE's output skip) counts in every prefix, as b_dec does; for an SAE whose output is
the code path it is exactly the formula above. The code is read through its dense view, so the
loss trains ReLU and TopK SAEs alike. A sparsity term is added for an SAE that needs one:
``l1_coefficient`` times the decoder-norm-weighted L1 of :mod:`saelib.training.l1` (ReLU), or
``auxk_alpha`` times the AuxK loss of :mod:`saelib.training.losses` (TopK).

Random sizes are drawn uniformly, distinct, from 1..d_sae-1, and the full width is always
added; the draw is seeded by (``seed``, step), so a run and its resume see the same sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.saes import SAEOutput
from saelib.training.l1 import weighted_l1
from saelib.training.losses import (
    AuxKForm,
    ReconstructionLoss,
    TrainState,
    auxk_loss,
    check_auxk_capable,
    reconstruction_loss,
    reconstruction_mse,
)
from saelib.training.resampling import step_generator

__all__ = ["MatryoshkaLoss", "prefix_reconstructions"]


@dataclass
class MatryoshkaLoss:
    """Terms: ``recon`` (the full width's reconstruction, convention ``reconstruction``; watched
    for divergence), ``matryoshka`` (mean over prefix sizes), ``mse`` (full width, per element,
    no gradient), ``l1`` / ``auxk`` when their weight is positive, and ``total`` = matryoshka +
    l1_coefficient * l1 + auxk_alpha * auxk.

    Give either fixed ``prefixes`` (sizes in 1..d_sae; include d_sae for the whole dictionary to
    be trained to reconstruct) or ``n_random`` sizes drawn per step (plus the full width).
    """

    prefixes: tuple[int, ...] | None = None
    n_random: int = 0
    reconstruction: ReconstructionLoss = "l2"
    l1_coefficient: float = 0.0
    auxk_alpha: float = 0.0
    k_aux: int | None = None  # default d_in // 2, as TopKLoss
    auxk_form: AuxKForm = "per_dim_variance"
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.prefixes is None) == (self.n_random <= 0):
            raise ValueError("MatryoshkaLoss needs either fixed prefixes or n_random > 0, not both")
        if self.prefixes is not None:
            self.prefixes = tuple(int(size) for size in self.prefixes)
            if not self.prefixes or min(self.prefixes) < 1:
                raise ValueError(f"prefix sizes must be positive, got {self.prefixes}")

    def check(self, model: nn.Module) -> None:
        """Refuse a model without a decoder, prefixes longer than it, or AuxK it cannot do."""
        W_dec = getattr(model, "W_dec", None)
        if not isinstance(W_dec, Tensor):
            raise TypeError(f"MatryoshkaLoss needs a W_dec; {type(model).__name__} has none")
        if self.prefixes is not None and max(self.prefixes) > W_dec.shape[0]:
            raise ValueError(f"prefix sizes {self.prefixes} exceed d_sae={W_dec.shape[0]}")
        if self.auxk_alpha > 0:
            check_auxk_capable(model)

    def sizes(self, d_sae: int, step: int) -> tuple[int, ...]:
        """The prefix sizes used at ``step``: the fixed ones, or this step's draw."""
        if self.prefixes is not None:
            return self.prefixes
        generator = step_generator(self.seed, step)
        n = min(self.n_random, d_sae - 1)
        drawn = (torch.randperm(d_sae - 1, generator=generator)[:n] + 1).tolist()
        return (*sorted(drawn), d_sae)

    def __call__(
        self, sae: nn.Module, x: Tensor, output: SAEOutput, state: TrainState
    ) -> dict[str, Tensor]:
        self.check(sae)
        sizes = self.sizes(sae.W_dec.shape[0], state.step)
        recons = prefix_reconstructions(sae, output, sizes)
        losses = [reconstruction_loss(x, recons[size], self.reconstruction) for size in sizes]
        matryoshka = torch.stack(losses).mean()
        terms = {
            "recon": reconstruction_loss(x, output.recon, self.reconstruction),
            "matryoshka": matryoshka,
            "mse": reconstruction_mse(x, output.recon.detach()),
        }
        total = matryoshka
        if self.l1_coefficient > 0:
            terms["l1"] = weighted_l1(sae, output)
            total = total + self.l1_coefficient * terms["l1"]
        if self.auxk_alpha > 0:
            k_aux = self.k_aux or sae.d_in // 2
            terms["auxk"] = auxk_loss(sae, x, output, state.dead, k_aux, self.auxk_form)
            total = total + self.auxk_alpha * terms["auxk"]
        return terms | {"total": total}


def prefix_reconstructions(
    sae: nn.Module, output: SAEOutput, sizes: tuple[int, ...]
) -> dict[int, Tensor]:
    """{m: reconstruction from latents [0, m)} for each size: the full reconstruction minus the
    decoded tail f[:, m:] @ W_dec[m:], the tails summed from the end so that all sizes together
    cost one decode."""
    codes, W_dec = output.dense(), sae.W_dec
    recons: dict[int, Tensor] = {}
    tail, end = None, W_dec.shape[0]
    for size in sorted(set(sizes), reverse=True):
        if size < end:
            segment = codes[:, size:end] @ W_dec[size:end]
            tail = segment if tail is None else tail + segment
            end = size
        recons[size] = output.recon if tail is None else output.recon - tail
    return recons
