"""Activation sources: what a training loop reads its batches from.

A source hands out the rows of training step ``step`` as a pure function of (seed, step), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would, and names its
data with a cheap, stable fingerprint that checkpoints record.

- :class:`TensorSource` wraps an in-memory tensor: each epoch a fresh permutation of the rows.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol, runtime_checkable

import torch

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
