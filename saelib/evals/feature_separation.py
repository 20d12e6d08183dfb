"""Feature separation during training: latent co-activation and decoder cosine similarity.

How separate an SAE's latents are, in use and in geometry (e.g. under an orthogonality
penalty). Definitions:

- Co-activation, on a batch of activations: f = the SAE latents (B x d_sae, after the SAE's
  activation, e.g. TopK or ReLU; any code); latent j is active on a sample when f_j != 0. For
  i != j,
  n_ij = #(samples where i and j are both active) / #(samples where j is active).
  n_ij is asymmetric; it is computed for the ordered pairs that co-occur at least once, from the
  active (sample, latent) entries (:mod:`saelib.saes.coactivation`, shared with the
  orthogonality penalty): at most B * m^2 pairs for m active latents per sample, never a
  d_sae x d_sae matrix. That bound is small for sparse codes (TopK; a trained ReLU SAE); for a
  code where a large share of latents fire (an untrained ReLU SAE) B * m^2 can exceed d_sae^2.
  Summaries: a histogram of n_ij over those pairs, the fraction of them with n_ij above each
  threshold, and the number of co-active partners per active latent (latents i != j active
  together with j at least once).
- Decoder cosine similarity: |cos(W_dec_i, W_dec_j)| over the pairs i < j, as a histogram on
  [0, 1], the fraction of pairs above each threshold, and the max over j != i per latent (mean,
  quantiles, histogram). Computed exactly in row blocks of the upper triangle (memory about
  ``max_block_elements`` floats per block). Above ``max_latents`` latents, a seeded random subset
  of ``max_latents`` latents is used: the pair statistics are over pairs within the subset, the
  max |cos| of each sampled latent is taken over all d_sae latents.

:class:`SeparationRecorder` is a :func:`saelib.training.train_saes` hook that takes one
:class:`SeparationSnapshot` per SAE at given fractions of training.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from saelib.io import to_jsonable, write_json
from saelib.saes import SAE
from saelib.saes.coactivation import active_pair_keys, count_pairs, ordered_pairs

if TYPE_CHECKING:
    from saelib.training import StepInfo

THRESHOLDS = (0.5, 0.8, 0.9)
QUANTILES = (0.5, 0.9, 0.99, 1.0)


@dataclass
class CoactivationStats:
    n_samples: int
    n_active_latents: int  # latents active on at least one sample
    n_pairs: int  # ordered pairs (i, j), i != j, active together at least once
    n_pairs_possible: int  # ordered pairs of active latents: A * (A - 1)
    hist_edges: list[float]  # histogram of n_ij over the co-occurring pairs
    hist_counts: list[int]
    mean_n_ij: float
    frac_pairs_above: dict[float, float]  # threshold -> fraction of co-occurring pairs
    mean_partners: float  # co-active partners per active latent
    partner_quantiles: dict[float, float]


@dataclass
class DecoderCosineStats:
    d_sae: int
    n_latents_used: int  # d_sae, or max_latents when sampled
    sampled: bool
    seed: int
    n_pairs: int
    hist_edges: list[float]  # histogram of |cos| over pairs i < j
    hist_counts: list[int]
    mean_abs_cos: float
    frac_pairs_above: dict[float, float]
    max_cos_mean: float  # max over j != i of |cos(W_dec_i, W_dec_j)|, mean over latents
    max_cos_quantiles: dict[float, float]
    max_cos_hist_counts: list[int]  # same edges as hist_edges
    block_rows: int
    n_blocks: int


@dataclass
class SeparationSnapshot:
    sae_name: str
    progress: float  # the requested fraction of training
    step: int  # training steps done when it was taken
    coactivation: CoactivationStats
    decoder_cosine: DecoderCosineStats
    seconds: float  # time taken to compute it

    @classmethod
    def from_dict(cls, data: dict) -> SeparationSnapshot:
        """Inverse of its JSON form (threshold and quantile keys come back as floats)."""
        stats = {}
        for name, stats_class in (
            ("coactivation", CoactivationStats),
            ("decoder_cosine", DecoderCosineStats),
        ):
            fields = dict(data[name])
            for key, value in fields.items():
                if isinstance(value, dict):
                    fields[key] = {float(level): number for level, number in value.items()}
            stats[name] = stats_class(**fields)
        return cls(**(data | stats))


# ---------------------------------------------------------------- co-activation


@torch.no_grad()
def coactivation_pairs(
    sae: SAE, acts: Tensor, batch_size: int = 1024, max_pair_entries: int = 1 << 22
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(i, j, n_ij, count_j): every ordered co-occurring pair of latents on ``acts``, in order of
    i * d_sae + j. ``count_j`` (d_sae,) is how many samples each latent is active on.

    The pairs of active slots are taken in chunks of rows of about ``max_pair_entries`` slot
    pairs and counted as they go (:class:`_PairCounter`; bounded memory).
    """
    if len(acts) == 0:
        raise ValueError("co-activation statistics need at least one activation vector")
    device = next(sae.parameters()).device
    counter = _PairCounter(sae.d_sae, device, max_pair_entries)
    fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    for start in range(0, len(acts), batch_size):
        output = sae(acts[start : start + batch_size].to(device).float())
        fired += torch.bincount(output.active()[1], minlength=sae.d_sae)
        rows_per_chunk = max(1, max_pair_entries // output.indices.shape[1] ** 2)
        for chunk_acts, chunk_indices in zip(
            output.acts.split(rows_per_chunk), output.indices.split(rows_per_chunk), strict=True
        ):
            counter.add(chunk_acts, chunk_indices)
    i, j, together = counter.ordered_pairs()
    return i, j, together.double() / fired[j], fired  # float64: exact ratios sit on bin edges


class _PairCounter:
    """Counts of unordered pair keys: in a dense d_sae^2 table when it is small enough (no
    sort), else as sorted unique keys merged as they come (memory bounded by the pairs seen)."""

    DENSE_MAX_ENTRIES = 1 << 25  # 128 MiB of int32 counts: d_sae up to 5792

    def __init__(self, d_sae: int, device: torch.device, max_pair_entries: int):
        self.d_sae, self.max_pair_entries = d_sae, max_pair_entries
        self.table = None
        if d_sae * d_sae <= self.DENSE_MAX_ENTRIES:
            self.table = torch.zeros(d_sae * d_sae, dtype=torch.int32, device=device)
        self.keys: list[Tensor] = []
        self.counts: list[Tensor] = []

    def add(self, acts: Tensor, indices: Tensor) -> None:
        """Count the pairs of active slots of the rows of a code's ``(acts, indices)``."""
        if self.table is not None:
            keys = active_pair_keys(acts, indices, self.d_sae)[0]
            self.table.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
            return
        pairs = count_pairs(acts, indices, self.d_sae)
        self.keys.append(pairs.keys)
        self.counts.append(pairs.counts)
        if sum(len(part) for part in self.keys) > 4 * self.max_pair_entries:
            self._merge()  # bounds the memory

    def ordered_pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(i, j, count): both orderings of every pair counted, in order of i * d_sae + j."""
        if self.table is not None:  # the symmetric matrix's non-zeros come in that order
            square = self.table.view(self.d_sae, self.d_sae)
            counts = (square + square.T).flatten()
            keys = counts.nonzero().squeeze(1)
            return keys // self.d_sae, keys % self.d_sae, counts[keys].long()
        self._merge()
        first, second, together, _ = ordered_pairs(self.keys[0], self.counts[0], self.d_sae)
        order = (first * self.d_sae + second).argsort()
        return first[order], second[order], together[order]

    def _merge(self) -> None:
        merged, inverse = torch.cat(self.keys).unique(return_inverse=True)
        total = torch.zeros(len(merged), dtype=torch.long, device=merged.device)
        self.keys, self.counts = [merged], [total.index_add_(0, inverse, torch.cat(self.counts))]


def coactivation_stats(
    sae: SAE,
    acts: Tensor,
    bins: int = 20,
    thresholds: Sequence[float] = THRESHOLDS,
    batch_size: int = 1024,
) -> CoactivationStats:
    """Summaries of n_ij (see the module docstring) on ``acts`` (B, d_in)."""
    i, j, n_ij, fired = coactivation_pairs(sae, acts, batch_size)
    n_active = int((fired > 0).sum())
    partners = torch.bincount(j, minlength=sae.d_sae)[fired > 0].double()
    n_ij = n_ij.double().cpu().numpy()
    counts, edges = np.histogram(n_ij, bins=bins, range=(0.0, 1.0))
    return CoactivationStats(
        n_samples=len(acts),
        n_active_latents=n_active,
        n_pairs=len(n_ij),
        n_pairs_possible=n_active * (n_active - 1),
        hist_edges=edges.tolist(),
        hist_counts=counts.tolist(),
        mean_n_ij=_mean(n_ij),
        frac_pairs_above={t: _mean(n_ij > t) for t in thresholds},
        mean_partners=float(partners.mean()) if n_active else math.nan,
        partner_quantiles=_quantiles(partners),
    )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def _quantiles(values: Tensor, quantiles: Sequence[float] = QUANTILES) -> dict[float, float]:
    if len(values) == 0:
        return {q: math.nan for q in quantiles}
    points = torch.quantile(values.double().cpu(), torch.tensor(quantiles, dtype=torch.float64))
    return {q: float(v) for q, v in zip(quantiles, points, strict=True)}


# ---------------------------------------------------------------- decoder cosine similarity


@dataclass
class _CosineSums:
    """Running results over the blocks of the upper triangle."""

    bins: int
    thresholds: Sequence[float]
    n: int
    device: torch.device
    hist: Tensor = field(init=False)
    above: Tensor = field(init=False)
    max_cos: Tensor = field(init=False)
    total: float = 0.0
    n_blocks: int = 0

    def __post_init__(self) -> None:
        self.hist = torch.zeros(self.bins, dtype=torch.float64, device=self.device)
        self.above = torch.zeros(len(self.thresholds), dtype=torch.long, device=self.device)
        self.max_cos = torch.zeros(self.n, device=self.device)


@torch.no_grad()
def decoder_cosine_stats(
    sae: SAE,
    bins: int = 100,
    thresholds: Sequence[float] = THRESHOLDS,
    max_latents: int | None = 16_384,
    seed: int = 0,
    max_block_elements: int = 1 << 24,
) -> DecoderCosineStats:
    """Summaries of |cos(W_dec_i, W_dec_j)| (see the module docstring)."""
    directions = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    d_sae = len(directions)
    sampled = max_latents is not None and d_sae > max_latents
    if sampled:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(d_sae, generator=generator)[:max_latents].sort().values
        subset = directions[chosen.to(directions.device)]
    else:
        subset = directions
    sums = _upper_triangle(subset, bins, thresholds, max_block_elements)
    if sampled:
        sums.max_cos = _max_against_all(subset, directions, chosen, max_block_elements)
    return _cosine_result(sums, d_sae, len(subset), sampled, seed, max_block_elements)


def _block_rows(n_columns: int, max_block_elements: int) -> int:
    return max(1, min(n_columns, max_block_elements // max(n_columns, 1)))


def _upper_triangle(
    directions: Tensor, bins: int, thresholds: Sequence[float], max_block_elements: int
) -> _CosineSums:
    """|cos| over the pairs i < j, one block of rows at a time against the columns >= its start."""
    n = len(directions)
    sums = _CosineSums(bins, thresholds, n, directions.device)
    rows = _block_rows(n, max_block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        cos = (directions[start:stop] @ directions[start:].T).abs_().clamp_(max=1.0)
        square = torch.ones(stop - start, stop - start, dtype=torch.bool, device=cos.device)
        cos[:, : stop - start].masked_fill_(square.tril_(), -1.0)  # i >= j: outside the range
        _add_block(sums, cos, start, stop, thresholds)
    return sums


def _add_block(sums: _CosineSums, cos: Tensor, start: int, stop: int, thresholds) -> None:
    sums.hist += torch.histc(cos, bins=sums.bins, min=0.0, max=1.0).double()
    rows = stop - start
    sums.total += float(cos.sum(dtype=torch.float64)) + rows * (rows + 1) / 2  # masked: -1 each
    high = cos[cos > min(thresholds)] if len(thresholds) else cos[:0]  # few: one full pass
    for position, threshold in enumerate(thresholds):
        sums.above[position] += (high > threshold).sum()
    sums.max_cos[start:stop] = torch.maximum(sums.max_cos[start:stop], cos.amax(dim=1))
    sums.max_cos[start:] = torch.maximum(sums.max_cos[start:], cos.amax(dim=0))
    sums.n_blocks += 1


def _max_against_all(
    subset: Tensor, directions: Tensor, chosen: Tensor, max_block_elements: int
) -> Tensor:
    """max over j != i of |cos| for each row of ``subset`` (latent ``chosen[i]``), all columns."""
    rows = _block_rows(len(directions), max_block_elements)
    result = []
    for start in range(0, len(subset), rows):
        cos = (subset[start : start + rows] @ directions.T).abs_().clamp_(max=1.0)
        own = chosen[start : start + rows].to(cos.device)
        cos[torch.arange(len(own), device=cos.device), own] = -1.0
        result.append(cos.amax(dim=1))
    return torch.cat(result)


def _cosine_result(
    sums: _CosineSums, d_sae: int, n: int, sampled: bool, seed: int, max_block_elements: int
) -> DecoderCosineStats:
    n_pairs = n * (n - 1) // 2
    edges = torch.linspace(0.0, 1.0, sums.bins + 1, dtype=torch.float64)
    max_cos = sums.max_cos.cpu()
    max_hist = torch.histc(max_cos, bins=sums.bins, min=0.0, max=1.0)
    return DecoderCosineStats(
        d_sae=d_sae,
        n_latents_used=n,
        sampled=sampled,
        seed=seed,
        n_pairs=n_pairs,
        hist_edges=edges.tolist(),
        hist_counts=[int(c) for c in sums.hist.round().tolist()],
        mean_abs_cos=sums.total / n_pairs if n_pairs else math.nan,
        frac_pairs_above={
            t: int(c) / n_pairs if n_pairs else math.nan
            for t, c in zip(sums.thresholds, sums.above.tolist(), strict=True)
        },
        max_cos_mean=float(max_cos.double().mean()) if n > 1 else math.nan,
        max_cos_quantiles=_quantiles(max_cos if n > 1 else max_cos[:0]),
        max_cos_hist_counts=[int(c) for c in max_hist.tolist()],
        block_rows=_block_rows(n, max_block_elements),
        n_blocks=sums.n_blocks,
    )


# ---------------------------------------------------------------- training hook


class SeparationRecorder:
    """``train_saes`` hook: one snapshot per SAE at each fraction of training.

    The snapshot for fraction p is taken right after the step that brings an SAE's completed
    steps to ceil(p * total_steps) (at least 1). With ``path``, snapshots are written there as
    they are taken and read back when the recorder is made again, so a resumed run keeps the
    points it passed before the interruption.
    """

    def __init__(
        self,
        eval_acts: Tensor,
        at_progress: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        *,
        total_steps: int,
        decoder_max_latents: int | None = 16_384,
        seed: int = 0,
        path: str | Path | None = None,
    ):
        if total_steps < 1 or not all(0.0 < p <= 1.0 for p in at_progress):
            raise ValueError("total_steps must be >= 1 and every progress in (0, 1]")
        self.eval_acts = eval_acts
        self.total_steps = total_steps
        self.at_progress = tuple(at_progress)
        self.target_steps = {p: max(1, math.ceil(round(p * total_steps, 9))) for p in at_progress}
        self.decoder_max_latents = decoder_max_latents
        self.seed = seed
        self.path = Path(path) if path is not None else None
        self.snapshots: dict[str, list[SeparationSnapshot]] = {}
        if self.path is not None and self.path.exists():
            self._restore(self.path)

    def __call__(self, info: StepInfo) -> None:
        """After a training step: a snapshot of each model that has just reached a target."""
        for result in info.results:
            taken = {s.progress for s in self.snapshots.get(result.name, [])}
            for progress, target in self.target_steps.items():
                if result.steps == target and progress not in taken:
                    snapshot = self.snapshot(result.name, result.model, progress, result.steps)
                    self.snapshots.setdefault(result.name, []).append(snapshot)
                    if self.path is not None:
                        self.save(self.path)

    def snapshot(self, name: str, sae: SAE, progress: float, step: int) -> SeparationSnapshot:
        started = time.perf_counter()
        coactivation = coactivation_stats(sae, self.eval_acts)
        cosine = decoder_cosine_stats(sae, max_latents=self.decoder_max_latents, seed=self.seed)
        seconds = time.perf_counter() - started
        return SeparationSnapshot(name, progress, step, coactivation, cosine, seconds)

    def _restore(self, path: Path) -> None:
        stored = json.loads(path.read_text())
        if stored["total_steps"] != self.total_steps:
            raise ValueError(
                f"{path} holds snapshots of a {stored['total_steps']}-step run, "
                f"not of this {self.total_steps}-step one"
            )
        for name, taken in stored["snapshots"].items():
            self.snapshots[name] = [SeparationSnapshot.from_dict(item) for item in taken]

    def hook_state(self, name: str) -> dict | None:
        """The snapshots of model ``name``: kept in its checkpoint, so a run that trained it in
        another process (SAE parallel) or before an interruption hands them over."""
        taken = self.snapshots.get(name)
        return None if taken is None else {"snapshots": [to_jsonable(s) for s in taken]}

    def load_hook_state(self, name: str, state: dict) -> None:
        self.snapshots[name] = [SeparationSnapshot.from_dict(item) for item in state["snapshots"]]

    def save(self, path: str | Path) -> Path:
        return write_json(
            path,
            {
                "total_steps": self.total_steps,
                "at_progress": self.at_progress,
                "n_eval_samples": len(self.eval_acts),
                "snapshots": self.snapshots,
            },
        )
