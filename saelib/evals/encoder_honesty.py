"""Whether an SAE's reconstruction is the work of its sparse code, sample by sample.

Two encoder options can make reconstruction metrics flatter the dictionary:

- a dense skip path around the code (``ReLUConfig(skip="output")``) reconstructs part of x
  without any latent. :func:`code_path_explained_variance` is the explained variance (SAELens's
  form, as :mod:`saelib.evals.metrics`) of the code path alone, W_dec f + b_dec; it equals the
  SAE's explained variance when there is no such path;
- attention across the batch (``ReLUConfig(attention=True)``) makes a sample's code depend on the
  other samples it is encoded with, so the SAE is no longer a function of one activation.
  :func:`batch_dependence` encodes each sample twice, among different company, and reports how
  much its reconstruction moves: exactly 0 for a per-sample encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saelib.saes import SAE


def code_path(sae: SAE, x: Tensor) -> Tensor:
    """The reconstruction through the sparse code alone; an SAE without a ``code_path`` method
    has no path around its code, so its reconstruction is its code path."""
    output = sae(x)
    if not hasattr(sae, "code_path"):
        return output.recon
    return sae.code_path(output.dense())


@torch.no_grad()
def code_path_explained_variance(sae: SAE, x: Tensor, batch_size: int = 4096) -> float:
    """1 - E||x - code_path(x)||^2 / E||x - mean(x)||^2 over ``x`` (n, d_in), in float64.

    Batches are consecutive rows of ``x``; an SAE with attention across the batch sees the same
    batches here as in :func:`saelib.evals.metrics.evaluate` with the same ``batch_size``."""
    device = next(sae.parameters()).device
    x_sum = x_sq_sum = err_sq_sum = 0.0
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].to(device).float()
        error = (batch - code_path(sae, batch).float()).double()
        x_sum = x_sum + batch.double().sum(0)
        x_sq_sum = x_sq_sum + batch.double().pow(2).sum(0)
        err_sq_sum = err_sq_sum + float(error.pow(2).sum())
    total_var = float((x_sq_sum - x_sum.pow(2) / len(x)).sum())
    return 1.0 - err_sq_sum / total_var


@dataclass
class BatchDependence:
    """Relative change ||r - r'|| / ||r|| of each sample's reconstruction between its two
    batches: mean and max over samples, with the batch size used."""

    mean_relative_change: float
    max_relative_change: float
    batch_size: int
    n_vectors: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def batch_dependence(sae: SAE, x: Tensor, batch_size: int = 4096, seed: int = 0) -> BatchDependence:
    """Reconstruct each sample of ``x`` (n, d_in) in consecutive batches, then again in batches
    of a seeded shuffle of ``x``, and compare. The batch size is capped at n // 2 so that there
    are at least two batches and a sample's company changes (one batch holding all of x would
    only be reordered). Both passes use batches of the same sizes, so a per-sample encoder
    gives bit-identical reconstructions and a change of exactly 0."""
    if len(x) < 2:
        raise ValueError(f"batch dependence needs at least 2 samples, got {len(x)}")
    batch_size = min(batch_size, len(x) // 2)
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    inverse = torch.argsort(permutation)
    alone = reconstruct(sae, x, batch_size)
    shuffled = reconstruct(sae, x[permutation], batch_size)[inverse]
    change = (alone - shuffled).norm(dim=1) / alone.norm(dim=1).clamp_min(1e-12)
    return BatchDependence(float(change.mean()), float(change.max()), batch_size, len(x))


def reconstruct(sae: SAE, x: Tensor, batch_size: int) -> Tensor:
    """(n, d_in) float64 reconstructions of ``x``, on the CPU, batch by batch."""
    device = next(sae.parameters()).device
    parts = [
        sae(x[start : start + batch_size].to(device).float()).recon.double().cpu()
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(parts)
