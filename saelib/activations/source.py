"""Activation sources: what a training loop reads its batches from.

A source hands out the rows of training step ``step`` as a pure function of (seed, step), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would, and names its
data with a cheap, stable fingerprint that checkpoints record.

- :class:`TensorSource` wraps an in-memory tensor: each epoch a fresh permutation of the rows.
- :class:`ShardedSource` streams a harvest cache folder shard by shard and never holds the whole
  set: each epoch a seeded permutation of the shards, taken in windows of ``shards_in_memory``
  shards whose rows are shuffled together. Only the current window is kept in memory.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from saelib.activations.cache import (
    CorruptCacheError,
    cache_folder,
    read_meta,
    read_shard,
    shard_row_counts,
)
from saelib.activations.harvest import HarvestConfig, split_rows_by_document

Tensor = torch.Tensor


@runtime_checkable
class ActivationSource(Protocol):
    """Rows of activation vectors in a seeded order, one batch per training step."""

    @property
    def n_rows(self) -> int:
        """Vectors per epoch."""
        ...

    @property
    def d(self) -> int:
        """Vector width."""
        ...

    def fingerprint(self) -> str:
        """Names the data in checkpoints (stable and cheap)."""
        ...

    def batch(self, step: int, batch_size: int, seed: int) -> Tensor:
        """The rows of training step ``step``: a pure function of (seed, step)."""
        ...


def as_source(data: Tensor | ActivationSource) -> ActivationSource:
    """A tensor wrapped as a :class:`TensorSource`; a source as it is."""
    if isinstance(data, Tensor):
        return TensorSource(data)
    if isinstance(data, ActivationSource):
        return data
    raise TypeError(f"expected a Tensor or an ActivationSource, got {type(data).__name__}")


def tensor_fingerprint(tensor: Tensor) -> str:
    """A hash of a tensor's shape, dtype and bytes: names training data in checkpoints."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(f"{tuple(data.shape)}:{data.dtype}".encode(), digest_size=16)
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of ``n`` items in ``epoch``: seeded by (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class TensorSource:
    """An in-memory (n, d) tensor: each epoch a fresh permutation of its rows, batches are
    consecutive slices of it (the last batch of an epoch may be short). Batches stay on the
    tensor's device."""

    def __init__(self, tensor: Tensor):
        if tensor.ndim != 2 or len(tensor) == 0:
            raise ValueError(f"expected a non-empty (n, d) tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self._fingerprint: str | None = None

    @property
    def n_rows(self) -> int:
        return self.tensor.shape[0]

    @property
    def d(self) -> int:
        return self.tensor.shape[1]

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashing every byte: once
            self._fingerprint = tensor_fingerprint(self.tensor)
        return self._fingerprint

    def indices(self, step: int, batch_size: int, seed: int) -> Tensor:
        """Row indices of step ``step``'s batch."""
        epoch, offset = divmod(step, math.ceil(self.n_rows / batch_size))
        if (epoch, seed) != self._epoch:
            self._epoch, self._perm = (epoch, seed), epoch_permutation(self.n_rows, seed, epoch)
        return self._perm[offset * batch_size : (offset + 1) * batch_size]

    def batch(self, step: int, batch_size: int, seed: int) -> Tensor:
        return self.tensor[self.indices(step, batch_size, seed).to(self.tensor.device)]


@dataclass(frozen=True)
class _Layout:
    """One epoch's stream: the shard order, cut into windows, and where each window starts."""

    windows: list[list[int]]  # shard numbers of each window
    starts: list[int]  # stream position of each window's first row (and the total at the end)


class ShardedSource:
    """Streams a harvest cache (a harvested :class:`HarvestConfig` or its folder) shard by shard.

    Each epoch takes the shards in a seeded permutation, in windows of ``shards_in_memory``
    shards whose rows are shuffled together; batches are consecutive slices of that stream (the
    last batch of an epoch may be short). Only the window being read is held in memory. The
    layout comes from meta.json alone, so ``batch(step)`` is a pure function of (seed, step) and
    a resumed run sees the batches an uninterrupted one would. ``rows`` (a bool mask or an index
    tensor over the whole cache) keeps a subset, e.g. the training side of a split by document.
    Each shard's size and sha256 are checked against meta.json the first time it is read.
    """

    def __init__(
        self,
        cache: HarvestConfig | str | Path,
        rows: Tensor | None = None,
        shards_in_memory: int = 2,
        cache_dir: Path | None = None,
    ):
        if shards_in_memory < 1:
            raise ValueError(f"shards_in_memory must be at least 1, got {shards_in_memory}")
        self.folder = _cache_path(cache, cache_dir)
        self.meta = read_meta(self.folder)
        self.shards_in_memory = shards_in_memory
        counts = shard_row_counts(self.folder, self.meta)
        self._bounds = [0, *itertools.accumulate(counts)]
        self.mask = None if rows is None else _row_mask(rows, self._bounds[-1])
        self._kept = counts if self.mask is None else self._kept_per_shard()
        if sum(self._kept) == 0:
            raise ValueError("the row subset keeps no rows")
        self._verified: set[str] = set()
        self._layout_key, self._layout = None, None
        self._window_key, self._window, self._order = None, None, None

    @property
    def n_rows(self) -> int:
        return sum(self._kept)

    @property
    def d(self) -> int:
        return int(self.meta["d_model"])

    @property
    def config(self) -> HarvestConfig:
        return HarvestConfig.from_dict(self.meta["config"])

    def fingerprint(self) -> str:
        described = {
            "shards": [entry["sha256"] for entry in self.meta["shards"]],
            "shards_in_memory": self.shards_in_memory,
        }
        digest = hashlib.blake2b(json.dumps(described).encode(), digest_size=16)
        if self.mask is not None:
            digest.update(self.mask.numpy().tobytes())
        return "sharded-" + digest.hexdigest()

    def batch(self, step: int, batch_size: int, seed: int) -> Tensor:
        epoch, offset = divmod(step, math.ceil(self.n_rows / batch_size))
        layout = self._epoch_layout(seed, epoch)
        start = offset * batch_size
        stop = min(start + batch_size, self.n_rows)
        parts = []
        while start < stop:  # a batch may span the end of one window and the start of the next
            window = _window_at(layout.starts, start)
            order = self._load_window(seed, epoch, window, layout)
            end = min(stop, layout.starts[window + 1])
            local = order[start - layout.starts[window] : end - layout.starts[window]]
            parts.append(self._window[local])
            start = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _kept_per_shard(self) -> list[int]:
        bounds = self._bounds
        return [int(self.mask[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _epoch_layout(self, seed: int, epoch: int) -> _Layout:
        if self._layout_key != (seed, epoch):
            order = epoch_permutation(len(self._kept), seed, epoch).tolist()
            order = [i for i in order if self._kept[i] > 0]  # a subset may skip whole shards
            size = self.shards_in_memory
            windows = [order[i : i + size] for i in range(0, len(order), size)]
            starts = [0]
            for window in windows:
                starts.append(starts[-1] + sum(self._kept[i] for i in window))
            self._layout_key, self._layout = (seed, epoch), _Layout(windows, starts)
        return self._layout

    def _load_window(self, seed: int, epoch: int, window: int, layout: _Layout) -> Tensor:
        """Read a window's rows (dropping the previous window first); return their order."""
        if self._window_key != (seed, epoch, window):
            self._window = self._order = None  # free the old window before reading the new one
            shards = layout.windows[window]
            rows = torch.empty(sum(self._kept[i] for i in shards), self.d, dtype=torch.float32)
            filled = 0
            for shard in sorted(shards):  # a window's rows are shuffled, so file order is free
                acts = self._read_acts(shard)
                rows[filled : filled + len(acts)] = acts
                filled += len(acts)
                del acts
            generator = torch.Generator().manual_seed(_window_seed(seed, epoch, window))
            self._order = torch.randperm(len(rows), generator=generator)
            self._window, self._window_key = rows, (seed, epoch, window)
        return self._order

    def _read_acts(self, shard: int) -> Tensor:
        entry = self.meta["shards"][shard]
        verify = entry["name"] not in self._verified
        acts = read_shard(self.folder, entry, columns=("acts",), verify=verify)["acts"]
        first, end = self._bounds[shard], self._bounds[shard + 1]
        if len(acts) != end - first:  # the layout was planned from meta.json's counts
            problem = f"holds {len(acts)} vectors, meta.json implies {end - first}"
            raise CorruptCacheError(self.folder, entry["name"], problem)
        self._verified.add(entry["name"])
        return (acts if self.mask is None else acts[self.mask[first:end]]).float()


def split_cache_by_document(
    cache: HarvestConfig | str | Path,
    val_fraction: float,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> tuple[Tensor, Tensor]:
    """Row indices (train, val) over a whole cache, whole documents on one side: the split
    ``ActivationSet.split_by_document`` gives, reading only each shard's document column."""
    folder = _cache_path(cache, cache_dir)
    meta = read_meta(folder)
    columns = [read_shard(folder, entry, columns=("doc_index",)) for entry in meta["shards"]]
    doc_index = torch.cat([column["doc_index"] for column in columns])
    return split_rows_by_document(doc_index, val_fraction, seed)


def _cache_path(cache: HarvestConfig | str | Path, cache_dir: Path | None) -> Path:
    if isinstance(cache, HarvestConfig):
        folder = cache_folder(cache, cache_dir)
        if not folder.exists():
            raise FileNotFoundError(f"no activation cache at {folder}: harvest(config) first")
        return folder
    return Path(cache)


def _row_mask(rows: Tensor, n: int) -> Tensor:
    """A (n,) bool mask from a bool mask or an index tensor (each row at most once)."""
    if rows.dtype == torch.bool:
        if rows.shape != (n,):
            raise ValueError(f"a row mask must have shape ({n},), got {tuple(rows.shape)}")
        return rows.cpu().clone()
    rows = rows.cpu().reshape(-1).long()
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"row indices must lie in [0, {n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    if int(mask.sum()) != len(rows):
        raise ValueError("row indices must not repeat")
    return mask


def _window_at(starts: list[int], position: int) -> int:
    """The window holding stream position ``position``."""
    return bisect.bisect_right(starts, position) - 1


def _window_seed(seed: int, epoch: int, window: int) -> int:
    text = f"{seed}:{epoch}:{window}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
