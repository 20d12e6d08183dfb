"""Frequency ordering: make a latent's index say how often it fires (low index = frequent).

Three pieces, each usable alone:

- :class:`FrequencyTracker` keeps, per latent, the fraction of samples on which it fires
  (f_i > ``eps``, eps = 1e-4 as in the original), read from the output's active entries without
  gradient. It keeps two averages of the per-batch fractions: the plain running mean over every
  sample seen (the original's no-grad running counts, used by the "published" penalty) and an
  EMA with ``decay`` (recent behaviour, used by the re-sort: a latent's frequency early in
  training says little about it later). The EMA starts at the first batch's fractions, so it
  needs no bias correction.
- :class:`OrderingLoss` wraps any loss (``TopKLoss``, ``L1Loss``, ``MatryoshkaLoss``, ...) and adds
  the term ``"ordering"`` to its terms and to ``"total"``:

  * ``kind="published"``: weight(step) * mean_i relu(p_{i+1} - p_i) with p the tracker's running
    mean. It is computed from no-grad counts, so it has no gradient: training with it is
    bit-identical to training with the base loss alone (the original's runs 2 and 3 equal the
    baseline). Kept to show exactly that.
  * ``kind="soft"`` (the default): weight(step) * recon * mean_{i<j} relu(q_j - q_i + margin),
    over all pairs of latents (or only adjacent ones, ``pairs="adjacent"``), with the soft
    frequency q_i = mean_b sigmoid(z_bi) and z_bi = (pre_bi - threshold_b) / (temperature *
    std_b(pre_bi)): how far latent i's pre-activation lies above the level at which it fires, in
    units of its own spread over the batch (a ReLU SAE fires above ``eps``; a TopK SAE above the
    midpoint of the row's k-th and (k+1)-th pre-activations). The pre-activations are recomputed
    with gradient, so a latent that does not fire is pushed too: a latent that fires more than
    one before it is pushed down, the one before it up. Over all pairs the push on a latent
    grows with the number of latents out of order with it, so a frequent latent at a high index
    moves towards the front in one go, not one neighbour at a time. ``recon`` is the base loss's
    reconstruction term (no gradient), so ``weight`` is relative to it whatever the loss scale.
    ``margin`` > 0 asks for strictly decreasing soft frequencies and must stay well below
    1 / d_sae.

  weight(step) rises linearly from 0 to ``weight`` over the first ``ramp_steps`` steps (the
  original's run 3: 0 -> 0.5 over 1000 batches), and is ``weight`` from the start when
  ``ramp_steps`` is 0. The weight is relative to the base loss's scale (the original's 0.3 and 0.5
  are on the "l2" reconstruction convention, see :mod:`saelib.training.losses`).
- :class:`ResortByFrequency`, a training hook: every ``every`` steps it sorts each model's latents
  by the tracker's EMA frequency, descending, and permutes everything that is indexed by latent
  together (weights, Adam's moments, the loop's dead counter, the tracker), leaving the model's
  function unchanged. With ``OrderingLoss(base, "published", weight=0)`` as the loss the tracker
  runs while training stays exactly the base loss's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from saelib.saes import SAEOutput
from saelib.training.loop import StepInfo, TrainResult
from saelib.training.losses import Loss, TrainState

__all__ = [
    "FrequencyTracker",
    "OrderingLoss",
    "ResortByFrequency",
    "Resorted",
    "find_tracker",
    "latent_axes",
    "permute_latents",
    "published_penalty",
    "firing_margin",
    "pair_violations",
    "soft_frequency",
]

EPS = 1e-4  # a latent "fires" on a sample when f_i > EPS (the original's threshold)
OrderingKind = Literal["published", "soft"]
ORDERING_KINDS = ("published", "soft")
Statistic = Literal["ema", "mean"]
Pairs = Literal["all", "adjacent"]


class FrequencyTracker:
    """Per-latent firing frequency over training (see the module docstring).

    ``mean`` is the running fraction of all samples seen on which a latent fired; ``ema`` the EMA
    (``decay`` per update) of the per-batch fractions. Both are (d_sae,) float64 tensors on the
    device of the outputs, created on the first :meth:`update` (None before).
    """

    def __init__(self, decay: float = 0.99, eps: float = EPS):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.eps = eps
        self.ema: Tensor | None = None
        self.fired: Tensor | None = None  # (d_sae,) samples on which each latent fired
        self.samples = 0
        self.updates = 0

    @torch.no_grad()
    def update(self, output: SAEOutput) -> Tensor:
        """Count this batch's firing (entries with f > eps); returns its (d_sae,) fractions."""
        _, latents, values = output.active()
        counts = torch.bincount(latents[values.detach() > self.eps], minlength=output.d_sae)
        counts = counts.to(torch.float64)
        batch = output.acts.shape[0]
        fractions = counts / max(batch, 1)
        if self.ema is None or self.fired is None:
            self.ema, self.fired = fractions.clone(), torch.zeros_like(counts)
        else:
            self.ema.mul_(self.decay).add_(fractions, alpha=1 - self.decay)
        self.fired += counts
        self.samples += batch
        self.updates += 1
        return fractions

    @property
    def mean(self) -> Tensor | None:
        """(d_sae,) fraction of all samples seen on which each latent fired."""
        if self.fired is None:
            return None
        return self.fired / max(self.samples, 1)

    def frequency(self, statistic: Statistic = "ema") -> Tensor | None:
        """The EMA (``"ema"``) or the running mean (``"mean"``) frequency."""
        if statistic not in ("ema", "mean"):
            raise ValueError(f"statistic must be 'ema' or 'mean', got {statistic!r}")
        return self.ema if statistic == "ema" else self.mean

    @torch.no_grad()
    def permute(self, order: Tensor) -> None:
        """Latent ``order[j]`` becomes latent j (as :func:`permute_latents` does to the model)."""
        if self.ema is None or self.fired is None:
            return
        order = order.to(self.ema.device)
        self.ema = self.ema[order]
        self.fired = self.fired[order]

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema,
            "fired": self.fired,
            "samples": self.samples,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = None if state["ema"] is None else state["ema"].clone()
        self.fired = None if state["fired"] is None else state["fired"].clone()
        self.samples, self.updates = int(state["samples"]), int(state["updates"])


