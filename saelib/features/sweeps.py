"""The two sweeps over the stored codes that give each latent's activation statistics.

The first sweep gives density, mean, max and the top examples (a running top-n merge per latent
across batches). The second needs every latent's max: it gives the histograms (equal bins from 0
to the max) and the quantile-group samples. Group g of a latent holds its activations in
[g/G, (g+1)/G) of its max (the last group includes the max); each (latent, group) keeps the
entries with the smallest random keys, a hash of (row, latent, seed): a uniform sample without
replacement that does not depend on how the rows are batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saelib.features.codes import Codes

if TYPE_CHECKING:
    from saelib.features.stats import FeatureStatsConfig


def top_per_group(
    groups: Tensor, scores: Tensor, payload: Tensor, n_groups: int, n_keep: int
) -> tuple[Tensor, Tensor]:
    """The ``n_keep`` largest scores of each group, largest first, with their payloads.

    Returns (n_groups, n_keep) scores (float64, -inf = empty slot) and payloads (-1 = empty).
    Equal scores keep their input order.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order)) - starts[sorted_groups]
    keep = rank < n_keep
    kept_groups, kept_rank, kept = sorted_groups[keep], rank[keep], order[keep]
    top_scores = torch.full((n_groups, n_keep), -torch.inf, dtype=torch.float64)
    top_payload = torch.full((n_groups, n_keep), -1, dtype=torch.int64)
    top_scores[kept_groups, kept_rank] = scores[kept].double()
    top_payload[kept_groups, kept_rank] = payload[kept].long()
    return top_scores, top_payload


class _TopKeeper:
    """The ``n_keep`` largest (score, payload) of each group over batches, merged exactly."""

    def __init__(self, n_groups: int, n_keep: int):
        self.scores = torch.full((n_groups, n_keep), -torch.inf, dtype=torch.float64)
        self.payload = torch.full((n_groups, n_keep), -1, dtype=torch.int64)

    def add(self, groups: Tensor, scores: Tensor, payload: Tensor) -> None:
        n_groups, n_keep = self.scores.shape
        if n_keep == 0:
            return
        may_enter = scores.double() > self.scores[groups, -1]  # skip hopeless entries early
        batch = top_per_group(
            groups[may_enter], scores[may_enter], payload[may_enter], n_groups, n_keep
        )
        merged_scores = torch.cat([self.scores, batch[0]], dim=1)
        self.scores, where = merged_scores.topk(n_keep, dim=1)
        self.payload = torch.cat([self.payload, batch[1]], dim=1).gather(1, where)


@dataclass
class Summary:
    """What the first sweep gives."""

    fired: Tensor  # (d_sae,) int64
    total: Tensor  # (d_sae,) float64 sum of active values
    maximum: Tensor  # (d_sae,) float32
    top_scores: Tensor  # (d_sae, n_top) float64, -inf = empty
    top_rows: Tensor  # (d_sae, n_top) int64, -1 = empty


def summarise(codes: Codes, n_top: int, batch_size: int) -> Summary:
    """The first sweep: fires, sum and max of each latent, and its ``n_top`` largest rows."""
    d_sae = codes.d_sae
    fired = torch.zeros(d_sae, dtype=torch.int64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    maximum = torch.zeros(d_sae)
    top = _TopKeeper(d_sae, n_top)
    for start in range(0, len(codes), batch_size):
        rows, latents, values = codes.active(start, start + batch_size)
        fired += torch.bincount(latents, minlength=d_sae)
        total.index_add_(0, latents, values.double())
        maximum.scatter_reduce_(0, latents, values, reduce="amax")
        top.add(latents, values, rows)
    return Summary(fired, total, maximum, top.scores, top.payload)


@dataclass
class Samples:
    """The quantile-group samples, one slot per (group, sample), largest first in a group."""

    rows: Tensor  # (d_sae, groups * n_per_group) int64, -1 = empty slot
    values: Tensor  # (d_sae, groups * n_per_group) float32, 0 = empty slot
    group: Tensor  # (d_sae, groups * n_per_group) int64, -1 = empty slot


def histograms_and_samples(
    codes: Codes, maximum: Tensor, config: FeatureStatsConfig
) -> tuple[Tensor, Tensor, Samples]:
    """The second sweep: (histogram edges, counts, quantile samples)."""
    d_sae, bins, n_groups = codes.d_sae, config.histogram_bins, config.n_quantile_groups
    edges = maximum.unsqueeze(1) * (torch.arange(bins + 1) / bins)
    group_edges = group_boundaries(maximum, n_groups)
    counts = torch.zeros(d_sae * bins, dtype=torch.int64)
    keeper = _TopKeeper(d_sae * n_groups, config.n_per_group)
    for start in range(0, len(codes), config.batch_size):
        rows, latents, values = codes.active(start, start + config.batch_size)
        column = (values.unsqueeze(1) >= edges[latents, 1:bins]).sum(1)  # numpy's binning
        counts += torch.bincount(latents * bins + column, minlength=d_sae * bins)
        group = (values.unsqueeze(1) >= group_edges[latents]).sum(1)
        keys = random_keys(rows, latents, d_sae, config.seed)
        keeper.add(latents * n_groups + group, -keys, rows)  # smallest keys: a uniform sample
    rows = keeper.payload.view(d_sae, n_groups, config.n_per_group)
    return edges, counts.view(d_sae, bins), _order_samples(codes, rows)


def group_boundaries(maximum: Tensor, n_groups: int) -> Tensor:
    """(d_sae, n_groups - 1) inner boundaries of the quantile groups: max * g / n_groups."""
    return maximum.unsqueeze(1) * (torch.arange(1, n_groups) / n_groups)


def _order_samples(codes: Codes, rows: Tensor) -> Samples:
    """Flatten (d_sae, groups, n) samples to slots, largest activation first in each group."""
    d_sae, n_groups, n_per_group = rows.shape
    latents = torch.arange(d_sae).view(d_sae, 1, 1).expand_as(rows)
    present = rows >= 0
    values = torch.zeros(rows.shape)
    values[present] = codes.lookup(rows[present], latents[present])
    order = values.masked_fill(~present, -1.0).argsort(dim=2, descending=True, stable=True)
    rows, values, present = rows.gather(2, order), values.gather(2, order), present.gather(2, order)
    group = torch.arange(n_groups).view(1, n_groups, 1).expand_as(rows).masked_fill(~present, -1)
    shape = (d_sae, n_groups * n_per_group)
    return Samples(rows.reshape(shape), values.reshape(shape), group.reshape(shape))


def random_keys(rows: Tensor, latents: Tensor, d_sae: int, seed: int) -> Tensor:
    """A uniform [0, 1) float64 key per (row, latent): splitmix64 of the pair and the seed.

    A key depends on its entry only, so keeping the smallest keys per group gives the same
    sample however the rows are batched. int64 products wrap, as the hash needs.
    """
    x = rows.long() * d_sae + latents.long() + _signed((seed + 1) * 0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).double() / float(1 << 53)


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)
