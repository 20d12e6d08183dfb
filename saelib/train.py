"""The one training loop for every SAE study.

``train_saes`` trains several SAEs from a single pass over the activations: each batch is read
once and given to every SAE. The batch order is a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelib.losses import Loss, TopKLoss, TrainState
from saelib.saes import SAE, load_sae


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
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    log_every: int = 50

    def total_steps(self, n_vectors: int) -> int:
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.batch_size))
        return max(1, math.ceil(self.epochs * math.ceil(n_vectors / self.batch_size)))


@dataclass
class SAESpec:
    """One SAE to train: a name (also its checkpoint folder), the model, and its loss.

    ``metadata`` is stored in the checkpoint's config.json; studies record there where the SAE
    reads its input (``model``, ``layer``, ``dataset``), so evals can splice it back in.
    """

    name: str
    sae: SAE
    loss: Loss = field(default_factory=TopKLoss)
    metadata: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    name: str
    sae: SAE
    history: list[dict]
    steps: int
    seconds: float
    checkpoint: Path | None


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or Inf; the last good checkpoint is left untouched."""


@dataclass
class _Run:
    """Per-SAE training state."""

    spec: SAESpec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokens_since_fired: Tensor
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def train_saes(
    specs: Sequence[SAESpec],
    activations: Tensor,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    callbacks: Sequence[Callable[[int, list[TrainResult]], None]] = (),
    progress: bool = True,
) -> list[TrainResult]:
    """Train every SAE in ``specs`` on ``activations`` (n, d_in); return them trained.

    With ``checkpoint_dir``, each SAE is checkpointed under ``checkpoint_dir/<name>`` every
    ``config.checkpoint_every`` steps and at the end, and ``resume=True`` continues from there.
    ``callbacks`` are called after every step with (step, results so far).
    """
    _check_specs(specs, activations)
    device = pick_device(config.device)
    data = activations.to(device)
    total = config.total_steps(len(data))
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    runs = [_start_run(spec, config, device, total, folder, resume) for spec in specs]
    first = min(run.step for run in runs)
    batches = _BatchOrder(len(data), config.batch_size, config.seed)
    bar = tqdm(range(first, total), desc=f"train {len(runs)} SAE(s)", disable=not progress)
    for step in bar:
        batch = data[batches.indices(step).to(device)]
        for run in runs:
            if run.step == step:
                _train_step(run, batch, step, total, config, device, folder)
        if folder is not None and _should_checkpoint(step + 1, total, config.checkpoint_every):
            for run in runs:
                _save_checkpoint(run, folder, config)
        if callbacks:
            results = _results(runs, folder)
            for callback in callbacks:
                callback(step, results)
        if runs[0].history and progress:
            bar.set_postfix(mse=f"{runs[0].history[-1]['mse']:.4g}", refresh=False)
    return _results(runs, folder)


def _check_specs(specs: Sequence[SAESpec], activations: Tensor) -> None:
    if not specs:
        raise ValueError("train_saes needs at least one SAESpec")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"SAE names must be unique (they name checkpoint folders): {names}")
    if activations.ndim != 2 or len(activations) == 0:
        raise ValueError(
            f"activations must be a non-empty (n, d) matrix, got {tuple(activations.shape)}"
        )
    for spec in specs:
        if spec.sae.d_in != activations.shape[1]:
            raise ValueError(
                f"SAE {spec.name!r} has d_in={spec.sae.d_in} "
                f"but the activations have d={activations.shape[1]}"
            )


