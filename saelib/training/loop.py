"""The one training loop, for SAEs and any other model.

``train_saes`` trains several models from a single pass over the data: each batch is read once
and given to every model. The batch order is a pure function of (seed, step), so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would.

The loop knows no architecture. Per model and step it computes ``output = model(batch)`` (or
``model(loss.model_input(batch))`` when the loss defines it) and
``terms = loss(model, batch, output, state)``, minimises ``terms["total"]``, and calls what the
model defines of:

- ``on_first_batch(batch)`` before step 0 (a TopK SAE places its decoder bias),
- ``before_optimizer_step()`` after the backward pass, before gradient clipping and the update
  (an SAE drops the gradient component along its decoder directions),
- ``after_optimizer_step()`` after the update (an SAE renormalises its decoder).

When the output has ``fired()`` ((n_latents,) bool), latents silent for ``dead_after_tokens``
vectors are passed to the loss as dead (``TrainState.dead``; None otherwise). Hooks
``hook(StepInfo)`` run after every step and see the models and their optimizers. A hook that
keeps state per model (a mask search's running statistics) defines ``hook_state(name)`` and
``load_hook_state(name, state)``: that state goes into the model's checkpoint and comes back on
resume.

A checkpoint records what it was trained on (model config, a fingerprint of the data, the
training config, the loss); resuming with anything else is refused. A model whose loss turns
NaN/Inf, or blows up past ``divergence_factor`` times its first loss ("recon" term when the loss
has one, else "total"), stops alone before the bad update, marked "diverged" with its last good
weights; the others train on.

Under torchrun, ``TrainConfig.parallel`` spreads the work over processes: "data" splits each
batch, "sae" deals out the models (see :mod:`saelib.training.distributed`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelib.activations.source import ActivationSource, as_source, tensor_fingerprint
from saelib.training import distributed
from saelib.training.checkpoints import (
    CheckpointMismatchError,
    checkpoint_identity,
    load_checkpoint,
    recover_interrupted_save,
    save_checkpoint,
)
from saelib.training.losses import Loss, TopKLoss, TrainState

__all__ = [
    "CheckpointMismatchError",
    "SAESpec",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "TrainSpec",
    "make_optimizer",
    "pick_device",
    "tensor_fingerprint",
    "train_saes",
]

Status = Literal["training", "complete", "diverged"]


@dataclass
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 256
    epochs: float = 1.0
    max_tokens: int | None = None  # when set, train on this many vectors instead of `epochs`
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    decay_start: float = 0.8  # fraction of training after which linear/cosine decay begins
    grad_clip_norm: float | None = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0  # batch order
    device: str = "auto"  # "auto" picks CUDA when available
    bf16_autocast: bool = True  # CUDA only; CPU training is always float32
    dead_after_tokens: int = 10_000_000  # a latent silent this long counts as dead (AuxK)
    # a model whose reconstruction loss exceeds this many times its first one has diverged
    divergence_factor: float | None = 100.0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    log_every: int = 50
    # under torchrun: "data" splits each batch over the processes, "sae" deals out the models
    # (saelib.training.distributed); without a process group of 2 or more, as "none"
    parallel: distributed.Parallel = "none"

    def identity(self) -> dict[str, Any]:
        """The fields that change the trained weights (not device, logging, checkpointing or
        parallelism: a data-parallel run trains the weights of a one-process run)."""
        ignored = {"device", "log_every", "checkpoint_every", "parallel"}
        return {key: value for key, value in asdict(self).items() if key not in ignored}

    def total_steps(self, n_vectors: int) -> int:
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.batch_size))
        return max(1, math.ceil(self.epochs * math.ceil(n_vectors / self.batch_size)))


@dataclass
class TrainSpec:
    """One model to train: a name (also its checkpoint folder), the model, and its loss.

    ``metadata`` is stored in the checkpoint's config.json; studies record there where an SAE
    reads its input (``model``, ``layer``, ``dataset``), so evals can splice it back in.
    ``labels`` (e.g. ``{"k": 5, "latent_dim": 512, "seed": 0}``) say which variant of a study
    this is; they are stored under "labels" in config.json and given back on the result.
    """

    name: str
    model: nn.Module
    loss: Loss
    metadata: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)


@dataclass(init=False)
class SAESpec(TrainSpec):
    """A :class:`TrainSpec` for an SAE: the loss defaults to :class:`TopKLoss`, and the model
    may be given as ``sae`` (positionally, as ``SAESpec(name, sae, loss, metadata)``)."""

    def __init__(
        self,
        name: str,
        sae: nn.Module | None = None,
        loss: Loss | None = None,
        metadata: dict | None = None,
        labels: dict | None = None,
        *,
        model: nn.Module | None = None,
    ):
        if (sae is None) == (model is None):
            raise TypeError(f"SAESpec {name!r} needs its SAE once, as `sae` or `model`")
        chosen = sae if sae is not None else model
        loss = loss if loss is not None else TopKLoss()
        super().__init__(name, chosen, loss, dict(metadata or {}), dict(labels or {}))

    @property
    def sae(self) -> nn.Module:
        return self.model


@dataclass
class TrainResult:
    name: str
    model: nn.Module
    history: list[dict]
    steps: int
    seconds: float
    checkpoint: Path | None
    status: Status = "complete"  # "training" only in results passed to hooks mid-run
    message: str = ""  # why it diverged
    labels: dict = field(default_factory=dict)
    # For hooks, the live training state behind this model; changes made in place are kept (a
    # hook that re-sorts or resamples latents permutes or resets all three together):
    optimizer: torch.optim.Optimizer | None = None  # Adam's per-parameter moments
    loss: Any = None  # the spec's loss, with its state (e.g. an EMA over latent pairs)
    tokens_since_fired: Tensor | None = None  # (d_sae,) the dead-latent counter, when tracked

    @property
    def sae(self) -> nn.Module:
        return self.model


@dataclass(frozen=True)
class StepInfo:
    """What a hook sees after each step.

    ``step`` is the (0-based) step just done; ``progress`` is the fraction of training done
    after it, (step + 1) / total_steps: 1.0 after the last step (a loss at the next step sees
    the same value as ``TrainState.progress``). A hook may change, in place, the models'
    weights, their optimizers' state, their losses' state and the dead-latent counters (see
    :class:`TrainResult`): the next step and the next checkpoint see the change.
    """

    step: int
    total_steps: int
    results: list[TrainResult]

    @property
    def progress(self) -> float:
        return (self.step + 1) / max(self.total_steps, 1)


Hook = Callable[[StepInfo], None]


@dataclass
class _ForModels:
    names: frozenset[str]
    hook: Hook

    def __call__(self, info: StepInfo) -> None:
        results = [result for result in info.results if result.name in self.names]
        if results:
            self.hook(dataclasses.replace(info, results=results))

    def hook_state(self, name: str) -> dict | None:
        return _hook_state(self.hook, name) if name in self.names else None

    def load_hook_state(self, name: str, state: dict) -> None:
        if name in self.names:
            _load_hook_state(self.hook, name, state)


def for_models(names: Iterable[str], hook: Hook) -> Hook:
    """``hook`` restricted to the models named ``names`` (e.g. resampling for some SAEs only)."""
    return _ForModels(frozenset(names), hook)


def _hook_state(hook: Hook, name: str) -> dict | None:
    method = getattr(hook, "hook_state", None)
    return method(name) if method is not None else None


def _load_hook_state(hook: Hook, name: str, state: dict | None) -> None:
    method = getattr(hook, "load_hook_state", None)
    if method is not None and state is not None:
        method(name, state)


@dataclass
class _Run:
    """Per-model training state."""

    spec: TrainSpec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    identity: dict
    tokens_since_fired: Tensor | None = None  # set on the first output that has fired()
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    first_loss: float | None = None  # the reference for spotting divergence
    last_good: list[Tensor] | None = None  # parameters before the latest update
    status: Status = "training"
    message: str = ""
    data_parallel: bool = False  # this process trains on its slice of each batch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def make_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``train_saes`` builds for ``model`` (already on ``device``)."""
    return torch.optim.Adam(
        model.parameters(),
        lr=config.lr,
        betas=config.adam_betas,
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters: several x faster
    )


