"""Progressive sparsity-guided orthogonality penalty (the original's numbers: the study specs).

    L_ortho = lambda2(p) * sum_ij c_ij(p) * |F_ij|,   F = f^T f / B   (activation penalty)
    or        lambda2(p) * sum_ij c_ij(p) * |W_dec_i . W_dec_j|      (decoder-direction penalty)
    n_ij = #(samples where i and j are both active) / #(samples where j is active)   (no grad)
    c_ij = clamp((n_ij - tau(p)) / tau(p), 0, 1)                                     (no grad)

Only pairs of latents that fire together in the batch can have n_ij > 0, and only those with
c_ij > 0 contribute, so everything is computed on the co-active pairs of the batch (at most
B * m^2 of them for a code of m slots per row, m = k for TopK), never on d_sae x d_sae
matrices; any SAE output works (fixed-k, variable-k, binary), cheaply while the code is sparse
(m is the busiest row's count of active latents: a dense early ReLU code makes it large).
The EMA of n_ij (runs 4-7) covers every pair ever seen, which in practice is a large share of
all d_sae^2 pairs (half of them within a few dozen steps at d_sae 4096, k 40): it is kept as a
dense d_sae x d_sae matrix (:class:`DensePairEMA`, exact, one multiply of the matrix per step)
while that matrix fits in ``dense_ema_max_mib``, else as a sparse tensor of the pairs seen so
far, pruned below ``ema_floor`` (:class:`PairEMA`).

Notes on the original formulation, kept as options:
- ``include_diagonal=True`` (the original) makes n_jj = 1, so every active latent also pays a
  penalty on its own activation energy F_jj; the default excludes the diagonal.
- A falling tau *tightens* the constraint (more pairs exceed it); only lambda2 relaxes it.
- With non-negative (TopK, ReLU) activations the activation penalty acts on co-occurrence, not on
  decoder geometry; ``penalty="decoder"`` penalises |cos| of decoder directions instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from saelib.saes import SAE, SAEOutput
from saelib.saes.coactivation import PairCounts, count_pairs, ordered_pairs
from saelib.training.losses import TopKLoss, TrainState

TAU_FLOOR = 1e-3


@dataclass(frozen=True)
class OrthoSchedule:
    """tau(p) and lambda2(p, warmup) of one run, and its EMA of n_ij."""

    tau: Callable[[float], float]
    weight: Callable[[float, float], float]  # (p, warmup factor) -> lambda2
    ema_decay: float | None = None  # weight of the old value; None: no EMA
    ema_start_step: int = 0
    description: str = ""


def _warmup_only(weight: Callable[[float], float]) -> Callable[[float, float], float]:
    return lambda p, warmup: weight(p) * warmup


SCHEDULES: dict[str, OrthoSchedule] = {
    "run1": OrthoSchedule(
        lambda p: 0.8 * (1 - p), lambda p, w: 0.1 * (1 - p) ** 2,
        description="tau 0.8(1-p); lambda 0.1(1-p)^2",
    ),
    "run2": OrthoSchedule(
        lambda p: 0.9 * (1 - p) ** 0.5, lambda p, w: 0.15 * math.exp(-3 * p),
        description="tau 0.9(1-p)^0.5; lambda 0.15 exp(-3p)",
    ),
    "run3": OrthoSchedule(
        lambda p: 0.9 * (1 - p**0.5), lambda p, w: 0.15 * (1 - p),
        description="tau 0.9(1-p^0.5); lambda 0.15(1-p)",
    ),
    "run4": OrthoSchedule(
        lambda p: 0.85 * (1 - p**1.5), _warmup_only(lambda p: 0.2 * (1 - p)), ema_decay=0.9,
        description="tau 0.85(1-p^1.5); lambda 0.2(1-p) warmup; EMA 0.9",
    ),
    "run5": OrthoSchedule(
        lambda p: 0.9 * (1 - p) ** 0.3, _warmup_only(lambda p: 0.25 * (1 - p)), ema_decay=0.95,
        description="tau 0.9(1-p)^0.3; lambda 0.25(1-p) warmup; EMA 0.95",
    ),
    "run6": OrthoSchedule(
        lambda p: 0.9 * 0.9**p, _warmup_only(lambda p: 0.4 * (1 - p)), ema_decay=0.95,
        description="tau 0.9*0.9^p; lambda 0.4(1-p) warmup; EMA 0.95",
    ),
    "run7": OrthoSchedule(
        lambda p: 0.9 * (1 - 2 * p) if p < 0.5 else 0.001,
        _warmup_only(lambda p: 0.4 * 0.5 * (1 + math.cos(math.pi * p))),
        ema_decay=0.98,
        ema_start_step=100,
        description="tau 0.9(1-2p) then 0.001; lambda 0.4 cosine warmup; EMA 0.98 after step 100",
    ),
}  # fmt: skip


def static_schedule(tau: float, weight: float) -> OrthoSchedule:
    """The control the original work never ran: constant tau and lambda2."""
    description = f"static tau {tau}; lambda {weight}"
    return OrthoSchedule(lambda p: tau, lambda p, w: weight, description=description)


@dataclass
class OrthogonalityPenalty:
    """Stateful (EMA) penalty; use one instance per SAE."""

    schedule: OrthoSchedule
    include_diagonal: bool = False
    penalty: Literal["activation", "decoder"] = "activation"
    warmup_fraction: float = 0.1  # warmup factor = min(1, step / (warmup_fraction * steps))
    ema_floor: float = 1e-4  # sparse EMA: entries below this are dropped (tau is floored at 1e-3)
    dense_ema_max_mib: float = 512.0  # a larger d_sae x d_sae EMA is kept sparse
    _ema: PairEMA | DensePairEMA | None = field(default=None, repr=False)

    def __call__(self, sae: SAE, output: SAEOutput, state: TrainState) -> Tensor:
        p = state.progress
        warmup = min(1.0, state.step / max(self.warmup_fraction * state.total_steps, 1.0))
        weight = self.schedule.weight(p, warmup)
        tau = max(self.schedule.tau(p), TAU_FLOOR)
        pairs = coactive_pairs(output, self.include_diagonal)
        ratio = self._smoothed(pairs, sae.d_sae, state.step)
        coefficient = ((ratio - tau) / tau).clamp(0.0, 1.0)
        chosen = coefficient > 0
        if weight == 0.0 or not bool(chosen.any()):
            return output.acts.new_zeros(())
        magnitude = self._magnitudes(sae, output, pairs, chosen)
        return weight * (coefficient[chosen] * magnitude).sum()

    def state_dict(self) -> dict:
        """The EMA of n_ij (what a resumed run needs to continue exactly)."""
        return {} if self._ema is None else {"ema": self._ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._ema = None
        if "ema" in state:
            kind = DensePairEMA if "matrix" in state["ema"] else PairEMA
            self._ema = kind.from_state_dict(self.schedule.ema_decay, self.ema_floor, state["ema"])

    def _smoothed(self, pairs: CoactivePairs, d_sae: int, step: int) -> Tensor:
        """n_ij at the batch's pairs, through the EMA when the schedule has one."""
        decay = self.schedule.ema_decay
        if decay is None or step < self.schedule.ema_start_step:
            return pairs.ratio
        if self._ema is None:
            self._ema = self._new_ema(decay, d_sae, pairs.keys.device)
        return self._ema.update(pairs.keys, pairs.ratio, step)

    def _new_ema(self, decay: float, d_sae: int, device: torch.device) -> PairEMA | DensePairEMA:
        if d_sae * d_sae * 4 <= self.dense_ema_max_mib * 2**20:
            return DensePairEMA(decay, d_sae * d_sae, device)
        return PairEMA(decay, self.ema_floor, device)

    def _magnitudes(self, sae, output, pairs: CoactivePairs, chosen: Tensor) -> Tensor:
        first, second = pairs.first[chosen], pairs.second[chosen]
        if self.penalty == "decoder":
            return (sae.W_dec[first] * sae.W_dec[second]).sum(-1).abs()
        return pairs.gram(output.acts, chosen).abs()


