"""Reconstruction and sparsity metrics of an SAE on a set of activations.

Definitions (as in the TopK quality-sparsity report the studies reproduce):
- explained variance (SAELens's form): EV = 1 - E||x - x_hat||^2 / E||x - mean(x)||^2, the
  squared error against the total variance (per-dimension variance around the dataset mean,
  summed over dimensions). A systematic offset in x_hat counts as unexplained;
- centred explained variance (dictionary_learning's form): 1 - Var(x - x_hat) / Var(x), where
  the error's own mean is removed first, so an offset goes unpunished. Reported beside EV under
  its own name, never as EV;
- mse: mean over all elements of (x - x_hat)^2;
- cosine similarity: mean over rows of cos(x, x_hat);
- l0: mean number of latents with a non-zero activation per row;
- death rate: fraction of latents never active on the evaluated set;
- mean activation: mean value of the non-zero latent activations;
- max activation: the largest latent activation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from saelib.saes import SAE, SAEOutput


@dataclass
class ReconstructionMetrics:
    explained_variance: float
    explained_variance_centred: float
    mse: float
    cosine_similarity: float
    l0: float
    death_rate: float
    mean_activation: float
    max_activation: float
    n_vectors: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(sae: SAE, activations: Tensor, batch_size: int = 4096) -> ReconstructionMetrics:
    """All metrics in one pass over ``activations`` (n, d_in); any code (fixed-k, variable-k,
    binary) works: the sparsity metrics read its non-zero entries."""
    device = next(sae.parameters()).device
    sums = _Sums(sae.d_sae, device)
    for start in range(0, len(activations), batch_size):
        x = activations[start : start + batch_size].to(device).float()
        sums.add(x, sae(x))
    return sums.result()


class _Sums:
    """Running sums from which every metric is computed exactly (no per-batch averaging)."""

    def __init__(self, d_sae: int, device: torch.device):
        self.n = 0
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.x_sum = self.x_sq_sum = self.err_sum = self.err_sq_sum = 0.0
        self.cosine_sum = self.active_count = self.active_sum = 0.0
        self.max_act = 0.0
        self.n_elements = 0

    def add(self, x: Tensor, output: SAEOutput) -> None:
        recon = output.recon.float()
        error = x - recon
        self.n += len(x)
        self.n_elements += x.numel()
        # per-dimension sums in float64 keep the variance exact for large sets
        self.x_sum = self.x_sum + x.double().sum(0)
        self.x_sq_sum = self.x_sq_sum + x.double().pow(2).sum(0)
        self.err_sum = self.err_sum + error.double().sum(0)
        self.err_sq_sum = self.err_sq_sum + error.double().pow(2).sum(0)
        self.cosine_sum += float(torch.nn.functional.cosine_similarity(x, recon, dim=1).sum())
        values = output.active()[2].float()
        self.active_count += float(output.l0().sum())
        self.active_sum += float(values.sum())
        self.max_act = max(self.max_act, float(values.max()) if values.numel() else 0.0)
        self.fired |= output.fired()

    def result(self) -> ReconstructionMetrics:
        n = self.n
        total_var = float((self.x_sq_sum - self.x_sum.pow(2) / n).sum())
        squared_error = float(self.err_sq_sum.sum())
        error_var = float((self.err_sq_sum - self.err_sum.pow(2) / n).sum())
        return ReconstructionMetrics(
            explained_variance=1.0 - squared_error / total_var,
            explained_variance_centred=1.0 - error_var / total_var,
            mse=float(self.err_sq_sum.sum()) / self.n_elements,
            cosine_similarity=self.cosine_sum / n,
            l0=self.active_count / n,
            death_rate=1.0 - float(self.fired.float().mean()),
            mean_activation=self.active_sum / max(self.active_count, 1.0),
            max_activation=self.max_act,
            n_vectors=n,
        )


def pareto_optimal(points: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    ``points`` is (n, m); ``maximize[j]`` says whether larger is better on axis j. A point is
    dominated when another is at least as good on every axis and strictly better on one.
    """
    signs = np.where(np.asarray(maximize), 1.0, -1.0)
    scores = np.asarray(points, dtype=float) * signs
    at_least = (scores[None, :, :] >= scores[:, None, :]).all(-1)
    strictly = (scores[None, :, :] > scores[:, None, :]).any(-1)
    dominated = (at_least & strictly).any(1)  # dominated[i]: some j beats i
    return ~dominated