def train_saes(
    specs: Sequence[TrainSpec],
    data: Tensor | ActivationSource,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
    data_key: str | None = None,
) -> list[TrainResult]:
    """Train every model in ``specs`` on ``data`` (an (n, d) tensor or an activation source).

    With ``checkpoint_dir``, each model is checkpointed under ``checkpoint_dir/<name>`` every
    ``config.checkpoint_every`` steps and at the end, and ``resume=True`` continues from there
    (refusing a checkpoint trained on other data, config or loss). ``data_key`` names the data
    in checkpoints; by default the source's fingerprint. ``hooks`` are called after every step
    with a :class:`StepInfo`, before that step's checkpoint (a resume replays what they missed).
    Each batch is moved to the device as it is used.

    Under torchrun with ``config.parallel="data"``, every process returns the same results;
    with "sae", a process returns its own specs' results, or with a ``checkpoint_dir`` every
    spec's, in order (see :mod:`saelib.training.distributed`).
    """
    distributed.join_launched_group()
    source = as_source(data)
    _check_specs(specs, source)
    device = pick_device(config.device)
    total = config.total_steps(source.n_rows)
    parallel = distributed.mode(config.parallel)
    if parallel != "none":  # one checkpoint folder for all: process 0's
        checkpoint_dir = distributed.from_main(checkpoint_dir)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    data_key = data_key or source.fingerprint()
    if parallel == "data":
        distributed.check_batch_split(config.batch_size, source.n_rows, total)
        _check_data_parallel(specs)
    mine = distributed.owned(specs) if parallel == "sae" else specs
    runs = [
        _start_run(spec, config, device, total, folder, resume, data_key, hooks) for spec in mine
    ]
    first = min((run.step for run in runs if run.status == "training"), default=total)
    progress = progress and (parallel == "none" or distributed.is_main())
    bar = tqdm(range(first, total), desc=f"train {len(runs)} model(s)", disable=not progress)
    for step in bar:
        due = [run for run in runs if run.status == "training" and run.step == step]
        if not any(run.status == "training" for run in runs):
            break  # every model diverged
        batch = source.batch(step, config.batch_size, config.seed).to(device) if due else None
        for run in due:
            _train_step(run, batch, step, total, config, device)
            if run.status == "diverged":
                _report_divergence(run, folder, config)
        if hooks:  # before checkpointing: a resume replays the steps a hook missed
            info = StepInfo(step, total, _results(runs, folder))
            for hook in hooks:
                hook(info)
        if folder is not None and _should_checkpoint(step + 1, total, config.checkpoint_every):
            for run in runs:
                if run.status != "diverged":
                    _save(run, folder, config, hooks)
        _show_progress(bar, runs, progress)
    if parallel == "sae" and folder is not None:
        distributed.barrier()  # every process's final checkpoints are written
        trained = {run.spec.name: run for run in runs}
        runs = [
            trained.get(spec.name)
            or _load_finished(spec, config, device, total, folder, data_key, hooks)
            for spec in specs
        ]
    return _results(runs, folder)


