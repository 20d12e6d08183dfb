"""Whether a trained SAE's latent index orders its latents by frequency (low index = frequent).

- :func:`latent_frequency`: per latent, the fraction of the rows of ``x`` on which it fires
  (f_i > eps, eps = 1e-4 as in training's :class:`saelib.training.ordering.FrequencyTracker`).
- :func:`index_frequency_spearman`: Spearman's rank correlation rho between the latent index
  (0, 1, ..., d_sae - 1) and the frequency. Sign convention: rho = -1 when frequency strictly
  falls with the index (the ordering sought: low indices fire more), +1 when it strictly rises,
  about 0 for an unordered dictionary. Ties (e.g. many latents that never fire) take the mean of
  the ranks they span, as in scipy.stats.spearmanr; rho is NaN when every frequency is equal.
- :func:`fraction_out_of_order`: the fraction of adjacent pairs (i, i + 1) with p_{i+1} > p_i
  (strictly; equal neighbours are in order): 0 for a sorted dictionary, about 1/2 for a random
  one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelib.saes import SAE

__all__ = [
    "fraction_out_of_order",
    "index_frequency_spearman",
    "latent_frequency",
    "ordering_metrics",
    "average_ranks",
]


@torch.no_grad()
def latent_frequency(sae: SAE, x: Tensor, batch_size: int = 1024, eps: float = 1e-4) -> Tensor:
    """(d_sae,) float64 fraction of the rows of ``x`` on which each latent's activation exceeds
    ``eps``, on the CPU. Batches are consecutive rows (an SAE with attention across the batch
    sees the same batches as the other evals with the same ``batch_size``)."""
    device = next(sae.parameters()).device
    counts = torch.zeros(sae.d_sae, dtype=torch.float64)
    for chunk in x.split(batch_size):
        _, latents, values = sae(chunk.to(device)).active()
        fired = latents[values > eps].cpu()
        counts += torch.bincount(fired, minlength=sae.d_sae).to(torch.float64)
    return counts / max(len(x), 1)


def average_ranks(values: Tensor) -> Tensor:
    """(n,) float64 ranks 1..n of ``values``; tied values share the mean of their ranks."""
    values = values.detach().double().cpu().flatten()
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    _, groups = torch.unique(values, return_inverse=True)
    sums = torch.zeros(int(groups.max()) + 1 if len(values) else 0, dtype=torch.float64)
    sums.index_add_(0, groups, ranks)
    sizes = torch.bincount(groups, minlength=len(sums)).double()
    return (sums / sizes)[groups]


def index_frequency_spearman(frequency: Tensor) -> float:
    """Spearman's rho between latent index and ``frequency`` (negative: low indices fire more).

    The Pearson correlation of the index with the average ranks of the frequencies (the index
    has no ties, so its ranks are itself). NaN when the frequencies are all equal or fewer than
    two."""
    ranks = average_ranks(frequency)
    if len(ranks) < 2:
        return math.nan
    index = torch.arange(len(ranks), dtype=torch.float64)
    centred_ranks, centred_index = ranks - ranks.mean(), index - index.mean()
    spread = centred_ranks.norm() * centred_index.norm()
    if float(spread) == 0:
        return math.nan
    return float((centred_ranks * centred_index).sum() / spread)


def fraction_out_of_order(frequency: Tensor) -> float:
    """Fraction of adjacent pairs with p_{i+1} > p_i (NaN with fewer than two latents)."""
    frequency = frequency.detach().double().cpu().flatten()
    if len(frequency) < 2:
        return math.nan
    return float((frequency[1:] > frequency[:-1]).double().mean())


def ordering_metrics(frequency: Tensor) -> dict[str, float]:
    """Both ordering measures and the share of latents that never fired, as one record."""
    return {
        "index_frequency_spearman": index_frequency_spearman(frequency),
        "fraction_out_of_order": fraction_out_of_order(frequency),
        "fraction_never_fired": float((frequency.detach().cpu() == 0).double().mean()),
    }
