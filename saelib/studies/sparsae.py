"""SparsAE: dynamic sparse training of a small causal language model, with a gradient-free
evolution strategy choosing the weight mask and an EMA teacher distilling into the student,
against Dense, static magnitude pruning, SET and RigL (spec: the SparsAE study spec).

Every method trains the same model (:class:`~saelib.sparse.lm.TransformerLM`), on the same
token rows in the same order, for the same steps, at the same global sparsity of its masked
Linears (attention and MLP) with Erdos-Renyi-Kernel layer densities. All models of a run train
in one pass of the shared loop; the mask updaters, the FLOP counter and the EMA teacher are
its hooks. Measured per model: validation perplexity, training FLOPs over unmasked weights (and
SparsAE's extra FLOPs: its teacher's forward and its candidate scoring), wall-clock, mask-search
overhead, layer-wise sparsity, mask stability between updates, structurally dead MLP neurons,
the proxy P(M) against validation loss, and the training state's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from saelib.params import (
    ParamsError,
    require_choices,
    require_fraction,
    require_non_empty,
    require_non_negative,
    require_positive,
    require_probability,
    require_unique,
)
from saelib.sparse import (
    SET,
    FlopCounter,
    LMConfig,
    NextTokenLoss,
    RigL,
    StaticMagnitude,
    TextConfig,
    TextData,
    TransformerLM,
    layer_densities,
    mask_linears,
    masked_layers,
    random_masks,
    track_dense_grads,
    validation_loss,
)
from saelib.sparse.distill import DistillationLoss, EMATeacherUpdate
from saelib.sparse.evolution import PROXIES, SparsAE
from saelib.sparse.flops import flops_per_token
from saelib.studies.claims import Claim, seed_spread, summarize_seeds
from saelib.studies.common import check_dataset, check_device, check_seed_range
from saelib.studies.record import Headline, Study
from saelib.studies.results import StudyResults, as_float, claims_held
from saelib.training import TrainConfig, TrainResult, TrainSpec, for_models, train_saes

METHODS = ("dense", "static", "set", "rigl", "sparsae")
# each ablation switches one part of SparsAE off
ABLATIONS = ("no_distillation", "no_burn_in", "no_reset", "ce_only")


@dataclass
class SparsAEParams:
    # data: documents split into train and validation by document, packed into rows
    dataset: str = "wiki"
    tokenizer: str = "bytes"
    context: int = 64
    val_fraction: float = 0.1
    split_seed: int = 0
    max_documents: int | None = None
    # the model (LMConfig fields; the vocabulary comes from the tokenizer)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_mlp: int = 256
    # the comparison
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    sparsities: list[float] = field(default_factory=lambda: [0.7, 0.8, 0.9])
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    ablation_sparsity: float = 0.8
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # training, the same for every model: max_tokens / (batch_size * context) steps
    max_tokens: int = 512_000  # 500 steps of 16 rows of 64 tokens
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 40
    update_every: int = 50  # SET and RigL mask updates (RigL's dT: 100 at the plan's scale)
    sparsae_update_every: int = 50  # SparsAE's K_update (1000 at the plan's scale)
    t_end: float = 0.75  # masks fixed after this fraction of training (RigL's T_end)
    static_prune_step: int = 0  # static magnitude pruning after this step
    set_zeta: float = 0.3
    rigl_alpha: float = 0.3
    # SparsAE's evolution strategy
    n_candidates: int = 3  # lambda of the (1 + lambda)-ES
    swap_fraction: float = 0.005
    density_bounds: list[float] = field(default_factory=lambda: [0.05, 0.5])
    proxy: str = "ce+diversity+gradient"  # the v0.3 phase; "ce" is v0.1, "ce+diversity" v0.2
    proxy_weights: list[float] = field(default_factory=lambda: [1.0, 0.01, 0.005])
    pool_size: int = 4  # fixed micro-batches scored in rotation
    burn_in_steps: int = 5
    burn_in_lr_factor: float = 1.5
    reset_probability: float = 0.01
    stalled_reset_probability: float = 0.1
    patience: int = 5
    val_rows_for_search: int = 32  # validation rows the search measures at each update
    # SparsAE's self-distillation: the plan's beta 0.999 and 500 warm-up steps are for long
    # runs; a teacher averaging over ~1000 steps barely leaves its initialisation in a few
    # hundred, so short runs scale both (time constant 1 / (1 - beta) steps)
    teacher_beta: float = 0.98
    distill_warmup_fraction: float = 0.1
    distill_alpha_start: float = 0.5
    distill_alpha_end: float = 0.1
    eval_rows: int = 2048  # validation rows for the final perplexity
    eval_batch_size: int = 64
    checkpoint_every: int = 200
    device: str = "auto"

    def check(self) -> None:
        """Impossible values stop here, before any compute."""
        require_positive(self, "context", "d_model", "n_layers", "n_heads", "d_mlp", "max_tokens")
        require_positive(self, "batch_size", "lr", "update_every", "sparsae_update_every")
        require_positive(self, "n_candidates", "pool_size")
        require_positive(self, "val_rows_for_search", "eval_rows", "eval_batch_size")
        require_non_negative(self, "warmup_steps", "static_prune_step", "burn_in_steps")
        require_non_negative(self, "checkpoint_every", "patience", "split_seed")
        require_fraction(self, "val_fraction", "set_zeta", "rigl_alpha", "swap_fraction")
        require_fraction(self, "teacher_beta")
        require_probability(self, "t_end", "distill_warmup_fraction", "reset_probability")
        require_probability(self, "stalled_reset_probability")
        require_non_empty(self, "methods", "sparsities", "seeds")
        require_unique(self, "methods", "sparsities", "ablations", "seeds")
        check_seed_range(self.seeds)
        check_device(self.device)
        self.dataset = check_dataset(self.dataset)
        require_choices(self, "methods", METHODS)
        require_choices(self, "ablations", ABLATIONS)
        require_choices(self, "proxy", PROXIES)
        for name in ("sparsities", "ablation_sparsity"):
            values = getattr(self, name)
            for value in values if isinstance(values, list) else [values]:
                if not 0 < value < 1:
                    raise ParamsError(f"{name}: {value} is not a sparsity in (0, 1)")
        if self.ablations and self.ablation_sparsity not in self.sparsities:
            raise ParamsError(f"ablation_sparsity={self.ablation_sparsity} is not in "
                              f"sparsities={self.sparsities}")  # fmt: skip
        if self.ablations and "sparsae" not in self.methods:
            raise ParamsError("ablations: SparsAE's ablations need 'sparsae' in methods")
        low, high = self.density_bounds
        if not 0 < low < high <= 1:
            raise ParamsError(f"density_bounds: {self.density_bounds} is not 0 < low < high <= 1")
        if len(self.proxy_weights) != 3:
            raise ParamsError("proxy_weights: give three weights (CE, diversity, gradient)")
        if self.d_model % self.n_heads:
            raise ParamsError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        every = max(self.update_every, self.sparsae_update_every)
        if self.steps * self.t_end <= every:
            raise ParamsError(
                f"max_tokens={self.max_tokens} gives {self.steps} steps, too few for a mask "
                f"update every {every} steps before t_end={self.t_end}"
            )

    @property
    def steps(self) -> int:
        """Training steps of every model."""
        return max(1, self.max_tokens // (self.batch_size * self.context))

    def text_config(self) -> TextConfig:
        return TextConfig(self.dataset, self.tokenizer, self.context, self.val_fraction,
                          self.split_seed, self.max_documents)  # fmt: skip

    def lm_config(self, vocab_size: int) -> LMConfig:
        return LMConfig(vocab_size, self.d_model, self.n_layers, self.n_heads, self.d_mlp,
                        self.context)  # fmt: skip

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            lr=self.lr,
            batch_size=self.batch_size,
            max_tokens=self.steps * self.batch_size,  # rows: one per sequence
            warmup_steps=self.warmup_steps,
            lr_schedule="cosine",
            decay_start=0.0,
            device=self.device,
            divergence_factor=None,  # a language model's loss only falls from log(vocab)
            checkpoint_every=self.checkpoint_every,
            log_every=10,
        )


# ---------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Cell:
    """One trained configuration: a method at a sparsity, or a SparsAE ablation."""

    method: str
    sparsity: float  # 0 for dense
    ablation: str = ""

    @property
    def name(self) -> str:
        base = "dense" if self.method == "dense" else f"{self.method}-s{round(self.sparsity * 100)}"
        return f"{base}-{self.ablation}" if self.ablation else base

    @property
    def variant(self) -> str:
        """The row label of a table: the method, or the SparsAE ablation."""
        return f"sparsae ({self.ablation.replace('_', ' ')})" if self.ablation else self.method

    def labels(self, seed: int) -> dict[str, Any]:
        return {"cell": self.name, "method": self.method, "variant": self.variant,
                "sparsity": self.sparsity, "ablation": self.ablation, "seed": seed}  # fmt: skip


def build_cells(params: SparsAEParams) -> list[Cell]:
    cells = [Cell("dense", 0.0)] if "dense" in params.methods else []
    sparse = [method for method in params.methods if method != "dense"]
    cells += [Cell(method, sparsity) for sparsity in params.sparsities for method in sparse]
    cells += [Cell("sparsae", params.ablation_sparsity, name) for name in params.ablations]
    return cells


def spec_name(cell: Cell, seed: int) -> str:
    return f"{cell.name}-seed{seed}"


def build_model(params: SparsAEParams, cell: Cell, vocab_size: int, seed: int) -> TransformerLM:
    """The seeded model; sparse methods start from an ERK mask, random for the dynamic ones
    (static magnitude pruning replaces it by the largest weights at ``static_prune_step``)."""
    model = mask_linears(TransformerLM(params.lm_config(vocab_size), seed=seed))
    if cell.method != "dense":
        random_masks(model, 1 - cell.sparsity, seed=seed)
    if cell.method == "rigl":
        track_dense_grads(model)
    return model


def build_loss(params: SparsAEParams, cell: Cell) -> NextTokenLoss | DistillationLoss:
    if cell.method != "sparsae" or cell.ablation == "no_distillation":
        return NextTokenLoss()
    return DistillationLoss(
        beta=params.teacher_beta,
        warmup_fraction=params.distill_warmup_fraction,
        alpha_start=params.distill_alpha_start,
        alpha_end=params.distill_alpha_end,
    )


@dataclass
class Hooks:
    """The hooks of one run, kept for their logs and counters."""

    flops: FlopCounter
    updaters: dict[str, Any]  # hook key -> updater (SET, RigL, StaticMagnitude, SparsAE)
    snapshot: MaskSnapshot

    def ordered(self, chosen: dict[str, list[str]]) -> list:
        """The FLOP counter first (a step costs what its masks were during it), then each
        updater restricted to its models, the EMA teacher, and the mask snapshot last."""
        restricted = [for_models(chosen[key], hook) for key, hook in self.updaters.items()]
        return [self.flops, *restricted, EMATeacherUpdate(), self.snapshot]


@dataclass
class MaskSnapshot:
    """Each model's masks once its initial mask is final (after the static prune), so that
    the explorer can show where connections were gained over training."""

    after_step: int
    masks: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def __call__(self, info) -> None:
        if info.step != self.after_step:
            return
        for result in info.results:
            layers = masked_layers(result.model)
            self.masks[result.name] = {
                name: layer.mask.cpu().clone() for name, layer in layers.items()
            }

    def hook_state(self, name: str) -> dict | None:
        return {"masks": self.masks[name]} if name in self.masks else None

    def load_hook_state(self, name: str, state: dict) -> None:
        self.masks[name] = state["masks"]


def sparsae_hook(params: SparsAEParams, cell: Cell, data: TextData) -> SparsAE:
    """SparsAE's mask search for ``cell`` (its ablation switches one part off)."""
    return SparsAE(
        update_every=params.sparsae_update_every,
        t_end=params.t_end,
        seed=params.split_seed,
        n_candidates=params.n_candidates,
        swap_fraction=params.swap_fraction,
        density_bounds=tuple(params.density_bounds),
        pool=search_pool(params, data),
        val_rows=data.val[: params.val_rows_for_search],
        proxy="ce" if cell.ablation == "ce_only" else params.proxy,
        proxy_weights=tuple(params.proxy_weights),
        burn_in_steps=0 if cell.ablation == "no_burn_in" else params.burn_in_steps,
        burn_in_lr_factor=params.burn_in_lr_factor,
        reset_probability=0.0 if cell.ablation == "no_reset" else params.reset_probability,
        stalled_reset_probability=(
            0.0 if cell.ablation == "no_reset" else params.stalled_reset_probability
        ),
        patience=params.patience,
    )