def _load_finished(
    spec: TrainSpec,
    config: TrainConfig,
    device: torch.device,
    total: int,
    folder: Path,
    data_key: str,
    hooks: Sequence[Hook],
) -> _Run:
    """The run another process trained, from its final checkpoint (SAE-parallel mode)."""
    run = _start_run(spec, config, device, total, folder, True, data_key, hooks)
    if run.status == "training":
        raise RuntimeError(f"no final checkpoint of {spec.name!r} in {folder / spec.name}")
    return run


def _show_progress(bar, runs: list[_Run], progress: bool) -> None:
    shown = next((run for run in runs if run.history and run.status != "diverged"), None)
    if progress and shown is not None:
        key = "mse" if "mse" in shown.history[-1] else "total"
        bar.set_postfix({key: f"{shown.history[-1][key]:.4g}"}, refresh=False)


def _report_divergence(run: _Run, folder: Path | None, config: TrainConfig) -> None:
    """Keep the diverged model's last good weights (on disk too when checkpointing); say so."""
    if folder is not None:
        run.message += f"; last good weights in {folder / run.spec.name}"
        _save(run, folder, config)
    warnings.warn(run.message, stacklevel=3)


def _check_specs(specs: Sequence[TrainSpec], source: ActivationSource) -> None:
    """Refuse, before any compute, what cannot train: duplicate names, a model whose input
    width is not the data's, a loss that cannot train its model."""
    if not specs:
        raise ValueError("train_saes needs at least one spec")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique (they name checkpoint folders): {names}")
    for spec in specs:
        d_in = getattr(spec.model, "d_in", None)
        if d_in is not None and d_in != source.d:
            raise ValueError(f"model {spec.name!r} has d_in={d_in} but the data has d={source.d}")
        check = getattr(spec.loss, "check", None)
        if check is not None:
            try:
                check(spec.model)
            except (TypeError, ValueError) as error:
                raise type(error)(f"model {spec.name!r}: {error}") from None