def published_penalty(frequency: Tensor) -> Tensor:
    """mean_i relu(p_{i+1} - p_i): how much frequency rises along the index (0 when sorted)."""
    return torch.relu(frequency[1:] - frequency[:-1]).mean()


def firing_margin(model: nn.Module, x: Tensor, eps: float = EPS) -> Tensor:
    """(batch, d_sae) pre-activations minus the level above which each latent fires, with
    gradient: > 0 exactly where the latent fires. A model with ``pre_acts(x)`` (a ReLU SAE) fires
    above ``eps``; a TopK SAE (``k``) above the midpoint of each row's k-th and (k+1)-th largest
    pre-activation (and above ``eps``, as a TopK code is also ReLU'd)."""
    pre_acts_of = getattr(model, "pre_acts", None)
    if callable(pre_acts_of):
        return pre_acts_of(x) - eps
    pre = torch.addmm(model.b_enc, x - model.b_dec, model.W_enc.T)
    k = getattr(model, "k", None)
    if k is None:
        raise TypeError(f"{type(model).__name__} has neither pre_acts(x) nor k")
    with torch.no_grad():
        top = pre.topk(min(k + 1, pre.shape[-1]), dim=-1).values
        threshold = ((top[:, k - 1] + top[:, -1]) / 2).clamp_min(eps)
    return pre - threshold[:, None]


def soft_frequency(margin: Tensor, temperature: float) -> Tensor:
    """(d_sae,) mean over the batch of sigmoid(margin / (temperature * std_b(margin))):
    each latent's firing frequency, smoothed on the scale of its own pre-activations."""
    margin = margin.float()
    spread = margin.detach().std(dim=0).clamp_min(1e-6)
    return torch.sigmoid(margin / (temperature * spread)).mean(dim=0)


def pair_violations(q: Tensor, margin: float = 0.0, pairs: Pairs = "all") -> Tensor:
    """mean relu(q_j - q_i + margin) over index pairs i < j (all, or adjacent j = i + 1):
    0 when q decreases along the index by at least ``margin`` at every step."""
    if pairs == "adjacent":
        return torch.relu(q[1:] - q[:-1] + margin).mean()
    later_minus_earlier = q[None, :] - q[:, None]  # [i, j] = q_j - q_i
    upper = torch.ones_like(later_minus_earlier, dtype=torch.bool).triu(diagonal=1)
    return torch.relu(later_minus_earlier[upper] + margin).mean()


