"""SparsAE: the weight mask chosen by a gradient-free (1 + lambda) evolution strategy.

:class:`SparsAE` is a hook for :func:`saelib.training.train_saes`, like the updaters of
:mod:`saelib.sparse.updaters`. After step ``step`` it updates a model's masks when
``t = step + 1`` is a multiple of ``update_every`` and ``t < t_end * total_steps``; update ``u``
(0-based) is the one after ``t = (u + 1) * update_every`` steps, and ``n_updates`` is how many
updates the run makes.

One update of one model:

1. Validation: the next-token loss of the model as it enters the update (the parent) on the
   fixed ``val_rows`` (:func:`~saelib.sparse.train.validation_loss`), logged next to P(parent).
2. Mutation: ``n_candidates`` (lambda) candidates, each the parent mask with a swap mutation
   (:func:`swap_mutation`): ``n = max(1, round(swap_fraction * active))`` active weights
   (``active`` counted over all masked layers together) go to 0 and as many weights inactive in
   the parent go to 1, so the global active count stays exactly the same. Drops and grows are
   drawn uniformly at random over the whole model, then capped per layer so that no layer
   leaves ``density_bounds`` (a layer already outside them may move back, never further out;
   see :func:`swap_mutation`). A candidate's newly grown connections carry Kaiming-uniform
   values (``nn.Linear``'s ``kaiming_uniform_(a=sqrt(5))``: U(-b, b) with b = 1/sqrt(fan_in)),
   drawn with the candidate's seeded generator and stored with it, so a winner starts from
   exactly the values it was scored with.
3. Scoring: the parent and every candidate on the same micro-batch, ``pool[u % pool_size]``
   of the fixed pool of training rows given at construction:

   P(M) = w1 z(CE) + w2 (1 - r)^2 z(D) - w3 (1 - r)^2 z(G),   (w1, w2, w3) = (1, 0.01, 0.005)

   with CE the micro-batch's next-token cross-entropy under M, D the (population) standard
   deviation over layers of the layer densities, and G the mean over layers of
   ||dCE/dW * M||_2. Each term is z-normalised with running statistics of every value of that
   term scored so far (Welford mean and n-1 standard deviation, :class:`RunningStats`); an
   update's values all enter the statistics before any of them is normalised, so the parent and
   its candidates are compared on one scale. With fewer than 2 values, or none spread, z(x) is
   x minus the running mean (0 for a single value). The annealing r = u / (0.7 n_updates),
   clipped to 1, takes w2 and w3 to 0 over the first 70% of updates (``anneal_fraction``).
   ``proxy`` "ce" (v0.1) scores CE alone, "ce+diversity" (v0.2) adds D, and
   "ce+diversity+gradient" (v0.3, the default) adds G (computed only by this proxy).
4. Selection: argmin P, the parent winning ties (earlier indices win). A winning candidate's
   mask is set (:meth:`MaskedLinear.set_mask`), its grown weights get their scored values and
   zeroed Adam moments.
5. Conditional global reset: with probability ``reset_probability`` (0.01), raised to
   ``stalled_reset_probability`` (0.1) for the ``stalled_updates`` (2) updates after the
   validation loss has gone ``patience`` (5) updates in a row without a new best (the count then
   starts again), a fraction of the active weights drawn uniformly from ``reset_fraction``
   (5-10%) is reshuffled: the same swap mutation, with as many regrown at random among the
   inactive, Kaiming values, zeroed Adam moments and the per-layer bounds.
6. Burn-in: every connection grown in 4 or 5 gets ``burn_in_lr_factor`` (1.5x) its optimizer
   update for the next ``burn_in_steps`` (5) steps. The optimizer is left alone: the hook runs
   after every optimizer step, remembers those weights after its previous call and sets
   w <- w_prev + 1.5 (w - w_prev). No other weight is touched.

Why scoring leaves the model untouched: each mask is scored with
``torch.func.functional_call(model, {"<layer>.weight": w_M, "<layer>.mask": M, ...})`` with
fresh tensors ``w_M`` (the parent's weights times M, grown positions set to their candidate
values), and G comes from ``torch.autograd.grad`` with respect to those fresh tensors, so no
parameter, mask buffer, ``.grad``, dense gradient or optimizer state is written (the public
SparsAE script wrote candidate weights into the model while scoring and lost the trained
values). The model is scored in its current train/eval mode.

Random choices come from generators seeded by (seed, step, candidate) (:meth:`generator`), and
the per-model state (running statistics, best validation loss and stall count, reset boost,
burn-in positions with their previous values and remaining steps, timings, the model's log
entries) is checkpointed through ``hook_state`` / ``load_hook_state``, so a resumed run makes
exactly the choices an uninterrupted one makes. The hook times itself per model
(``time.perf_counter``): ``search_seconds`` (mutation, scoring, applying, resets and burn-in)
and ``validation_seconds``; :meth:`SparsAE.seconds` gives the totals, to set against the loop's
``TrainResult.seconds`` (training time without hooks).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from saelib.sparse.masks import MaskedLinear, masked_layers
from saelib.sparse.train import next_token_cross_entropy, validation_loss
from saelib.sparse.updaters import _reset_optimizer_state, _Updater
from saelib.training import StepInfo, TrainResult

__all__ = [
    "Candidate",
    "Proxy",
    "RunningStats",
    "SparsAE",
    "apply_candidate",
    "kaiming_values",
    "make_candidate",
    "proxy_scores",
    "score_candidate",
    "swap_mutation",
]

Proxy = Literal["ce", "ce+diversity", "ce+diversity+gradient"]
PROXIES = ("ce", "ce+diversity", "ce+diversity+gradient")
SIGNS = {"ce": 1.0, "d": 1.0, "g": -1.0}  # P rewards a large gradient norm


@dataclass
class RunningStats:
    """Welford's running mean and standard deviation (n - 1) of one proxy term."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count >= 2 else 0.0

    def z(self, value: float) -> float:
        """(value - mean) / std; value - mean while there is no spread (fewer than 2 values)."""
        std = self.std
        return (value - self.mean) / std if std > 0 else value - self.mean