def _check_data_parallel(specs: Sequence[TrainSpec]) -> None:
    """Refuse, before any step, a loss that a slice of the batch cannot train exactly."""
    for spec in specs:
        if not getattr(spec.loss, "data_parallel_exact", True):
            raise ValueError(
                f"parallel='data': the loss of {spec.name!r} ({type(spec.loss).__name__}) keeps "
                "statistics of its process's slice of each batch, so processes would train "
                "different models; train it with parallel='sae'"
            )


def _start_run(
    spec: TrainSpec,
    config: TrainConfig,
    device: torch.device,
    total: int,
    folder: Path | None,
    resume: bool,
    data_key: str,
    hooks: Sequence[Hook] = (),
) -> _Run:
    spec.model.to(device)
    data_parallel = distributed.mode(config.parallel) == "data"
    if data_parallel:  # the same seeds give the same weights; process 0's, to be sure
        distributed.broadcast_module(spec.model)
    optimizer = make_optimizer(spec.model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    identity = checkpoint_identity(spec.model, spec.loss, config.identity(), data_key)
    run = _Run(spec, optimizer, scheduler, identity, data_parallel=data_parallel)
    if folder is not None:
        if not data_parallel or distributed.is_main():
            recover_interrupted_save(folder, spec.name)
        if data_parallel:
            distributed.barrier()
        if resume:
            _resume(run, folder, device, hooks)
    return run


def _lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    decay_from = int(config.decay_start * total)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant" or step < decay_from:
            return 1.0
        fraction = (step - decay_from) / max(total - decay_from, 1)
        if config.lr_schedule == "linear":
            return 1.0 - fraction
        return 0.5 * (1.0 + math.cos(math.pi * fraction))

    return factor


def _call(model: nn.Module, hook: str, *args) -> None:
    """Call the model's ``hook`` when it defines one."""
    method = getattr(model, hook, None)
    if method is not None:
        method(*args)


def _train_step(
    run: _Run, batch: Tensor, step: int, total: int, config: TrainConfig, device: torch.device
) -> None:
    started = time.perf_counter()
    model, spec = run.spec.model, run.spec
    if step == 0:
        _call(model, "on_first_batch", batch)  # the whole batch, in data-parallel mode too
    rows, share = distributed.shard(batch) if run.data_parallel else (batch, 1.0)
    use_autocast = config.bf16_autocast and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
        output = model(_model_input(spec.loss, rows))
        fired = _fired(output)
        state = TrainState(step, total, _dead(run, fired, config.dead_after_tokens))
        with distributed.sharded_loss(run.data_parallel):
            terms = spec.loss(model, rows, output, state)
    run.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if run.data_parallel:  # from here on, every process sees the global batch's values
        distributed.sum_gradients(model, share)
        terms = distributed.sum_terms(terms, share)
        fired = distributed.any_fired(fired)
    _call(model, "before_optimizer_step")
    grad_norm = _grad_norm(model, config.grad_clip_norm)
    problem = _divergence(run, terms, grad_norm, config.divergence_factor)
    if run.data_parallel and distributed.any_process(bool(problem), device) and not problem:
        problem = "diverged on another process"
    if problem:
        _stop_diverged(run, step, problem)
        return
    _remember_good_weights(run)
    lr = run.scheduler.get_last_lr()[0]  # the rate this update uses (logged below)
    run.optimizer.step()
    run.scheduler.step()
    _call(model, "after_optimizer_step")
    if fired is not None:
        _update_firing(run, fired, len(batch))
    run.step = step + 1
    if run.step == total:
        run.status = "complete"
    if step % config.log_every == 0 or run.step == total:
        run.history.append(_log_entry(lr, terms, state, grad_norm))
    run.seconds += time.perf_counter() - started


def _model_input(loss: Any, batch: Tensor) -> Tensor:
    """What the model reads of a batch: all of it, unless the loss says (``model_input``; a
    next-token loss gives a language model each row but its last token)."""
    model_input = getattr(loss, "model_input", None)
    return model_input(batch) if model_input is not None else batch


def _fired(output: Any) -> Tensor | None:
    """(n_latents,) bool of the latents active in the batch, when the output can say."""
    fired = getattr(output, "fired", None)
    return fired() if callable(fired) else None


def _dead(run: _Run, fired: Tensor | None, dead_after_tokens: int) -> Tensor | None:
    if fired is None:
        return None
    if run.tokens_since_fired is None:
        run.tokens_since_fired = torch.zeros(len(fired), dtype=torch.long, device=fired.device)
    return run.tokens_since_fired >= dead_after_tokens


@torch.no_grad()
def _update_firing(run: _Run, fired: Tensor, batch_size: int) -> None:
    run.tokens_since_fired += batch_size
    run.tokens_since_fired[fired] = 0


def _stop_diverged(run: _Run, step: int, problem: str) -> None:
    """Stop this model, back at the last weights whose loss was judged good."""
    run.optimizer.zero_grad(set_to_none=True)
    run.status = "diverged"
    kept = "the weights it started with"
    if run.last_good is not None:  # the weights before the update that made this loss
        with torch.no_grad():
            for parameter, good in zip(run.spec.model.parameters(), run.last_good, strict=True):
                parameter.copy_(good)
        run.step -= 1
        kept = f"its weights after {run.step} updates (the last whose loss passed)"
    run.last_good = None
    run.message = f"{run.spec.name!r} diverged at step {step}: {problem}; stopped with {kept}"


@torch.no_grad()
def _remember_good_weights(run: _Run) -> None:
    """Copy the weights whose loss just passed the checks, before the update changes them."""
    parameters = list(run.spec.model.parameters())
    if run.last_good is None:
        run.last_good = [parameter.detach().clone() for parameter in parameters]
    else:
        for saved, parameter in zip(run.last_good, parameters, strict=True):
            saved.copy_(parameter)


def _divergence(run: _Run, terms: dict, grad_norm: Tensor, factor: float | None) -> str:
    """Why this step's loss shows divergence ("" when it does not)."""
    total = float(terms["total"].detach())
    if not (math.isfinite(total) and bool(torch.isfinite(grad_norm))):
        return f"loss {total:.4g} / gradient norm {float(grad_norm):.4g} is not finite"
    watched = "recon" if "recon" in terms else "total"
    value = float(terms[watched].detach())
    if run.first_loss is None:
        run.first_loss = value
    if factor is not None and value > factor * max(run.first_loss, 1e-12):
        kind = "reconstruction" if watched == "recon" else "total"
        return (
            f"{kind} loss {value:.4g} is over {factor:g} times its first value {run.first_loss:.4g}"
        )
    return ""


def _grad_norm(model: nn.Module, clip: float | None) -> Tensor:
    parameters = [p for p in model.parameters() if p.grad is not None]
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    if not parameters:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])
    )