def _start_run(spec, config, device, total, folder, resume) -> _Run:
    spec.sae.to(device)
    optimizer = torch.optim.Adam(
        spec.sae.parameters(),
        lr=config.lr,
        betas=config.adam_betas,
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters: several x faster
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    run = _Run(
        spec, optimizer, scheduler, torch.zeros(spec.sae.d_sae, dtype=torch.long, device=device)
    )
    if folder is not None and resume:
        _load_checkpoint(run, folder, device)
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


class _BatchOrder:
    """Row indices of each step's batch: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]


def _train_step(run: _Run, batch: Tensor, step: int, total: int, config, device, folder) -> None:
    started = time.perf_counter()
    sae, spec = run.spec.sae, run.spec
    if step == 0 and hasattr(sae, "init_decoder_bias"):
        sae.init_decoder_bias(batch)
    state = TrainState(step, total, run.tokens_since_fired >= config.dead_after_tokens)
    use_autocast = config.bf16_autocast and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
        output = sae(batch)
        terms = spec.loss(sae, batch, output, state)
    run.optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    sae.remove_parallel_decoder_grad()
    grad_norm = _grad_norm(sae, config.grad_clip_norm)
    if not (torch.isfinite(terms["total"]) and torch.isfinite(grad_norm)):
        kept = folder / spec.name if folder is not None and (folder / spec.name).exists() else None
        raise NonFiniteLossError(
            f"SAE {spec.name!r}: loss {terms['total'].item()} / gradient norm {grad_norm.item()} "
            f"is not finite at step {step}; stopped before updating. Last good checkpoint: "
            f"{kept or 'none (pass checkpoint_dir to keep one)'}"
        )
    lr = run.scheduler.get_last_lr()[0]  # the rate this update uses (logged below)
    run.optimizer.step()
    run.scheduler.step()
    sae.normalize_decoder()
    _update_firing(run, output, len(batch))
    run.step = step + 1
    if step % config.log_every == 0 or run.step == total:
        run.history.append(_log_entry(lr, terms, state, grad_norm))
    run.seconds += time.perf_counter() - started


def _grad_norm(sae: SAE, clip: float | None) -> Tensor:
    parameters = [p for p in sae.parameters() if p.grad is not None]
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])
    )


@torch.no_grad()
def _update_firing(run: _Run, output, batch_size: int) -> None:
    fired = torch.zeros_like(run.tokens_since_fired, dtype=torch.bool)
    fired[output.indices[output.acts > 0]] = True
    run.tokens_since_fired += batch_size
    run.tokens_since_fired[fired] = 0


def _log_entry(lr: float, terms: dict, state: TrainState, grad_norm: Tensor) -> dict:
    entry = {"step": state.step, "progress": state.progress, "lr": lr}
    entry |= {name: float(value.detach()) for name, value in terms.items()}
    entry["dead_fraction"] = float(state.dead.float().mean())
    entry["grad_norm"] = float(grad_norm)
    return entry


def _should_checkpoint(steps_done: int, total: int, every: int) -> bool:
    return steps_done == total or (every > 0 and steps_done % every == 0)


def _save_checkpoint(run: _Run, folder: Path, config: TrainConfig) -> None:
    """Write into a temporary folder, then swap it in, so a crash never leaves a torn checkpoint."""
    target = folder / run.spec.name
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    extra = run.spec.metadata | {"trained_steps": run.step, "train_config": asdict(config)}
    run.spec.sae.save(staging, extra=extra)
    state = {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "tokens_since_fired": run.tokens_since_fired.cpu(),
        "seconds": run.seconds,
    }
    torch.save(state, staging / "trainer_state.pt")
    (staging / "history.json").write_text(json.dumps(run.history))
    previous = target.with_name(target.name + ".old")
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def _load_checkpoint(run: _Run, folder: Path, device: torch.device) -> None:
    target = folder / run.spec.name
    if not target.exists() and target.with_name(target.name + ".old").exists():
        target = target.with_name(target.name + ".old")  # a crash interrupted the swap
    if not (target / "trainer_state.pt").exists():
        return
    saved = load_sae(target, device)
    run.spec.sae.load_state_dict(saved.state_dict())
    state = torch.load(target / "trainer_state.pt", map_location=device, weights_only=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.tokens_since_fired = state["tokens_since_fired"].to(device)
    run.step, run.seconds = state["step"], state["seconds"]
    run.history = json.loads((target / "history.json").read_text())


def _results(runs: list[_Run], folder: Path | None) -> list[TrainResult]:
    return [
        TrainResult(
            run.spec.name,
            run.spec.sae,
            run.history,
            run.step,
            run.seconds,
            folder / run.spec.name if folder is not None else None,
        )
        for run in runs
    ]