def proxy_scores(
    terms: list[dict[str, float]], stats: dict[str, RunningStats], weights: dict[str, float]
) -> list[float]:
    """P for each mask of one update: every raw term (``"ce"``, ``"d"``, ``"g"``) of every mask
    first enters ``stats`` (updated in place), then P = sum of sign * weight * z(term), with
    sign -1 for ``"g"`` and +1 otherwise; terms whose weight is 0 add nothing."""
    for name in terms[0]:
        running = stats.setdefault(name, RunningStats())
        for values in terms:
            running.add(values[name])
    return [
        sum(
            SIGNS[name] * weight * stats[name].z(values[name])
            for name, weight in weights.items()
            if weight
        )
        for values in terms
    ]


def _count_bounds(
    sizes: list[int], active: list[int], bounds: tuple[float, float]
) -> tuple[list[int], list[int]]:
    """Per layer, the fewest and most active weights a mutation may leave: the density bounds
    as counts, widened to the current count for a layer already outside them."""
    pairs = list(zip(sizes, active, strict=True))
    low = [min(math.ceil(bounds[0] * size), count) for size, count in pairs]
    high = [max(math.floor(bounds[1] * size), count) for size, count in pairs]
    return low, high


def _capped_order(layer_of: Tensor, caps: list[int], perm: Tensor) -> Tensor:
    """The entries of ``perm`` (indices into positions that belong to layer ``layer_of[i]``), in
    order, skipping those of a layer once it has ``caps[layer]``."""
    in_order = layer_of[perm]
    keep = torch.zeros(len(perm), dtype=torch.bool)
    for layer, cap in enumerate(caps):
        keep[(in_order == layer).nonzero().squeeze(1)[: max(cap, 0)]] = True
    return perm[keep]


