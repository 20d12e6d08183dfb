"""The Binary Sparsity Alignment loss: reconstruct x from bits, align s with its TopK target.

loss = recon(x, x_hat) + alpha * align(s, t), with s = sigmoid(z) the bit probabilities of a
:class:`saelib.saes.BinarySAE` and t = one-hot(topk(s, K)) (no gradient). The original uses
cosine distance in both terms; the metric of each term is a parameter (the study's first
ablation):

- reconstruction: ``"cosine"`` 1 - cos(x, x_hat); ``"mse"`` squared error averaged over every
  element; ``"kl"`` KL(softmax(x / T) || softmax(x_hat / T)); ``"ce"`` the cross-entropy
  -sum softmax(x / T) log softmax(x_hat / T). KL and CE differ by the entropy of softmax(x / T),
  a constant, so they train alike and log different values. T (``softmax_temperature``) matters
  for unit-norm embeddings, whose softmax at T = 1 is nearly uniform.
- alignment: ``"cosine"`` 1 - cos(s, t); ``"mse"`` (s - t)^2 averaged over every element;
  ``"kl"`` KL(t / K || s / sum(s)), the code and its target as distributions over the bits;
  ``"bce"`` the binary cross-entropy of each bit s_i against t_i, averaged over every element
  (the per-bit Bernoulli KL, since t is 0 or 1).

Every term is a mean over the batch, in float32. An annealed estimator (Gumbel, soft
quantisation) reads the progress the model was told; :func:`anneal_progress` is the training
hook that tells it, and the loss refuses a step where the two disagree, rather than let a
forgotten hook train at the starting temperature throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.saes.binary import BinaryOutput, topk_target
from saelib.training.loop import StepInfo
from saelib.training.losses import TrainState

ReconMetric = Literal["cosine", "mse", "kl", "ce"]
AlignMetric = Literal["cosine", "mse", "kl", "bce"]
RECON_METRICS: tuple[str, ...] = ReconMetric.__args__
ALIGN_METRICS: tuple[str, ...] = AlignMetric.__args__


def anneal_progress(info: StepInfo) -> None:
    """Training hook: tell every model that anneals (has ``set_progress``) the progress after
    this step, which is the progress the next step's loss sees."""
    for result in info.results:
        set_progress = getattr(result.model, "set_progress", None)
        if callable(set_progress):
            set_progress(info.progress)


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over rows of 1 - cos(a, b)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def reconstruction_term(
    x: Tensor, recon: Tensor, metric: ReconMetric = "cosine", temperature: float = 1.0
) -> Tensor:
    """The reconstruction term under ``metric`` (module docstring)."""
    x, recon = x.float(), recon.float()
    if metric == "cosine":
        return cosine_distance(x, recon)
    if metric == "mse":
        return (recon - x).pow(2).mean()
    if metric not in ("kl", "ce"):
        raise ValueError(f"recon_metric must be one of {RECON_METRICS}, got {metric!r}")
    log_p = torch.log_softmax(x / temperature, dim=-1)
    log_q = torch.log_softmax(recon / temperature, dim=-1)
    cross_entropy = -(log_p.exp() * log_q).sum(dim=-1)
    if metric == "ce":
        return cross_entropy.mean()
    return (cross_entropy + (log_p.exp() * log_p).sum(dim=-1)).mean()


def alignment_term(logits: Tensor, target: Tensor, metric: AlignMetric = "cosine") -> Tensor:
    """The alignment term between s = sigmoid(``logits``) and the binary ``target`` under
    ``metric`` (module docstring); computed from the logits where that is more stable."""
    logits, target = logits.float(), target.float()
    if metric == "cosine":
        return cosine_distance(torch.sigmoid(logits), target)
    if metric == "mse":
        return (torch.sigmoid(logits) - target).pow(2).mean()
    if metric == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if metric != "kl":
        raise ValueError(f"align_metric must be one of {ALIGN_METRICS}, got {metric!r}")
    log_s = F.logsigmoid(logits)
    log_s_normalised = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
    t = target / target.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return (torch.xlogy(t, t) - t * log_s_normalised).sum(dim=-1).mean()


@dataclass
class BSALoss:
    """Terms: ``recon`` and ``align`` (under the chosen metrics), ``total`` = recon + alpha
    align, and for display, without gradient whatever the metrics: ``cosine_loss``
    (1 - cos(x, x_hat)), ``mse`` (per element) and ``active_bits`` (mean hard bits per row)."""

    alpha: float = 1.0
    recon_metric: ReconMetric = "cosine"
    align_metric: AlignMetric = "cosine"
    softmax_temperature: float = 1.0  # T of the "kl" and "ce" reconstruction metrics

    def __post_init__(self) -> None:
        check_choice("recon_metric", self.recon_metric, RECON_METRICS)
        check_choice("align_metric", self.align_metric, ALIGN_METRICS)
        check_number("alpha", self.alpha, allow_zero=True)
        check_number("softmax_temperature", self.softmax_temperature, allow_zero=False)

    def check(self, model: nn.Module) -> None:
        """Refuse a model that gives no bit probabilities and TopK size to align."""
        missing = [name for name in ("k", "set_progress", "hard_bits") if not hasattr(model, name)]
        if missing:
            raise TypeError(
                f"BSALoss needs a binary SAE (BinarySAE); {type(model).__name__} lacks "
                f"{', '.join(missing)}"
            )

    def __call__(
        self, model: nn.Module, x: Tensor, output: BinaryOutput, state: TrainState
    ) -> dict[str, Tensor]:
        check_progress(model, state)
        # topk of s is topk of z (sigmoid is monotone); z cannot tie where s saturates at 1
        target = topk_target(output.logits, model.k)
        recon = reconstruction_term(x, output.recon, self.recon_metric, self.softmax_temperature)
        align = alignment_term(output.logits, target, self.align_metric)
        return {
            "recon": recon,
            "align": align,
            "total": recon + self.alpha * align,
            **display_terms(model, x, output),
        }


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value: object, allow_zero: bool) -> None:
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    valid = valid and (value >= 0 if allow_zero else value > 0) and value < math.inf
    if not valid:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")


@torch.no_grad()
def display_terms(model: nn.Module, x: Tensor, output: BinaryOutput) -> dict[str, Tensor]:
    """The same measures for every metric, so that runs under different losses compare."""
    recon = output.recon.detach()
    return {
        "cosine_loss": cosine_distance(x, recon),
        "mse": (recon.float() - x.float()).pow(2).mean(),
        "active_bits": model.hard_bits(output.logits.detach()).sum(dim=-1).float().mean(),
    }


def check_progress(model: nn.Module, state: TrainState) -> None:
    """Refuse to train an annealed estimator that was not told the training progress."""
    if not (model.training and getattr(model, "anneals", False)):
        return
    told = float(model.progress)
    if not math.isclose(told, state.progress, abs_tol=1e-9):
        raise RuntimeError(
            f"{type(model).__name__} anneals but was told progress {told:.4g} at training "
            f"progress {state.progress:.4g}: pass hooks=[anneal_progress] to train_saes"
        )