def _log_entry(lr: float, terms: dict, state: TrainState, grad_norm: Tensor) -> dict:
    entry = {"step": state.step, "progress": state.progress, "lr": lr}
    entry |= {name: float(value.detach()) for name, value in terms.items()}
    if state.dead is not None:
        entry["dead_fraction"] = float(state.dead.float().mean())
    entry["grad_norm"] = float(grad_norm)
    return entry


def _should_checkpoint(steps_done: int, total: int, every: int) -> bool:
    return steps_done == total or (every > 0 and steps_done % every == 0)


def _save(run: _Run, folder: Path, config: TrainConfig, hooks: Sequence[Hook] = ()) -> None:
    """Checkpoint the run (in data-parallel mode: process 0 writes, the others wait)."""
    if run.data_parallel:
        distributed.on_main(lambda: _write(run, folder, config, hooks))
    else:
        _write(run, folder, config, hooks)


def _write(run: _Run, folder: Path, config: TrainConfig, hooks: Sequence[Hook] = ()) -> None:
    extra = run.spec.metadata | {
        "trained_steps": run.step,
        "train_status": run.status,
        "train_config": asdict(config),
        "identity": run.identity,
        "labels": run.spec.labels,
    }
    state = _trainer_state(run, hooks)
    save_checkpoint(folder / run.spec.name, run.spec.model, extra, state, run.history)


