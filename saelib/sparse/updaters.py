"""Mask updaters: hooks for :func:`saelib.training.train_saes` that change masks as training runs.

Each is called after every step with a :class:`~saelib.training.StepInfo`, acts on every model
it sees that has masked layers (restrict it with :func:`saelib.training.for_models`), and
updates when ``t = step + 1`` steps are done, ``t`` is a multiple of ``update_every`` and
``t < t_end * total_steps``.

- :class:`StaticMagnitude`: once, after step ``at_step``, keep each layer's largest-|w|
  weights (per-layer counts from ERK), then never change (:func:`magnitude_prune` does the same
  before training).
- :class:`SET` (Mocanu et al. 2018): drop the fraction ``zeta`` of each layer's active weights
  with the smallest |w|, regrow as many at random among the inactive.
- :class:`RigL` (Evci et al. 2020): drop alpha/2 (1 + cos(pi t / T_end)) of each layer's
  active weights with the smallest |w|, grow as many where the dense gradient |dL/dW| of that
  step is largest among the inactive.

As in RigL's implementation (``sparse_optimizers._get_update_op``), growth chooses among the
connections inactive after the drop, so a weight dropped and regrown at once keeps its value;
a truly new connection starts at zero with its Adam moments (``exp_avg``, ``exp_avg_sq``) reset
to zero. Per-layer active counts stay exactly constant. Random choices are seeded by
(seed, step, layer), so a resumed run makes the same updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from saelib.sparse.masks import Distribution, MaskedLinear, layer_counts, masked_layers
from saelib.training import StepInfo

__all__ = ["RigL", "SET", "StaticMagnitude", "drop_and_grow", "magnitude_prune"]


@torch.no_grad()
def magnitude_prune(model: nn.Module, density: float, distribution: Distribution = "erk") -> None:
    """Keep each masked layer's largest-|w| active weights, as many as ``layer_counts`` gives."""
    layers = masked_layers(model)
    shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
    for name, count in layer_counts(shapes, density, distribution).items():
        layer = layers[name]
        score = (layer.weight * layer.mask).abs().flatten()
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[torch.topk(score, count).indices] = True
        layer.set_mask(mask)


@torch.no_grad()
def drop_and_grow(
    layer: MaskedLinear, n: int, grow_score: Tensor, optimizer: torch.optim.Optimizer | None
) -> Tensor:
    """Drop the ``n`` smallest-|w| active weights of ``layer`` and grow the ``n`` highest-scored
    among the rest; new connections start at zero with zeroed optimizer state. Returns the
    (flat) bool mask of the new connections."""
    active = layer.mask.flatten()
    drop_score = layer.weight.abs().flatten().masked_fill(~active, math.inf)
    kept = active.clone()
    kept[torch.topk(drop_score, n, largest=False).indices] = False
    candidates = grow_score.flatten().float().masked_fill(kept, -math.inf)
    grown = kept.clone()
    grown[torch.topk(candidates, n).indices] = True
    new = grown & ~active
    layer.set_mask(grown)
    layer.weight.view(-1)[new] = 0.0
    _reset_optimizer_state(optimizer, layer.weight, new)
    return new


def _reset_optimizer_state(
    optimizer: torch.optim.Optimizer | None, parameter: Tensor, where: Tensor
) -> None:
    """Zero every per-element optimizer state of ``parameter`` (Adam's moments) at ``where``."""
    if optimizer is None:
        return
    for value in optimizer.state.get(parameter, {}).values():
        if isinstance(value, Tensor) and value.shape == parameter.shape:
            value.view(-1)[where] = 0


@dataclass
class _Updater:
    update_every: int = 100
    t_end: float = 0.75  # fraction of training after which masks stay fixed
    seed: int = 0
    # one entry per model and update: step, connections changed per layer
    log: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.update_every < 1 or not 0 < self.t_end <= 1:
            raise ValueError(f"need update_every >= 1 and 0 < t_end <= 1, got {self}")

    def is_update(self, step: int, total_steps: int) -> bool:
        done = step + 1
        return done % self.update_every == 0 and done < self.t_end * total_steps

    def __call__(self, info: StepInfo) -> None:
        if not self.is_update(info.step, info.total_steps):
            return
        for result in info.results:
            layers = masked_layers(result.model)
            if result.status == "diverged" or not layers:
                continue
            changed = {
                name: int(self.update_layer(index, layer, info, result.optimizer).sum())
                for index, (name, layer) in enumerate(layers.items())
            }
            self.log.append({"model": result.name, "step": info.step, "changed": changed})

    def update_layer(
        self, index: int, layer: MaskedLinear, info: StepInfo, optimizer
    ) -> Tensor:  # pragma: no cover - each updater defines it
        raise NotImplementedError

    def generator(self, step: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + index)


@dataclass
class SET(_Updater):
    """Sparse Evolutionary Training: drop ``zeta`` smallest-|w|, regrow at random."""

    zeta: float = 0.3

    def update_layer(self, index: int, layer: MaskedLinear, info: StepInfo, optimizer) -> Tensor:
        n = int(self.zeta * layer.nnz)
        score = torch.rand(layer.weight.shape, generator=self.generator(info.step, index))
        return drop_and_grow(layer, n, score.to(layer.weight.device), optimizer)


@dataclass
class RigL(_Updater):
    """Rigged Lottery: cosine-annealed drop of smallest |w|, growth by largest |dense grad|.

    Needs each masked layer's dense gradient: call
    :func:`saelib.sparse.track_dense_grads` on the model before training.
    """

    alpha: float = 0.3

    def drop_fraction(self, step: int, total_steps: int) -> float:
        t, t_end = step + 1, self.t_end * total_steps
        return self.alpha / 2 * (1 + math.cos(math.pi * t / t_end))

    def update_layer(self, index: int, layer: MaskedLinear, info: StepInfo, optimizer) -> Tensor:
        if layer.dense_grad is None:
            raise RuntimeError(
                "RigL needs the dense weight gradients: call track_dense_grads(model) before "
                "training"
            )
        n = int(self.drop_fraction(info.step, info.total_steps) * layer.nnz)
        return drop_and_grow(layer, n, layer.dense_grad.abs(), optimizer)


@dataclass
class StaticMagnitude:
    """Prune once, after step ``at_step``, to ``density`` by |w| per layer; then fixed."""

    density: float
    at_step: int = 0
    distribution: Distribution = "erk"

    def __call__(self, info: StepInfo) -> None:
        if info.step != self.at_step:
            return
        for result in info.results:
            if result.status != "diverged":
                magnitude_prune(result.model, self.density, self.distribution)