def search_pool(params: SparsAEParams, data: TextData) -> Tensor:
    """``pool_size`` fixed micro-batches of training rows, seeded: (pool, batch, context + 1)."""
    generator = torch.Generator().manual_seed(params.split_seed)
    count = params.pool_size * params.batch_size
    chosen = torch.randperm(len(data.train), generator=generator)[:count]
    return data.train[chosen].view(params.pool_size, params.batch_size, -1)


def build_run(
    params: SparsAEParams, data: TextData
) -> tuple[list[TrainSpec], Hooks, dict[str, list[str]]]:
    """Every (cell, seed) as a spec, the hooks, and which models each updater acts on."""
    vocab = data.tokenizer.vocab_size
    specs, chosen, updaters = [], {}, {}
    for cell in build_cells(params):
        names = [spec_name(cell, seed) for seed in params.seeds]
        for seed, name in zip(params.seeds, names, strict=True):
            model = build_model(params, cell, vocab, seed)
            specs.append(TrainSpec(name, model, build_loss(params, cell), {}, cell.labels(seed)))
        if cell.method == "dense":
            continue
        key = cell.name
        updaters[key] = _updater(params, cell, data)
        chosen[key] = names
    tokens_per_step = params.batch_size * params.context
    rigl = next((hook for hook in updaters.values() if isinstance(hook, RigL)), None)
    hooks = Hooks(
        FlopCounter(tokens_per_step, rigl), updaters, MaskSnapshot(params.static_prune_step)
    )
    return specs, hooks, chosen