def _trainer_state(run: _Run, hooks: Sequence[Hook] = ()) -> dict:
    loss_state = getattr(run.spec.loss, "state_dict", None)
    firing = run.tokens_since_fired
    return {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "tokens_since_fired": firing.cpu() if firing is not None else None,
        "seconds": run.seconds,
        "first_loss": run.first_loss,
        "status": run.status,
        "message": run.message,
        "loss_state": loss_state() if loss_state is not None else None,
        "hooks": [_hook_state(hook, run.spec.name) for hook in hooks],
    }


def _resume(run: _Run, folder: Path, device: torch.device, hooks: Sequence[Hook] = ()) -> None:
    loaded = load_checkpoint(folder / run.spec.name, run.spec.model, run.identity, device)
    if loaded is None:
        return
    state, run.history = loaded
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    firing = state["tokens_since_fired"]
    run.tokens_since_fired = firing.to(device) if firing is not None else None
    run.step, run.seconds = state["step"], state["seconds"]
    run.first_loss, run.status, run.message = state["first_loss"], state["status"], state["message"]
    if state["loss_state"] is not None:
        run.spec.loss.load_state_dict(state["loss_state"])
    for hook, hook_state in zip(hooks, state.get("hooks", []), strict=False):
        _load_hook_state(hook, run.spec.name, hook_state)


def _results(runs: list[_Run], folder: Path | None) -> list[TrainResult]:
    return [
        TrainResult(
            run.spec.name,
            run.spec.model,
            run.history,
            run.step,
            run.seconds,
            folder / run.spec.name if folder is not None else None,
            run.status,
            run.message,
            run.spec.labels,
            run.optimizer,
            run.spec.loss,
            run.tokens_since_fired,
        )
        for run in runs
    ]