@dataclass
class CoactivePairs:
    """Ordered pairs (i, j) of latents active together in a batch, with n_ij = C_ij / C_jj.

    Built from :func:`saelib.saes.coactivation.count_pairs` (each unordered pair counted once).
    """

    first: Tensor  # (P,) latent i
    second: Tensor  # (P,) latent j
    keys: Tensor  # (P,) i * d_sae + j
    ratio: Tensor  # (P,) n_ij
    unordered: Tensor  # (P,) index of the unordered pair {i, j}
    counts: PairCounts  # the unordered pairs and the slot entries behind them
    batch_size: int

    def gram(self, acts: Tensor, chosen: Tensor) -> Tensor:
        """F_ij = sum_b f_bi f_bj / B for the chosen ordered pairs, differentiable in ``acts``."""
        a, b = self.counts.slots
        products = (acts[:, a] * acts[:, b])[self.counts.entry_mask]
        summed = products.new_zeros(len(self.counts.keys))
        summed = summed.index_add(0, self.counts.entry_pair, products)
        return summed[self.unordered[chosen]] / self.batch_size


@torch.no_grad()
def coactive_pairs(output: SAEOutput, include_diagonal: bool) -> CoactivePairs:
    """Co-activation statistics of a batch's code (any :class:`SAEOutput`) over its active pairs."""
    d_sae = output.d_sae
    counts = count_pairs(output.acts, output.indices, d_sae, include_diagonal)
    fires = torch.bincount(output.active()[1], minlength=d_sae).float()
    first, second, together, unordered = ordered_pairs(counts.keys, counts.counts, d_sae)
    ratio = together.float() / fires[second]
    keys = first * d_sae + second
    return CoactivePairs(first, second, keys, ratio, unordered, counts, output.acts.shape[0])