def _updater(params: SparsAEParams, cell: Cell, data: TextData):
    every, t_end, seed = params.update_every, params.t_end, params.split_seed
    if cell.method == "static":
        return StaticMagnitude(1 - cell.sparsity, at_step=params.static_prune_step)
    if cell.method == "set":
        return SET(update_every=every, t_end=t_end, seed=seed, zeta=params.set_zeta)
    if cell.method == "rigl":
        return RigL(update_every=every, t_end=t_end, seed=seed, alpha=params.rigl_alpha)
    return sparsae_hook(params, cell, data)


@dataclass
class Trained:
    """What training produced: the results and the hooks with their logs."""

    results: list[TrainResult]
    hooks: Hooks
    cells: dict[str, Cell]  # spec name -> cell


def train_all(
    params: SparsAEParams,
    data: TextData,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> Trained:
    """Train every model in one pass over the rows (resuming from ``checkpoint_dir``)."""
    specs, hooks, chosen = build_run(params, data)
    results = train_saes(specs, data.train, params.train_config(), checkpoint_dir,
                         hooks=hooks.ordered(chosen), progress=progress)  # fmt: skip
    cells = {spec_name(cell, seed): cell for cell in build_cells(params) for seed in params.seeds}
    return Trained(results, hooks, cells)


# ------------------------------------------------------------------------------- measurements


def evaluate_all(trained: Trained, data: TextData, params: SparsAEParams) -> pd.DataFrame:
    """One row per model: perplexity, FLOPs, time, overhead, density, dead neurons, memory."""
    rows = data.val[: params.eval_rows]
    records = []
    for result in trained.results:
        cell = trained.cells[result.name]
        loss = validation_loss(result.model, rows, params.eval_batch_size)
        records.append(
            {
                **result.labels,
                "status": result.status,
                "val_loss": loss,
                "perplexity": math.exp(loss),
                "train_seconds": result.seconds,
                "late_ce_change": late_change(result.history),
                **_costs(trained, result, cell, params),
                **_structure(result.model),
                "state_mib": state_bytes(result) / 2**20,
            }  # fmt: skip
        )
    return pd.DataFrame(records)


def late_change(history: list[dict], fraction: float = 0.1) -> float:
    """Mean training cross-entropy over the last ``fraction`` of the logged steps minus the
    mean over the ``fraction`` before (negative: still falling)."""
    values = [entry.get("ce", entry["total"]) for entry in history]
    width = max(1, round(fraction * len(values)))
    if len(values) < 2 * width:
        return float("nan")
    last, before = values[-width:], values[-2 * width : -width]
    return sum(last) / width - sum(before) / width


def _costs(trained: Trained, result: TrainResult, cell: Cell, params: SparsAEParams) -> dict:
    """Training FLOPs over unmasked weights, SparsAE's extra FLOPs, and its search time."""
    flops = trained.hooks.flops
    sparse, total = flops.sparse.get(result.name, 0.0), flops.total.get(result.name, 0.0)
    costs = {"train_flops": total, "masked_flops": sparse, "extra_flops": 0.0,
             "search_seconds": 0.0, "search_overhead_pct": 0.0,
             "update_cost_steps": float("nan")}  # fmt: skip
    hook = trained.hooks.updaters.get(cell.name)
    if isinstance(hook, SparsAE):
        spent = sum(hook.seconds(result.name).values())  # search and its validation
        updates = sum(entry["model"] == result.name for entry in hook.log)
        step_seconds = result.seconds / max(result.steps, 1)
        costs["search_seconds"] = spent
        costs["search_overhead_pct"] = 100 * spent / max(result.seconds, 1e-9)
        # one update's cost in training steps: the overhead at any other update interval
        costs["update_cost_steps"] = spent / max(updates, 1) / max(step_seconds, 1e-12)
        costs["extra_flops"] = sparsae_extra_flops(result, hook, params)
    return costs


def sparsae_extra_flops(result: TrainResult, hook: SparsAE, params: SparsAEParams) -> float:
    """What SparsAE adds to the training FLOPs: its teacher's forward pass (dense: the teacher
    averages every mask's weights) on each distilled step, and the scoring of the parent and
    each candidate (forward and backward on one micro-batch) plus the validation forward at
    each update."""
    model = result.model
    per_token = flops_per_token(model)
    dense_forward = 2 * sum(layer.mask.numel() for layer in masked_layers(model).values())
    forward = per_token.forward + per_token.dense // 3  # the dense part's forward third
    tokens_per_step = params.batch_size * params.context
    loss = result.loss
    distilled = 0
    if isinstance(loss, DistillationLoss):
        total = params.steps
        distilled = sum(loss.alpha(step, total) > 0 for step in range(total))
    teacher = distilled * tokens_per_step * (dense_forward + per_token.dense // 3)
    updates = len([entry for entry in hook.log if entry["model"] == result.name])
    scored = (params.n_candidates + 1) * tokens_per_step * per_token.training
    validated = params.val_rows_for_search * params.context * forward
    return float(teacher + updates * (scored + validated))


def _structure(model: torch.nn.Module) -> dict:
    """Global density of the masked Linears and the MLP neurons left without any input or
    without any output connection (structurally dead)."""
    layers = masked_layers(model)
    total = sum(layer.mask.numel() for layer in layers.values())
    density = sum(layer.nnz for layer in layers.values()) / total
    dead, neurons = 0, 0
    for block in model.blocks:
        up, down = block.mlp.up.mask, block.mlp.down.mask  # (d_mlp, d_model), (d_model, d_mlp)
        dead += int((~up.any(dim=1) | ~down.any(dim=0)).sum())
        neurons += up.shape[0]
    return {"density": density, "dead_neurons": dead / neurons}


def state_bytes(result: TrainResult) -> int:
    """Bytes of the training state: parameters, gradients, Adam's two moments, masks, and the
    EMA teacher when there is one. Masks emulate sparsity, so every tensor is dense."""
    model = result.model
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    masks = sum(layer.mask.numel() for layer in masked_layers(model).values())  # bool: 1 byte
    teacher = getattr(result.loss, "teacher", None)
    teacher_bytes = parameters if teacher is not None else 0
    return 4 * parameters + masks + teacher_bytes


def peak_memory_mib() -> dict[str, float]:
    """The process's peak resident memory (all models of the run together, they train in one
    process) and, on a GPU, the peak of torch's allocations there."""
    import resource

    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB
    if torch.cuda.is_available():
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def summarize(per_seed: pd.DataFrame) -> pd.DataFrame:
    metrics = ["perplexity", "val_loss", "train_flops", "extra_flops", "train_seconds",
               "search_overhead_pct", "update_cost_steps", "density", "dead_neurons",
               "state_mib"]  # fmt: skip
    summary = summarize_seeds(per_seed, ["cell", "variant", "method", "sparsity"], metrics)
    return summary.reset_index().sort_values(["sparsity", "cell"]).reset_index(drop=True)


def main_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Perplexity (mean ± std) by method and sparsity, the methods as rows."""
    main = summary[~summary["variant"].str.contains("(", regex=False)]
    pairs = zip(main["perplexity_mean"], main["perplexity_std"], strict=True)
    values = [f"{mean:.3f} ± {std:.3f}" if std == std else f"{mean:.3f}" for mean, std in pairs]
    table = main.assign(value=values).pivot(index="method", columns="sparsity", values="value")
    return table.fillna("")


def ablation_table(summary: pd.DataFrame, params: SparsAEParams) -> pd.DataFrame:
    """SparsAE and its ablations at ``ablation_sparsity``."""
    at = summary[
        (summary["method"] == "sparsae") & (summary["sparsity"] == params.ablation_sparsity)
    ]
    return at.set_index("variant")


def mask_stability(trained: Trained) -> pd.DataFrame:
    """Per model and update: the fraction of active connections kept through the update
    (SparsAE logs it; SET and RigL log the connections each update grew, out of a constant
    active count)."""
    nnz = {result.name: sum(layer.nnz for layer in masked_layers(result.model).values())
           for result in trained.results}  # fmt: skip
    rows = []
    for hook in trained.hooks.updaters.values():
        for entry in getattr(hook, "log", []):
            cell, name = trained.cells[entry["model"]], entry["model"]
            stability = entry.get("stability", 1 - sum(entry["changed"].values()) / nnz[name])
            rows.append({"model": name, "variant": cell.variant, "sparsity": cell.sparsity,
                         "step": entry["step"], "stability": stability})  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "variant", "sparsity", "step", "stability"])


def proxy_trajectory(trained: Trained) -> pd.DataFrame:
    """At each SparsAE update: P(M) of the mask in use (the parent) and the validation loss
    measured on the model as it entered the update, and which candidate won."""
    rows = []
    for hook in trained.hooks.updaters.values():
        if not isinstance(hook, SparsAE):
            continue
        for entry in hook.log:
            cell = trained.cells[entry["model"]]
            rows.append({"model": entry["model"], "variant": cell.variant,
                         "sparsity": cell.sparsity, "step": entry["step"],
                         "proxy": entry["p"][0], "val_loss": entry["val_loss"],
                         "winner": entry["winner"], "reset": entry["reset"]})  # fmt: skip
    return pd.DataFrame(rows)


def proxy_correlation(trajectory: pd.DataFrame) -> pd.DataFrame:
    """Per model: Pearson and Spearman correlation of P(M) with validation loss over updates."""
    rows = []
    for model, group in trajectory.groupby("model"):
        pearson = group["proxy"].corr(group["val_loss"])
        spearman = group["proxy"].corr(group["val_loss"], method="spearman")
        rows.append({"model": model, "variant": group["variant"].iloc[0],
                     "sparsity": group["sparsity"].iloc[0], "pearson": pearson,
                     "spearman": spearman, "updates": len(group)})  # fmt: skip
    return pd.DataFrame(rows)


def layer_table(trained: Trained) -> pd.DataFrame:
    """Final density of each masked layer, mean over seeds, by cell."""
    rows = [
        {"variant": trained.cells[result.name].variant,
         "sparsity": trained.cells[result.name].sparsity, "layer": layer, "density": density}
        for result in trained.results
        for layer, density in layer_densities(result.model).items()
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    return (
        frame.groupby(["variant", "sparsity", "layer"], sort=False)["density"].mean().reset_index()
    )


def models_of(trained: Trained, seed: int, sparsity: float | None = None) -> dict:
    """The trained models of one seed (at one sparsity, sparse methods only, when given), no
    ablations, by spec name."""
    chosen = {}
    for result in trained.results:
        cell = trained.cells[result.name]
        wanted = sparsity is None or (cell.sparsity == sparsity and cell.method != "dense")
        if result.labels["seed"] == seed and not cell.ablation and wanted:
            chosen[result.name] = result.model
    return chosen


# ----------------------------------------------------------------------------------- claims


def check_claims(
    summary: pd.DataFrame, per_seed: pd.DataFrame, params: SparsAEParams, vocab_size: int
) -> list[Claim]:
    """The plan's three success criteria, judged on SparsAE (all parts on) at each sparsity."""
    sparsae = summary[summary["variant"] == "sparsae"].set_index("sparsity")
    if sparsae.empty:
        return []
    claims = [claim_converges(per_seed, vocab_size), claim_overhead(sparsae, params)]
    rigl = summary[summary["variant"] == "rigl"].set_index("sparsity")
    if not rigl.empty:
        claims.append(claim_matches_rigl(sparsae, rigl))
    return claims


def claim_converges(per_seed: pd.DataFrame, vocab_size: int) -> Claim:
    """Every SparsAE seed finished with a finite loss, its validation loss ended well below the
    uniform predictor's log(vocab) (under 3/4 of it), and its training cross-entropy was not
    rising at the end (``late_ce_change``, last tenth of training minus the tenth before, at
    most +0.01 nats). How it compares with the other methods is criterion 3's question."""
    rows = per_seed[per_seed["variant"] == "sparsae"]
    finished = bool((rows["status"] == "complete").all()) and bool(rows["val_loss"].notna().all())
    uniform = math.log(vocab_size)
    by_sparsity = rows.groupby("sparsity")[["val_loss", "late_ce_change"]]
    mean, std = by_sparsity.mean(), by_sparsity.std()
    learned = bool((mean["val_loss"] < 0.75 * uniform).all())
    settled = bool((rows["late_ce_change"] <= 0.01).all())
    parts = [
        f"s={sparsity:g}: val loss {mean.loc[sparsity, 'val_loss']:.3f} ± "
        f"{std.loc[sparsity, 'val_loss']:.3f}, late change of training CE "
        f"{mean.loc[sparsity, 'late_ce_change']:+.3f} ± {std.loc[sparsity, 'late_ce_change']:.3f}"
        for sparsity in mean.index
    ]
    evidence = (f"{len(rows)} runs, all finished with finite losses: {finished}; "
                + "; ".join(parts) + f" (uniform predictor: {uniform:.3f} nats)")  # fmt: skip
    return Claim("SparsAE converges", finished and learned and settled, evidence, 1)


def claim_overhead(sparsae: pd.DataFrame, params: SparsAEParams) -> Claim:
    """Mask search (mutation, scoring, applying, and the validation loss the reset rule reads)
    as a share of training step time, mean over seeds, at every sparsity."""
    values = sparsae["search_overhead_pct_mean"]
    stds = sparsae["search_overhead_pct_std"].fillna(0)
    holds = bool(((values + stds) < 5).all())
    evidence = "; ".join(f"s={s:g}: {v:.2f}% ± {d:.2f}" for s, v, d in
                         zip(values.index, values, stds, strict=True))  # fmt: skip
    evidence += f" of training time with an update every {params.sparsae_update_every} steps"
    cost = sparsae["update_cost_steps_mean"].mean()
    evidence += (
        f"; one update costs {cost:.1f} training steps, so {100 * cost / 1000:.2f}% at "
        "the plan's interval of 1000 steps (extrapolated, not measured)"
    )
    return Claim("the mask search costs < 5% of step time", holds, evidence, 2)


def claim_matches_rigl(sparsae: pd.DataFrame, rigl: pd.DataFrame) -> Claim:
    """At each sparsity, SparsAE's mean perplexity is below RigL's or within the seed spread."""
    parts, holds = [], True
    for sparsity in sparsae.index.intersection(rigl.index):
        mine, theirs = sparsae.loc[sparsity], rigl.loc[sparsity]
        difference = mine["perplexity_mean"] - theirs["perplexity_mean"]
        spread = seed_spread(mine["perplexity_std"], theirs["perplexity_std"])
        holds = holds and bool(difference <= spread)
        verdict = "worse" if difference > spread else "better" if difference < -spread else "tie"
        parts.append(f"s={sparsity:g}: SparsAE {mine['perplexity_mean']:.3f} vs RigL "
                     f"{theirs['perplexity_mean']:.3f} ({difference:+.3f}, spread {spread:.3f}: "
                     f"{verdict})")  # fmt: skip
    return Claim("SparsAE matches or beats RigL's perplexity at the same sparsity", holds,
                 "; ".join(parts), 3)  # fmt: skip


# ------------------------------------------------------------------------ results and record


def write_results(
    run_dir: Path,
    params: SparsAEParams,
    data: TextData,
    per_seed: pd.DataFrame,
    summary: pd.DataFrame,
    correlations: pd.DataFrame,
    seconds: dict[str, float],
) -> StudyResults:
    """Judge the claims and write ``results.json`` into ``run_dir``."""
    results = StudyResults.from_tables(
        STUDY.name, params, per_seed, summary,
        claims=check_claims(summary, per_seed, params, data.tokenizer.vocab_size),
        seconds=seconds,
        extra={"train_rows": len(data.train), "val_rows": len(data.val), "steps": params.steps,
               "peak_memory_mib": peak_memory_mib(),
               "tokens_per_model": params.steps * params.batch_size * params.context,
               "proxy_correlation": correlations.to_dict("records")},
    )  # fmt: skip
    results.save(run_dir)
    return results


def headlines(results: dict[str, Any]) -> dict[str, Headline]:
    """The index page's numbers: SparsAE and RigL perplexity at the ablation sparsity."""
    sparsity = results["params"]["ablation_sparsity"]
    rows = {(row["variant"], row["sparsity"]): row for row in results["summary"]}
    numbers = {}
    for variant in ("sparsae", "rigl", "dense"):
        row = rows.get((variant, sparsity)) or rows.get((variant, 0.0))
        if row is not None:
            numbers[f"{variant} ppl"] = Headline(
                f"{as_float(row['perplexity_mean']):.3f}",
                f"{row['cell']}: validation perplexity per token, mean over seeds",
            )
    numbers["claims held"] = claims_held(results["claims"])
    return numbers


STUDY = Study(
    name="sparsae",
    params_class=SparsAEParams,
    description="dynamic sparse training of a causal LM: SparsAE's evolution strategy and "
    "self-distillation against Dense, static, SET and RigL",
    headlines=headlines,
    key_params=("dataset", "d_model", "n_layers", "sparsities", "seeds", "max_tokens"),
)
