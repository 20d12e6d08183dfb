"""Progressive sparsity-guided orthogonality penalty (the original's numbers: the study specs).

    L_ortho = lambda2(p) * sum_ij c_ij(p) * |F_ij|,   F = f^T f / B   (activation penalty)
    or        lambda2(p) * sum_ij c_ij(p) * |W_dec_i . W_dec_j|      (decoder-direction penalty)
    n_ij = #(samples where i and j are both active) / #(samples where j is active)   (no grad)
    c_ij = clamp((n_ij - tau(p)) / tau(p), 0, 1)                                     (no grad)

Only pairs of latents that fire together in the batch can have n_ij > 0, and only those with
c_ij > 0 contribute, so everything is computed per entry of the batch's code: each pair of
active slots of a row (B * m (m - 1) / 2 entries for a code of m slots per row, m = k for
TopK), with each entry's pair totals (C_ij, F_ij) gathered through a table indexed by pair
(:class:`PairSums`: a dense d_sae^2 scratch while it fits in ``dense_max_mib``, else the
pairs' ranks from one sort). No d_sae x d_sae matrix is multiplied; any SAE output works
(fixed-k, variable-k, binary), cheaply while the code is sparse (m is the busiest row's count of
active latents: a dense early ReLU code makes it large).
The EMA of n_ij (runs 4-7) covers every pair ever seen, which in practice is a large share of
all d_sae^2 pairs (half of them within a few dozen steps at d_sae 4096, k 40): it is kept as a
dense d_sae x d_sae matrix (:class:`DensePairEMA`, exact, one multiply of the matrix per step)
while that matrix fits in ``dense_max_mib``, else as a sparse tensor of the pairs seen so
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
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from saelib.saes import SAE, SAEOutput
from saelib.training.losses import TopKLoss, TrainState

TAU_FLOOR = 1e-3
ORIGINAL_STEPS = 2441  # the original runs' training steps (batch 2048, ~5M tokens)


@dataclass(frozen=True)
class OrthoSchedule:
    """tau(p) and lambda2(p, warmup) of one run, and its EMA of n_ij."""

    tau: Callable[[float], float]
    weight: Callable[[float, float], float]  # (p, warmup factor) -> lambda2
    ema_decay: float | None = None  # weight of the old value; None: no EMA
    ema_start: float = 0.0  # the EMA starts at this fraction of training
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
        ema_start=100 / ORIGINAL_STEPS,  # step 100 of the original's 2,441: 4% of training
        description="tau 0.9(1-2p) then 0.001; lambda 0.4 cosine warmup; EMA 0.98 from 4% (step "
        "100 of 2,441)",
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
    dense_max_mib: float = 512.0  # larger d_sae x d_sae tables are kept sparse
    _ema: PairEMA | DensePairEMA | None = field(default=None, repr=False)

    def __call__(self, sae: SAE, output: SAEOutput, state: TrainState) -> Tensor:
        p = state.progress
        warmup = min(1.0, state.step / max(self.warmup_fraction * state.total_steps, 1.0))
        weight = self.schedule.weight(p, warmup)
        if weight == 0.0:
            return output.acts.new_zeros(())
        tau = max(self.schedule.tau(p), TAU_FLOOR)
        pairs = slot_pairs(output, self.include_diagonal)
        with torch.no_grad():  # per entry, its pair's totals: rows where both fire, and B F_ij
            pair_sum = PairSums(pairs.keys, sae.d_sae, self._dense(sae.d_sae))
            together, gram = pair_sum(pairs.both), pair_sum(pairs.product.detach())
            forward, backward = self._ratios(pairs, together, sae.d_sae, state)
            # c_ij + c_ji: an entry stands for both orderings of its pair (the diagonal for one)
            coefficient = _coefficient(forward, tau) + _coefficient(backward, tau) * (
                pairs.low != pairs.high
            )
            coefficient *= pairs.both  # an entry with an inactive slot is no pair
        if self.penalty == "decoder":
            return weight * _decoder_magnitudes(sae, pairs, together, coefficient)
        # sum over pairs of c |F_ij| = sum over entries of c sign(F_ij) f_a f_b / B: no gathering
        return weight * (coefficient * gram.sign() * pairs.product).sum() / pairs.batch_size

    def state_dict(self) -> dict:
        """The EMA of n_ij (what a resumed run needs to continue exactly)."""
        return {} if self._ema is None else {"ema": self._ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._ema = None
        if "ema" in state:
            kind = DensePairEMA if "matrix" in state["ema"] else PairEMA
            self._ema = kind.from_state_dict(self.schedule.ema_decay, self.ema_floor, state["ema"])

    def _dense(self, d_sae: int) -> bool:
        return d_sae * d_sae * 4 <= self.dense_max_mib * 2**20

    def _ratios(self, pairs: SlotPairs, together: Tensor, d_sae: int, state: TrainState):
        """(n_low,high, n_high,low) at every entry, through the EMA when the schedule has one."""
        fires = torch.zeros(d_sae, device=pairs.both.device)
        fires.index_add_(0, pairs.latents, pairs.active)
        fires.clamp_(min=1.0)  # a latent that never fires only appears in inactive entries
        low_fires, high_fires = fires[pairs.low], fires[pairs.high]
        decay = self.schedule.ema_decay
        if decay is None or state.progress < self.schedule.ema_start:
            return together / high_fires, together / low_fires
        if self._ema is None:
            self._ema = self._new_ema(decay, d_sae, pairs.keys.device)
        # each entry adds its share of n_ij, 1 / fires_j: a pair's entries add up to n_ij
        diagonal = pairs.low == pairs.high  # one ordering only
        increments = torch.cat([pairs.both / high_fires, pairs.both * ~diagonal / low_fires])
        keys = torch.cat([pairs.keys, pairs.high * d_sae + pairs.low])
        return self._ema.update(keys, (1 - decay) * increments, state.step).chunk(2)

    def _new_ema(self, decay: float, d_sae: int, device: torch.device) -> PairEMA | DensePairEMA:
        if self._dense(d_sae):
            return DensePairEMA(decay, d_sae * d_sae, device)
        return PairEMA(decay, self.ema_floor, device)


def _coefficient(ratio: Tensor, tau: float) -> Tensor:
    return ((ratio - tau) / tau).clamp(0.0, 1.0)


def _decoder_magnitudes(sae: SAE, pairs: SlotPairs, together: Tensor, coefficient: Tensor):
    """sum over the chosen pairs of c * |W_dec_i . W_dec_j|, each pair once."""
    chosen = coefficient > 0
    keys, inverse = torch.unique(pairs.keys[chosen], return_inverse=True)
    with torch.no_grad():  # a pair's entries share its coefficient: their mean is it
        shares = coefficient[chosen] / together[chosen]
        per_pair = coefficient.new_zeros(len(keys)).index_add_(0, inverse, shares)
    low, high = keys // sae.d_sae, keys % sae.d_sae
    return (per_pair * (sae.W_dec[low] * sae.W_dec[high]).sum(-1).abs()).sum()


@dataclass
class SlotPairs:
    """Every pair of slots (a < b, or a <= b with the diagonal) of every row of a code,
    flattened to entries: B * m (m - 1) / 2 of them for m slots per row. An entry names its
    two latents (low <= high); ``both`` says whether both slots are active. Working on these
    entries with per-pair totals (:class:`PairSums`) needs no sort of the pairs."""

    low: Tensor  # (E,) the smaller latent
    high: Tensor  # (E,) the larger latent
    keys: Tensor  # (E,) low * d_sae + high
    both: Tensor  # (E,) float 1.0 where both slots are active
    product: Tensor  # (E,) f_a f_b, differentiable
    latents: Tensor  # (B * m,) every slot's latent, and whether it is active:
    active: Tensor  # (B * m,) float
    batch_size: int


def slot_pairs(output: SAEOutput, include_diagonal: bool) -> SlotPairs:
    acts, indices = output.acts, output.indices
    m = indices.shape[1]
    a, b = torch.triu_indices(m, m, offset=0 if include_diagonal else 1, device=indices.device)
    with torch.no_grad():
        first, second = indices[:, a].flatten(), indices[:, b].flatten()
        low, high = torch.minimum(first, second), torch.maximum(first, second)
        active = (acts != 0).float()
        both = (active[:, a] * active[:, b]).flatten()
    product = (acts[:, a] * acts[:, b]).flatten()
    return SlotPairs(
        low, high, low * output.d_sae + high, both, product,
        indices.flatten(), active.flatten(), acts.shape[0],
    )  # fmt: skip


class PairSums:
    """Per-entry totals of a value over all the entries of the same pair (same key).

    Dense: one shared d_sae^2 table indexed by key, added into and read back, then zeroed at
    the keys touched (O(entries), no sort). Sparse: a table over the pairs ranked by
    ``torch.unique`` (one sort), for a d_sae whose square table would be too large.
    """

    def __init__(self, keys: Tensor, d_sae: int, dense: bool):
        if dense:
            self.index, self.table = keys, _shared_table(d_sae * d_sae, keys.device)
        else:
            unique, self.index = torch.unique(keys, return_inverse=True)
            self.table = torch.zeros(len(unique), device=keys.device)

    @torch.no_grad()
    def __call__(self, values: Tensor) -> Tensor:
        try:
            self.table.index_add_(0, self.index, values)
            return self.table.take(self.index)
        finally:
            self.table.index_fill_(0, self.index, 0.0)


_TABLES: dict[tuple[int, torch.device], Tensor] = {}


def _shared_table(size: int, device: torch.device) -> Tensor:
    """A zeroed float table, shared by every penalty of that size (each leaves it zeroed)."""
    key = (size, torch.device(device))
    if key not in _TABLES:
        _TABLES.clear()  # one table at a time: a grid trains one d_sae
        _TABLES[key] = torch.zeros(size, device=device)
    return _TABLES[key]


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

    def update(self, keys: Tensor, increments: Tensor, step: int) -> Tensor:
        """Decay, then add ``increments`` at ``keys`` (repeated keys add up: a pair's increments
        sum to (1 - decay) n_ij); return the averages at ``keys``."""
        if self.last_step is not None and step > self.last_step:
            self.matrix.mul_(self.decay ** (step - self.last_step))
        self.last_step = step
        self.matrix.index_add_(0, keys, increments.to(self.matrix.dtype))
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

    def update(self, keys: Tensor, increments: Tensor, step: int) -> Tensor:
        """Decay, then add ``increments`` at ``keys`` (repeated keys add up: a pair's increments
        sum to (1 - decay) n_ij); return the averages at ``keys``."""
        keys, inverse = torch.unique(keys, return_inverse=True)
        added = increments.new_zeros(len(keys)).index_add_(0, inverse, increments)
        position = torch.searchsorted(self.keys, keys).clamp(max=max(len(self.keys) - 1, 0))
        found = (
            (self.keys[position] == keys)
            if len(self.keys)
            else torch.zeros_like(keys, dtype=torch.bool)
        )
        decayed = torch.zeros_like(added)  # decay * (the average after the previous step)
        if bool(found.any()):
            at = position[found]
            decayed[found] = self.values[at] * self.decay ** (step - self.stamps[at]).float()
        smoothed = decayed + added
        if bool(found.any()):
            at = position[found]
            self.values[at], self.stamps[at] = smoothed[found], step
        self._insert(keys[~found], smoothed[~found], step)
        if step % self.prune_every == 0:
            self._prune(step)
        return smoothed[inverse]

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
    # n_ij counts pairs within the rows it is given: a process's slice in data parallel
    data_parallel_exact: ClassVar[bool] = False

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