class DensePairEMA:
    """Exponential moving average of n_ij over all d_sae x d_sae pairs, as one dense vector
    indexed by i * d_sae + j. A pair absent from a batch counts as n_ij = 0 there: the whole
    matrix is multiplied by decay^(steps since the last update), then this step's pairs get
    (1 - decay) n_ij added. Exact (nothing is pruned); float32, 4 d_sae^2 bytes."""

    def __init__(self, decay: float, size: int, device: torch.device):
        self.decay = decay
        self.matrix = torch.zeros(size, device=device)
        self.last_step: int | None = None

    @classmethod
    def from_state_dict(cls, decay: float, floor: float, state: dict) -> DensePairEMA:
        ema = cls(decay, len(state["matrix"]), state["matrix"].device)
        ema.load_state_dict(state)
        return ema

    def state_dict(self) -> dict[str, Tensor]:
        last = -1 if self.last_step is None else self.last_step
        return {"matrix": self.matrix, "last_step": torch.tensor(last)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.matrix = state["matrix"]
        last = int(state["last_step"])
        self.last_step = None if last < 0 else last

    def update(self, keys: Tensor, ratio: Tensor, step: int) -> Tensor:
        """Fold this step's n_ij (at ``keys``) in; return the averages at ``keys``."""
        if self.last_step is not None and step > self.last_step:
            self.matrix.mul_(self.decay ** (step - self.last_step))
        self.last_step = step
        self.matrix.index_add_(0, keys, (1 - self.decay) * ratio.to(self.matrix.dtype))
        return self.matrix[keys]


class PairEMA:
    """Exponential moving average of n_ij over the pairs seen so far, stored sparsely.

    A pair absent from a batch counts as n_ij = 0 there, so its value just decays; the decay
    is applied lazily (value * decay^(steps since its last update)) when the pair comes back.
    Keys stay sorted; new pairs are merged in, and pairs decayed below ``floor`` are dropped
    every ``prune_every`` steps. Exact up to the pruned values.
    """

    def __init__(self, decay: float, floor: float, device: torch.device, prune_every: int = 25):
        self.decay, self.floor, self.prune_every = decay, floor, prune_every
        self.keys = torch.empty(0, dtype=torch.long, device=device)
        self.values = torch.empty(0, device=device)
        self.stamps = torch.empty(0, dtype=torch.long, device=device)

    @classmethod
    def from_state_dict(cls, decay: float, floor: float, state: dict) -> PairEMA:
        ema = cls(decay, floor, state["keys"].device)
        ema.load_state_dict(state)
        return ema

    def state_dict(self) -> dict[str, Tensor]:
        return {"keys": self.keys, "values": self.values, "stamps": self.stamps}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.keys, self.values, self.stamps = state["keys"], state["values"], state["stamps"]

    def update(self, keys: Tensor, ratio: Tensor, step: int) -> Tensor:
        """Fold this step's n_ij (at ``keys``) in; return the averages at ``keys``."""
        position = torch.searchsorted(self.keys, keys).clamp(max=max(len(self.keys) - 1, 0))
        found = (
            (self.keys[position] == keys)
            if len(self.keys)
            else torch.zeros_like(keys, dtype=torch.bool)
        )
        decayed = torch.zeros_like(ratio)  # decay * (the average after the previous step)
        if bool(found.any()):
            at = position[found]
            decayed[found] = self.values[at] * self.decay ** (step - self.stamps[at]).float()
        smoothed = decayed + (1 - self.decay) * ratio
        if bool(found.any()):
            at = position[found]
            self.values[at], self.stamps[at] = smoothed[found], step
        self._insert(keys[~found], smoothed[~found], step)
        if step % self.prune_every == 0:
            self._prune(step)
        return smoothed

    def _insert(self, keys: Tensor, values: Tensor, step: int) -> None:
        if not len(keys):
            return
        order = keys.argsort()
        keys, values = keys[order], values[order]
        # merged position of each new key: its rank among old keys plus its rank among new ones
        new_at = torch.searchsorted(self.keys, keys) + torch.arange(len(keys), device=keys.device)
        size = len(self.keys) + len(keys)
        is_new = torch.zeros(size, dtype=torch.bool, device=keys.device)
        is_new[new_at] = True
        merged_keys = torch.empty(size, dtype=torch.long, device=keys.device)
        merged_values = torch.empty(size, device=keys.device)
        merged_stamps = torch.empty(size, dtype=torch.long, device=keys.device)
        merged_keys[new_at], merged_keys[~is_new] = keys, self.keys
        merged_values[new_at], merged_values[~is_new] = values, self.values
        merged_stamps[new_at], merged_stamps[~is_new] = step, self.stamps
        self.keys, self.values, self.stamps = merged_keys, merged_values, merged_stamps

    def _prune(self, step: int) -> None:
        current = self.values * self.decay ** (step - self.stamps).float()
        keep = current >= self.floor
        self.keys, self.values, self.stamps = self.keys[keep], self.values[keep], self.stamps[keep]


@dataclass
class OrthogonalTopKLoss:
    """TopK loss (reconstruction + AuxK) plus the orthogonality penalty.

    The penalty's weights (lambda2) are the original's, relative to its reconstruction term
    (squared error summed over d_in, mean over the batch: ``TopKLoss``'s default "l2").
    """

    penalty: OrthogonalityPenalty
    base: TopKLoss = field(default_factory=TopKLoss)

    def __call__(self, sae: SAE, x: Tensor, output: SAEOutput, state: TrainState):
        terms = self.base(sae, x, output, state)
        ortho = self.penalty(sae, output, state)
        terms["ortho"] = ortho
        terms["total"] = terms["total"] + ortho
        return terms

    def check(self, model: nn.Module) -> None:
        """Refuse, before training, a model the base loss cannot train (e.g. AuxK needs TopK)."""
        self.base.check(model)

    def state_dict(self) -> dict:
        return {"penalty": self.penalty.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.penalty.load_state_dict(state["penalty"])


def make_penalty(
    schedule: str,
    include_diagonal: bool = False,
    penalty: Literal["activation", "decoder"] = "activation",
    static_tau: float = 0.8,
    static_weight: float = 0.1,
) -> OrthogonalityPenalty | None:
    """A penalty by schedule name: run1..run7, "static", or "none" (returns None)."""
    if schedule == "none":
        return None
    if schedule == "static":
        chosen = static_schedule(static_tau, static_weight)
    elif schedule in SCHEDULES:
        chosen = SCHEDULES[schedule]
    else:
        raise ValueError(f"unknown schedule {schedule!r}; known: none, static, {sorted(SCHEDULES)}")
    return OrthogonalityPenalty(chosen, include_diagonal=include_diagonal, penalty=penalty)
