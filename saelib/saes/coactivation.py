"""Pairs of latents active together in the rows of a code, counted from its active entries.

One counting serves the orthogonality penalty (one training batch) and the feature-separation
eval (a set of vectors, batch by batch). It works on the slot view ``(acts, indices)`` of an
:class:`~saelib.saes.SAEOutput`: a zero value is an inactive slot (a TopK latent cut by the
ReLU, or the padding of a variable-k code), and the latents of one row's slots are distinct.
A batch whose busiest row has m slots costs B * m (m - 1) / 2 slot pairs: cheap for sparse
codes (TopK, a trained ReLU SAE), more than a d_sae x d_sae matrix when m nears d_sae.

Each unordered pair {i, j} is counted once (slots a < b, or a <= b with the diagonal), which
halves the sort that dominates the cost; :func:`ordered_pairs` then yields (i, j) and (j, i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PairCounts:
    """Unordered pairs {low, high} active together in a batch, with the entries behind them."""

    keys: Tensor  # (U,) sorted, unique low * d_sae + high, low <= high
    counts: Tensor  # (U,) rows where both latents are active
    slots: tuple[Tensor, Tensor]  # (a, b): the slot pairs of a row considered
    entry_mask: Tensor  # (B, T) bool: slot pairs (a, b) of each row with both slots active
    entry_pair: Tensor  # (E,) the unordered pair (index into keys) of each masked entry


@torch.no_grad()
def count_pairs(
    acts: Tensor, indices: Tensor, d_sae: int, include_diagonal: bool = False
) -> PairCounts:
    """Count, for every unordered pair of latents, the rows of ``(acts, indices)`` where both
    are active. With ``include_diagonal`` a latent also pairs with itself (count = its fires)."""
    entry_keys, slots, both = active_pair_keys(acts, indices, d_sae, include_diagonal)
    keys, entry_pair, counts = torch.unique(entry_keys, return_inverse=True, return_counts=True)
    return PairCounts(keys, counts, slots, both, entry_pair)


@torch.no_grad()
def active_pair_keys(
    acts: Tensor, indices: Tensor, d_sae: int, include_diagonal: bool = False
) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """(keys, (a, b), both): low * d_sae + high of every pair of active slots of every row, the
    slot pairs considered, and the (B, T) mask of those with both slots active."""
    m = indices.shape[1]
    offset = 0 if include_diagonal else 1
    a, b = torch.triu_indices(m, m, offset=offset, device=indices.device)
    active = acts != 0
    both = active[:, a] & active[:, b]
    low = torch.minimum(indices[:, a], indices[:, b])[both]
    high = torch.maximum(indices[:, a], indices[:, b])[both]
    return low * d_sae + high, (a, b), both


def ordered_pairs(
    keys: Tensor, counts: Tensor, d_sae: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(first, second, counts, unordered) of both orderings of each unordered pair in ``keys``.

    The unordered pairs come first in key order, then their reversals; a diagonal pair (i, i)
    has one ordering only. ``unordered`` is each ordered pair's index into ``keys``.
    """
    low, high = keys // d_sae, keys % d_sae
    pair_index = torch.arange(len(keys), device=keys.device)
    reverse = low != high
    first = torch.cat([low, high[reverse]])
    second = torch.cat([high, low[reverse]])
    return (
        first,
        second,
        torch.cat([counts, counts[reverse]]),
        torch.cat([pair_index, pair_index[reverse]]),
    )