@dataclass
class OrderingLoss:
    """``base``'s terms plus ``"ordering"`` (already weighted), which is also added to
    ``"total"``; see the module docstring for the two kinds. The tracker (``.tracker``) is
    updated on every call, whatever the kind, and saved with the loss's state."""

    base: Loss
    kind: OrderingKind = "soft"
    weight: float = 0.3  # the original's lambda2 (run 2)
    ramp_steps: int = 0
    temperature: float = 0.5
    margin: float = 0.0
    pairs: Pairs = "all"
    eps: float = EPS
    decay: float = 0.99
    _tracker: FrequencyTracker = field(init=False, repr=False)
    # the tracker counts the firing of the rows it is given: a process's slice in data parallel
    data_parallel_exact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.kind not in ORDERING_KINDS:
            raise ValueError(f"ordering kind must be one of {ORDERING_KINDS}, got {self.kind!r}")
        if self.temperature <= 0 or self.ramp_steps < 0:
            raise ValueError("temperature must be positive and ramp_steps non-negative")
        if self.pairs not in ("all", "adjacent"):
            raise ValueError(f"pairs must be 'all' or 'adjacent', got {self.pairs!r}")
        self._tracker = FrequencyTracker(self.decay, self.eps)

    @property
    def tracker(self) -> FrequencyTracker:
        return self._tracker

    def weight_at(self, step: int) -> float:
        """weight * min(1, step / ramp_steps): 0 at step 0 when ramped."""
        if self.ramp_steps == 0:
            return self.weight
        return self.weight * min(1.0, step / self.ramp_steps)

    def __call__(
        self, model: nn.Module, x: Tensor, output: SAEOutput, state: TrainState
    ) -> dict[str, Tensor]:
        terms = dict(self.base(model, x, output, state))
        self.tracker.update(output)
        weight = self.weight_at(state.step)
        if self.kind == "published":
            with torch.no_grad():
                penalty = published_penalty(self.tracker.mean).float()
        elif weight == 0:
            penalty = torch.zeros((), device=x.device)
        else:
            q = soft_frequency(firing_margin(model, x, self.eps), self.temperature)
            penalty = pair_violations(q, self.margin, self.pairs) * terms["recon"].detach()
        ordering = weight * penalty
        return terms | {"ordering": ordering, "total": terms["total"] + ordering}

    def check(self, model: nn.Module) -> None:
        """The base loss's check (refuse a model it cannot train)."""
        check = getattr(self.base, "check", None)
        if check is not None:
            check(model)

    def state_dict(self) -> dict[str, Any]:
        base_state = getattr(self.base, "state_dict", None)
        return {
            "base": base_state() if base_state is not None else None,
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("base") is not None:
            self.base.load_state_dict(state["base"])
        self.tracker.load_state_dict(state["tracker"])


# Per-latent parameters and buffers, by name, with their latent axis. A ReLU SAE's LayerNorm
# over the d_sae pre-activations is permutation-equivariant (its mean and variance do not
# depend on the order), so its scale and shift move with the latents, as do the rows of the
# attention's value projection (it writes into the pre-activations).
LATENT_AXES: dict[str, int] = {
    "W_enc": 0,
    "b_enc": 0,
    "W_dec": 0,
    "layer_norm.weight": 0,
    "layer_norm.bias": 0,
    "attention.v.weight": 0,
    "attention.v.bias": 0,
}
# A skip Linear(d_in, d_sae) into the code (skip="encoder") is per-latent; one around the code
# (skip="output", Linear(d_in, d_in)) is not.
ENCODER_SKIP_AXES: dict[str, int] = {"skip.weight": 0, "skip.bias": 0}
# Known to carry no latent axis, even when d_in == d_sae makes a dimension look like one.
NOT_LATENT = ("b_dec", "skip.weight", "skip.bias", "attention.q.", "attention.k.")


def latent_axes(model: nn.Module) -> dict[str, int]:
    """{name: latent axis} of every parameter and buffer of ``model`` indexed by latent.

    Names are matched against the known per-latent tensors (``LATENT_AXES``, plus the encoder
    skip when ``config.skip == "encoder"``) and their axis must have length d_sae. A tensor that
    is neither known per-latent nor known not to be (``NOT_LATENT``) but has a d_sae-sized axis
    is refused: permuting the others without it would change the model's function.
    """
    d_sae = model.W_dec.shape[0]
    known = dict(LATENT_AXES)
    if getattr(getattr(model, "config", None), "skip", None) == "encoder":
        known |= ENCODER_SKIP_AXES
    axes: dict[str, int] = {}
    for name, tensor in _named_tensors(model):
        if name in known:
            if tensor.shape[known[name]] != d_sae:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, no latent axis {d_sae}")
            axes[name] = known[name]
        elif d_sae in tensor.shape and not name.startswith(NOT_LATENT):
            raise ValueError(
                f"{type(model).__name__}.{name} {tuple(tensor.shape)} may be indexed by latent; "
                "add it to LATENT_AXES (or NOT_LATENT) before permuting latents"
            )
    return axes


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


@torch.no_grad()
def permute_latents(
    model: nn.Module, order: Tensor, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Make latent ``order[j]`` latent j, in place: every per-latent parameter and buffer
    (:func:`latent_axes`) and, for parameters, the optimizer's per-element state (Adam's
    exp_avg, exp_avg_sq; step counts are scalars and stay)."""
    tensors = dict(_named_tensors(model))
    for name, axis in latent_axes(model).items():
        tensor = tensors[name]
        tensor.copy_(tensor.index_select(axis, order.to(tensor.device)))
        state = optimizer.state.get(tensor, {}) if optimizer is not None else {}
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == tensor.shape:
                value.copy_(value.index_select(axis, order.to(value.device)))


def find_tracker(loss: Any, depth: int = 4) -> FrequencyTracker | None:
    """The :class:`FrequencyTracker` of ``loss`` or of a loss it wraps (searched through its
    attributes, ``depth`` levels deep); None when there is none."""
    if isinstance(loss, FrequencyTracker):
        return loss
    if isinstance(loss, OrderingLoss):
        return loss.tracker
    if depth == 0 or isinstance(loss, Tensor | nn.Module) or not hasattr(loss, "__dict__"):
        return None
    for value in vars(loss).values():
        found = find_tracker(value, depth - 1)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class Resorted:
    """One re-sort of one model after step ``step``: ``moved`` latents changed index."""

    step: int
    name: str
    moved: int


class ResortByFrequency:
    """Training hook: after every ``every`` steps (steps every-1, 2*every-1, ...), sort each
    model's latents by its loss's tracked frequency (``statistic``: the EMA by default),
    descending (ties keep their order), and permute together the model's per-latent tensors,
    their Adam moments, ``tokens_since_fired`` and the tracker. A model whose loss has no tracker
    (see :func:`find_tracker`), or whose tracker has seen nothing yet, is left alone. Other
    per-latent state of a loss (e.g. an EMA over latent pairs) is not permuted.
    ``records`` lists every re-sort done."""

    def __init__(self, every: int, statistic: Statistic = "ema"):
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every = every
        self.statistic = statistic
        self.records: list[Resorted] = []

    def __call__(self, info: StepInfo) -> None:
        if (info.step + 1) % self.every != 0:
            return
        for result in info.results:
            if result.status != "diverged":
                moved = self.resort(result)
                if moved is not None:
                    self.records.append(Resorted(info.step, result.name, moved))

    def resort(self, result: TrainResult) -> int | None:
        """Re-sort ``result`` in place; returns how many latents moved (None: no frequency)."""
        tracker = find_tracker(result.loss)
        frequency = tracker.frequency(self.statistic) if tracker is not None else None
        if tracker is None or frequency is None:
            return None
        order = torch.argsort(frequency, descending=True, stable=True)
        permute_latents(result.model, order, result.optimizer)
        if result.tokens_since_fired is not None:
            firing = result.tokens_since_fired
            firing.copy_(firing[order.to(firing.device)])
        tracker.permute(order)
        return int((order != torch.arange(len(order), device=order.device)).sum())