def swap_mutation(
    masks: dict[str, Tensor],
    n: int,
    density_bounds: tuple[float, float] = (0.05, 0.5),
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """``masks`` with ``n`` active weights turned off and as many inactive ones turned on.

    Allocation: the drops are a uniformly random order of all active weights of all layers,
    taken from the front while skipping a layer once it would fall below its lower bound; the
    grows likewise over all inactive weights, skipping a layer once it would exceed its upper
    bound given its drops. A layer's bounds are ``density_bounds`` as counts (ceil of the lower,
    floor of the upper), widened to its current count when it is already outside them (a layer
    denser than the upper bound may lose weights, never gain net ones). In the rare case that
    the caps leave fewer grows than drops, the last drops are given back until the two match, so
    the global count never changes (``n`` is then smaller). Grows are among the weights
    inactive in ``masks``: a dropped weight is not regrown by the same mutation.
    """
    names = list(masks)
    flat = [masks[name].detach().flatten().cpu() for name in names]
    sizes = [len(mask) for mask in flat]
    active = [int(mask.sum()) for mask in flat]
    low, high = _count_bounds(sizes, active, density_bounds)
    on = [mask.nonzero().squeeze(1) for mask in flat]
    off = [(~mask).nonzero().squeeze(1) for mask in flat]
    layers = torch.arange(len(names))
    on_layer = torch.repeat_interleave(layers, torch.tensor([len(p) for p in on]))
    off_layer = torch.repeat_interleave(layers, torch.tensor([len(p) for p in off]))
    drop_perm = torch.randperm(len(on_layer), generator=generator)
    grow_perm = torch.randperm(len(off_layer), generator=generator)
    drop_caps = [count - least for count, least in zip(active, low, strict=True)]
    drops = _capped_order(on_layer, drop_caps, drop_perm)[:n]
    while True:
        dropped = torch.bincount(on_layer[drops], minlength=len(names)).tolist()
        grow_caps = [
            min(most - count + lost, size - count)
            for most, count, lost, size in zip(high, active, dropped, sizes, strict=True)
        ]
        grows = _capped_order(off_layer, grow_caps, grow_perm)[: len(drops)]
        if len(grows) == len(drops):
            break
        drops = drops[: len(grows)]
    all_on, all_off = torch.cat(on), torch.cat(off)
    result = {}
    for index, name in enumerate(names):
        mask = flat[index].clone()
        mask[all_on[drops[on_layer[drops] == index]]] = False
        mask[all_off[grows[off_layer[grows] == index]]] = True
        result[name] = mask.view_as(masks[name]).to(masks[name].device)
    return result


def kaiming_values(layer: nn.Linear, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws of ``nn.Linear``'s initialisation, ``kaiming_uniform_(a=sqrt(5))``:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from ``generator`` (on the CPU, then moved)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    values = (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return values.to(layer.weight.device, layer.weight.dtype)


@dataclass
class Candidate:
    """A mask per masked layer, the connections it grows over the parent (flat indices) and
    the values they start at."""

    masks: dict[str, Tensor]
    grown: dict[str, Tensor]
    values: dict[str, Tensor]

    def weight(self, name: str, layer: MaskedLinear) -> Tensor:
        """A fresh tensor: the layer's weights under this mask, grown positions at their
        values (what the layer's weight would be if this candidate won)."""
        weight = layer.weight.detach() * self.masks[name]
        weight.view(-1)[self.grown[name]] = self.values[name]
        return weight


def make_candidate(
    layers: dict[str, MaskedLinear], masks: dict[str, Tensor], generator: torch.Generator
) -> Candidate:
    """``masks`` with Kaiming values (from ``generator``) for what they grow over the layers'
    current masks."""
    grown, values = {}, {}
    for name, layer in layers.items():
        grown[name] = (masks[name] & ~layer.mask).flatten().nonzero().squeeze(1)
        values[name] = kaiming_values(layer, len(grown[name]), generator)
    return Candidate(masks, grown, values)


def score_candidate(
    model: nn.Module, candidate: Candidate, rows: Tensor, gradient: bool = True
) -> dict[str, float]:
    """Raw proxy terms of ``candidate`` on the token ``rows`` (batch, context + 1), leaving the
    model bit-identical: ``"ce"`` (next-token cross-entropy), ``"d"`` (population std over
    layers of the layer densities) and, with ``gradient``, ``"g"`` (mean over layers of
    ||dCE/dW * M||_2, by ``torch.autograd.grad`` with respect to fresh weight tensors)."""
    layers = masked_layers(model)
    device = next(iter(layers.values())).weight.device
    rows = rows.to(device)
    weights = {
        name: candidate.weight(name, layer).requires_grad_(gradient)
        for name, layer in layers.items()
    }
    overrides = {f"{name}.weight": weight for name, weight in weights.items()}
    overrides |= {f"{name}.mask": candidate.masks[name] for name in layers}
    kept = [(layer.keep_dense_grad, layer.dense_grad) for layer in layers.values()]
    for layer in layers.values():
        layer.keep_dense_grad = False  # a RigL-style dense-gradient hook would overwrite it
    try:
        with torch.set_grad_enabled(gradient):
            logits = functional_call(model, overrides, (rows[:, :-1],))
            ce = next_token_cross_entropy(logits, rows)
            terms = {"ce": float(ce.detach())}
            if gradient:
                grads = torch.autograd.grad(ce, list(weights.values()))
                norms = [
                    torch.linalg.vector_norm(grad * candidate.masks[name])
                    for grad, name in zip(grads, weights, strict=True)
                ]
                terms["g"] = float(torch.stack(norms).mean())
    finally:
        for layer, (keep, dense) in zip(layers.values(), kept, strict=True):
            layer.keep_dense_grad, layer.dense_grad = keep, dense
    densities = [float(mask.sum()) / mask.numel() for mask in candidate.masks.values()]
    terms["d"] = statistics.pstdev(densities)
    return terms


@torch.no_grad()
def apply_candidate(
    model: nn.Module, candidate: Candidate, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Tensor]:
    """Set the candidate's masks, write its grown weights' values and zero their optimizer
    state; returns each layer's (flat, bool) newly grown connections."""
    new = {}
    for name, layer in masked_layers(model).items():
        layer.set_mask(candidate.masks[name])
        layer.weight.view(-1)[candidate.grown[name]] = candidate.values[name]
        new[name] = torch.zeros(layer.weight.numel(), dtype=torch.bool, device=layer.mask.device)
        new[name][candidate.grown[name]] = True
        _reset_optimizer_state(optimizer, layer.weight, new[name])
    return new


@dataclass
class _ModelState:
    stats: dict[str, RunningStats] = field(default_factory=dict)
    updates: int = 0
    best_val: float = math.inf
    stall: int = 0  # updates in a row without a new best validation loss
    boost: int = 0  # updates left at the stalled reset probability
    # per layer: flat "positions" in burn-in, their "previous" values, "remaining" steps
    burn_in: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    search_seconds: float = 0.0
    validation_seconds: float = 0.0


@dataclass(eq=False)
class SparsAE(_Updater):
    """(1 + lambda) evolution strategy over the weight masks (see the module docstring).

    ``pool`` (pool_size, batch, context + 1) holds the fixed training micro-batches (4-8) the
    candidates are scored on, update ``u`` using ``pool[u % pool_size]``; ``val_rows``
    (n, context + 1) the validation rows measured at every update. Both are keyword-only.
    """

    update_every: int = 1000
    n_candidates: int = 3
    swap_fraction: float = 0.005
    density_bounds: tuple[float, float] = (0.05, 0.5)
    proxy: Proxy = "ce+diversity+gradient"
    proxy_weights: tuple[float, float, float] = (1.0, 0.01, 0.005)  # w1 (CE), w2 (D), w3 (G)
    anneal_fraction: float = 0.7  # w2, w3 reach 0 after this fraction of the updates
    reset_probability: float = 0.01
    stalled_reset_probability: float = 0.1
    stalled_updates: int = 2
    patience: int = 5
    reset_fraction: tuple[float, float] = (0.05, 0.10)
    burn_in_steps: int = 5
    burn_in_lr_factor: float = 1.5
    pool: Tensor = field(kw_only=True, repr=False)
    val_rows: Tensor = field(kw_only=True, repr=False)
    _models: dict[str, _ModelState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool.ndim != 3 or len(self.pool) < 1:
            raise ValueError(f"pool must be (pool_size, batch, context + 1), got {self.pool.shape}")
        if self.val_rows.ndim != 2:
            raise ValueError(f"val_rows must be (n, context + 1), got {self.val_rows.shape}")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {PROXIES}, got {self.proxy!r}")
        low, high = self.density_bounds
        if not 0 <= low < high <= 1 or self.n_candidates < 1 or self.swap_fraction <= 0:
            raise ValueError(
                "need 0 <= density_bounds[0] < density_bounds[1] <= 1, n_candidates >= 1 and "
                f"swap_fraction > 0, got {self.density_bounds}, {self.n_candidates}, "
                f"{self.swap_fraction}"
            )
        if not 0 <= self.reset_fraction[0] <= self.reset_fraction[1] <= 1:
            raise ValueError(f"reset_fraction must be 0 <= low <= high <= 1: {self.reset_fraction}")

    # -- the schedule and the proxy --------------------------------------------------------

    def n_updates(self, total_steps: int) -> int:
        """How many updates a run of ``total_steps`` makes."""
        return sum(
            1
            for t in range(self.update_every, total_steps + 1, self.update_every)
            if t < self.t_end * total_steps
        )

    def term_weights(self, update_index: int, n_updates: int) -> dict[str, float]:
        """(w1, w2 (1 - r)^2, w3 (1 - r)^2) by term, r = update_index / (anneal_fraction *
        n_updates) clipped to 1; the terms the proxy leaves out weigh 0."""
        span = self.anneal_fraction * n_updates
        r = min(1.0, update_index / span) if span > 0 else 1.0
        anneal = (1.0 - r) ** 2
        w1, w2, w3 = self.proxy_weights
        return {
            "ce": w1,
            "d": w2 * anneal if "diversity" in self.proxy else 0.0,
            "g": w3 * anneal if "gradient" in self.proxy else 0.0,
        }

    def candidates(self, model: nn.Module, step: int) -> list[Candidate]:
        """The parent (index 0, the current masks) and the ``n_candidates`` swap mutations of
        the update after ``step`` (seeded by seed, step and the candidate's index)."""
        layers = masked_layers(model)
        parent = {name: layer.mask.clone() for name, layer in layers.items()}
        n = max(1, round(self.swap_fraction * sum(layer.nnz for layer in layers.values())))
        chosen = [make_candidate(layers, parent, torch.Generator())]  # grows nothing
        for index in range(1, self.n_candidates + 1):
            generator = self.generator(step, index)
            masks = swap_mutation(parent, n, self.density_bounds, generator)
            chosen.append(make_candidate(layers, masks, generator))
        return chosen

    def score(self, model: nn.Module, candidates: list[Candidate], rows: Tensor) -> list[dict]:
        """Raw terms of each candidate on ``rows`` (:func:`score_candidate`); G only when the
        proxy uses it."""
        gradient = "gradient" in self.proxy
        return [score_candidate(model, candidate, rows, gradient) for candidate in candidates]

    # -- the hook --------------------------------------------------------------------------

    def __call__(self, info: StepInfo) -> None:
        update = self.is_update(info.step, info.total_steps)
        for result in info.results:
            layers = masked_layers(result.model)
            # a model that did not make this step (diverged, or resumed further on) is skipped
            if result.status == "diverged" or not layers or result.steps != info.step + 1:
                continue
            state = self._models.setdefault(result.name, _ModelState())
            started = time.perf_counter()
            self._burn_in(layers, state)
            state.search_seconds += time.perf_counter() - started
            if update:
                self._update(result, layers, state, info)

    def _update(
        self, result: TrainResult, layers: dict[str, MaskedLinear], state: _ModelState, info
    ) -> None:
        step, model = info.step, result.model
        index = (step + 1) // self.update_every - 1
        started = time.perf_counter()
        val_loss = validation_loss(model, self.val_rows)
        validation_seconds = time.perf_counter() - started
        started = time.perf_counter()
        reset_probability = self._reset_probability(state, val_loss)
        parent = {name: layer.mask.clone() for name, layer in layers.items()}
        candidates = self.candidates(model, step)
        terms = self.score(model, candidates, self.pool[index % len(self.pool)])
        weights = self.term_weights(index, self.n_updates(info.total_steps))
        scores = proxy_scores(terms, state.stats, weights)
        winner = min(range(len(scores)), key=lambda i: (scores[i], i))
        grown = {name: torch.zeros_like(mask).flatten() for name, mask in parent.items()}
        if winner:
            for name, new in apply_candidate(model, candidates[winner], result.optimizer).items():
                grown[name] |= new
        reset = self._maybe_reset(model, layers, step, reset_probability, result.optimizer)
        for name, new in reset.items():
            grown[name] |= new
        self._start_burn_in(layers, state, grown)
        search_seconds = time.perf_counter() - started
        state.updates += 1
        state.search_seconds += search_seconds
        state.validation_seconds += validation_seconds
        kept = sum(int((mask & layers[name].mask).sum()) for name, mask in parent.items())
        self.log.append(
            {
                "model": result.name,
                "step": step,
                "update": index,
                "p": scores,
                "winner": winner,
                **terms[winner],
                "weights": weights,
                "reset": bool(reset),
                "reset_probability": reset_probability,
                "changed": {
                    name: int((mask != layers[name].mask).sum()) for name, mask in parent.items()
                },
                "stability": kept / max(sum(int(mask.sum()) for mask in parent.values()), 1),
                "val_loss": val_loss,
                "search_seconds": search_seconds,
                "validation_seconds": validation_seconds,
            }
        )

    def _reset_probability(self, state: _ModelState, val_loss: float) -> float:
        """This update's reset probability; then the stall count takes ``val_loss`` in."""
        probability = self.stalled_reset_probability if state.boost > 0 else self.reset_probability
        state.boost = max(state.boost - 1, 0)
        if val_loss < state.best_val:
            state.best_val, state.stall = val_loss, 0
        else:
            state.stall += 1
        if state.stall >= self.patience:
            state.boost, state.stall = self.stalled_updates, 0
        return probability

    def _maybe_reset(
        self,
        model: nn.Module,
        layers: dict[str, MaskedLinear],
        step: int,
        probability: float,
        optimizer: torch.optim.Optimizer | None,
    ) -> dict[str, Tensor]:
        """The global reset, when this update's draw is under ``probability``; returns the
        grown connections ({} without a reset)."""
        generator = self.generator(step, 0)
        draw, fraction = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        low, high = self.reset_fraction
        n = round((low + (high - low) * fraction) * sum(layer.nnz for layer in layers.values()))
        if draw >= probability or n == 0:
            return {}
        current = {name: layer.mask for name, layer in layers.items()}
        masks = swap_mutation(current, n, self.density_bounds, generator)
        return apply_candidate(model, make_candidate(layers, masks, generator), optimizer)

    # -- burn-in ---------------------------------------------------------------------------

    @torch.no_grad()
    def _burn_in(self, layers: dict[str, MaskedLinear], state: _ModelState) -> None:
        """Scale this step's update of the weights in burn-in by ``burn_in_lr_factor``."""
        for name in list(state.burn_in):
            entry, layer = state.burn_in[name], layers[name]
            flat = layer.weight.view(-1)
            positions = entry["positions"].to(flat.device)
            previous = entry["previous"].to(flat.device)
            current = flat[positions]
            flat[positions] = previous + self.burn_in_lr_factor * (current - previous)
            remaining = entry["remaining"].to(flat.device) - 1
            keep = (remaining > 0) & layer.mask.view(-1)[positions]
            self._set_burn_in(state, name, flat, positions[keep], remaining[keep])

    @torch.no_grad()
    def _start_burn_in(
        self, layers: dict[str, MaskedLinear], state: _ModelState, grown: dict[str, Tensor]
    ) -> None:
        """Burn-in for the ``grown`` connections (still active); those already in burn-in
        and still active keep their remaining steps."""
        if self.burn_in_steps < 1:
            return
        for name, layer in layers.items():
            flat, active = layer.weight.view(-1), layer.mask.view(-1)
            new = grown[name] & active
            positions = new.nonzero().squeeze(1)
            remaining = torch.full_like(positions, self.burn_in_steps)
            if name in state.burn_in:
                old = state.burn_in[name]["positions"].to(flat.device)
                old_remaining = state.burn_in[name]["remaining"].to(flat.device)
                keep = active[old] & ~new[old]
                positions = torch.cat([old[keep], positions])
                remaining = torch.cat([old_remaining[keep], remaining])
            self._set_burn_in(state, name, flat, positions, remaining)

    @staticmethod
    def _set_burn_in(
        state: _ModelState, name: str, flat: Tensor, positions: Tensor, remaining: Tensor
    ) -> None:
        if len(positions):
            previous = flat[positions].clone()
            state.burn_in[name] = {
                "positions": positions,
                "previous": previous,
                "remaining": remaining,
            }
        else:
            state.burn_in.pop(name, None)

    # -- timing and checkpointed state -----------------------------------------------------

    def seconds(self, name: str) -> dict[str, float]:
        """Seconds spent in the hook for model ``name``: ``search_seconds`` (mutation, scoring,
        applying, resets, burn-in) and ``validation_seconds``."""
        state = self._models.get(name, _ModelState())
        return {
            "search_seconds": state.search_seconds,
            "validation_seconds": state.validation_seconds,
        }

    def hook_state(self, name: str) -> dict | None:
        state = self._models.get(name)
        if state is None:
            return None
        return {
            "stats": {term: vars(running).copy() for term, running in state.stats.items()},
            "updates": state.updates,
            "best_val": state.best_val,
            "stall": state.stall,
            "boost": state.boost,
            "burn_in": {
                layer: {key: value.cpu() for key, value in entry.items()}
                for layer, entry in state.burn_in.items()
            },
            "search_seconds": state.search_seconds,
            "validation_seconds": state.validation_seconds,
            "log": [entry for entry in self.log if entry["model"] == name],
        }

    def load_hook_state(self, name: str, state: dict) -> None:
        self._models[name] = _ModelState(
            stats={term: RunningStats(**values) for term, values in state["stats"].items()},
            updates=state["updates"],
            best_val=state["best_val"],
            stall=state["stall"],
            boost=state["boost"],
            burn_in={layer: dict(entry) for layer, entry in state["burn_in"].items()},
            search_seconds=state["search_seconds"],
            validation_seconds=state["validation_seconds"],
        )
        self.log[:] = [entry for entry in self.log if entry["model"] != name] + state["log"]
        self.log.sort(key=lambda entry: entry["step"])  # stable: models stay in their order
