"""The one training loop for every SAE study.

``train_saes`` trains several SAEs from a single pass over the activations: each batch is read
once and given to every SAE. The batch order is a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would.

A checkpoint records what it was trained on (SAE config, a fingerprint of the data, the training
config, the loss); resuming with anything else is refused. An SAE whose loss turns NaN/Inf, or
blows up past ``divergence_factor`` times its first loss, stops alone before the bad update,
marked "diverged" with its last good weights; the others train on.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelib.io import write_json
from saelib.saes import SAE, load_sae
from saelib.training.losses import Loss, TopKLoss, TrainState

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
    # an SAE whose reconstruction loss exceeds this many times its first one has diverged
    divergence_factor: float | None = 100.0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    log_every: int = 50

    def identity(self) -> dict[str, Any]:
        """The fields that change the trained weights (not device, logging or checkpointing)."""
        ignored = {"device", "log_every", "checkpoint_every"}
        return {key: value for key, value in asdict(self).items() if key not in ignored}

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
    status: Status = "complete"  # "training" only in results passed to callbacks mid-run
    message: str = ""  # why it diverged


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume from was trained on something else."""


@dataclass
class _Run:
    """Per-SAE training state."""

    spec: SAESpec
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokens_since_fired: Tensor
    identity: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    first_loss: float | None = None  # the reference for spotting divergence
    last_good: list[Tensor] | None = None  # parameters before the latest update
    status: Status = "training"
    message: str = ""


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
    data_key: str | None = None,
) -> list[TrainResult]:
    """Train every SAE in ``specs`` on ``activations`` (n, d_in); return them trained.

    With ``checkpoint_dir``, each SAE is checkpointed under ``checkpoint_dir/<name>`` every
    ``config.checkpoint_every`` steps and at the end, and ``resume=True`` continues from there
    (refusing a checkpoint trained on other data, config or loss). ``data_key`` names the data
    in checkpoints; by default a fingerprint of ``activations``. ``callbacks`` are called after
    every step with (step, results so far).
    """
    _check_specs(specs, activations)
    device = pick_device(config.device)
    data = activations.to(device)
    total = config.total_steps(len(data))
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    data_key = data_key or tensor_fingerprint(activations)
    runs = [_start_run(spec, config, device, total, folder, resume, data_key) for spec in specs]
    first = min((run.step for run in runs if run.status == "training"), default=total)
    batches = _BatchOrder(len(data), config.batch_size, config.seed)
    bar = tqdm(range(first, total), desc=f"train {len(runs)} SAE(s)", disable=not progress)
    for step in bar:
        due = [run for run in runs if run.status == "training" and run.step == step]
        if not any(run.status == "training" for run in runs):
            break  # every SAE diverged
        batch = data[batches.indices(step).to(device)] if due else None
        for run in due:
            _train_step(run, batch, step, total, config, device)
            if run.status == "diverged":
                _report_divergence(run, folder, config)
        if callbacks:  # before checkpointing: a resume replays the steps a callback missed
            results = _results(runs, folder)
            for callback in callbacks:
                callback(step, results)
        if folder is not None and _should_checkpoint(step + 1, total, config.checkpoint_every):
            for run in runs:
                if run.status != "diverged":
                    _save_checkpoint(run, folder, config)
        _show_progress(bar, runs, progress)
    return _results(runs, folder)


def tensor_fingerprint(tensor: Tensor) -> str:
    """A hash of a tensor's shape, dtype and bytes: names training data in checkpoints."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(f"{tuple(data.shape)}:{data.dtype}".encode(), digest_size=16)
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _show_progress(bar, runs: list[_Run], progress: bool) -> None:
    shown = next((run for run in runs if run.history and run.status != "diverged"), None)
    if progress and shown is not None and "mse" in shown.history[-1]:
        bar.set_postfix(mse=f"{shown.history[-1]['mse']:.4g}", refresh=False)


def _report_divergence(run: _Run, folder: Path | None, config: TrainConfig) -> None:
    """Keep the diverged SAE's last good weights (on disk too when checkpointing) and say so."""
    if folder is not None:
        run.message += f"; last good weights in {folder / run.spec.name}"
        _save_checkpoint(run, folder, config)
    warnings.warn(run.message, stacklevel=3)


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


def _start_run(spec, config, device, total, folder, resume, data_key) -> _Run:
    spec.sae.to(device)
    optimizer = torch.optim.Adam(
        spec.sae.parameters(),
        lr=config.lr,
        betas=config.adam_betas,
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters: several x faster
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    firing = torch.zeros(spec.sae.d_sae, dtype=torch.long, device=device)
    run = _Run(spec, optimizer, scheduler, firing, _identity(spec, config, data_key))
    if folder is not None:
        _recover_interrupted_save(folder, spec.name)
        if resume:
            _load_checkpoint(run, folder, device)
    return run


def _identity(spec: SAESpec, config: TrainConfig, data_key: str) -> dict:
    """What a checkpoint was trained on, as plain JSON values (compared when resuming)."""
    identity = {
        "sae": {"architecture": spec.sae.architecture, **asdict(spec.sae.config)},
        "data_key": data_key,
        "train_config": config.identity(),
        "loss": _describe(spec.loss),
    }
    return json.loads(json.dumps(identity))


def _describe(value: Any) -> Any:
    """A loss (or part of one) as its type and settings; functions and private state left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        settings = {
            item.name: _describe(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if not item.name.startswith("_")
        }
        return {"type": type(value).__name__} | {
            key: described for key, described in settings.items() if described is not None
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_describe(item) for item in value]
    return None if callable(value) else type(value).__name__


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


def _train_step(run: _Run, batch: Tensor, step: int, total: int, config, device) -> None:
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
    problem = _divergence(run, terms, grad_norm, config.divergence_factor)
    if problem:
        _stop_diverged(run, step, problem)
        return
    _remember_good_weights(run)
    lr = run.scheduler.get_last_lr()[0]  # the rate this update uses (logged below)
    run.optimizer.step()
    run.scheduler.step()
    sae.normalize_decoder()
    _update_firing(run, output, len(batch))
    run.step = step + 1
    if run.step == total:
        run.status = "complete"
    if step % config.log_every == 0 or run.step == total:
        run.history.append(_log_entry(lr, terms, state, grad_norm))
    run.seconds += time.perf_counter() - started


def _stop_diverged(run: _Run, step: int, problem: str) -> None:
    """Stop this SAE, back at the last weights whose loss was judged good."""
    run.optimizer.zero_grad(set_to_none=True)
    run.status = "diverged"
    kept = "the weights it started with"
    if run.last_good is not None:  # the weights before the update that made this loss
        with torch.no_grad():
            for parameter, good in zip(run.spec.sae.parameters(), run.last_good, strict=True):
                parameter.copy_(good)
        run.step -= 1
        kept = f"its weights after {run.step} updates (the last whose loss passed)"
    run.last_good = None
    run.message = f"SAE {run.spec.name!r} diverged at step {step}: {problem}; stopped with {kept}"


@torch.no_grad()
def _remember_good_weights(run: _Run) -> None:
    """Copy the weights whose loss just passed the checks, before the update changes them."""
    parameters = list(run.spec.sae.parameters())
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
    reconstruction = float(terms.get("recon", terms["total"]).detach())
    if run.first_loss is None:
        run.first_loss = reconstruction
    if factor is not None and reconstruction > factor * max(run.first_loss, 1e-12):
        return (
            f"reconstruction loss {reconstruction:.4g} is over {factor:g} times its first "
            f"value {run.first_loss:.4g}"
        )
    return ""


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


def _sibling(target: Path, kind: str) -> Path:
    """A unique hidden name beside ``target`` for a checkpoint being written or replaced."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(3)}")


def _save_checkpoint(run: _Run, folder: Path, config: TrainConfig) -> None:
    """Write into a uniquely named folder, then swap it in: a crash never leaves a torn one."""
    target = folder / run.spec.name
    staging, previous = _sibling(target, "tmp"), _sibling(target, "old")
    extra = run.spec.metadata | {
        "trained_steps": run.step,
        "train_status": run.status,
        "train_config": asdict(config),
        "identity": run.identity,
    }
    try:
        run.spec.sae.save(staging, extra=extra)
        torch.save(_trainer_state(run), staging / "trainer_state.pt")
        write_json(staging / "history.json", run.history, indent=None)
        if target.exists():
            os.replace(target, previous)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)


def _trainer_state(run: _Run) -> dict:
    loss_state = getattr(run.spec.loss, "state_dict", None)
    return {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "tokens_since_fired": run.tokens_since_fired.cpu(),
        "seconds": run.seconds,
        "first_loss": run.first_loss,
        "status": run.status,
        "message": run.message,
        "loss_state": loss_state() if loss_state is not None else None,
    }


def _recover_interrupted_save(folder: Path, name: str) -> None:
    """Clean up after a crash mid-save: drop partial copies, restore a swapped-out checkpoint."""
    pattern = glob.escape(f".{name}")
    for partial in folder.glob(f"{pattern}.tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)
    replaced = sorted(folder.glob(f"{pattern}.old-*"), key=lambda path: path.stat().st_mtime)
    target = folder / name
    if replaced and not target.exists():
        os.replace(replaced.pop(), target)  # the crash came between the two renames
    for stale in replaced:
        shutil.rmtree(stale, ignore_errors=True)


def _load_checkpoint(run: _Run, folder: Path, device: torch.device) -> None:
    target = folder / run.spec.name
    if not (target / "trainer_state.pt").exists():
        return
    _check_identity(target, run.identity)
    saved = load_sae(target, device)
    run.spec.sae.load_state_dict(saved.state_dict())
    state = torch.load(target / "trainer_state.pt", map_location=device, weights_only=True)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.tokens_since_fired = state["tokens_since_fired"].to(device)
    run.step, run.seconds = state["step"], state["seconds"]
    run.first_loss, run.status, run.message = state["first_loss"], state["status"], state["message"]
    if state["loss_state"] is not None:
        run.spec.loss.load_state_dict(state["loss_state"])
    run.history = json.loads((target / "history.json").read_text())


def _check_identity(target: Path, identity: dict) -> None:
    stored = json.loads((target / "config.json").read_text()).get("identity")
    if stored is None:
        raise CheckpointMismatchError(
            f"checkpoint {target} does not record what it was trained on; "
            "resume from it is unsafe: use another checkpoint_dir or resume=False"
        )
    differences = _differences(stored, identity)
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {target} was trained on something else ({'; '.join(differences[:4])}): "
            "use another checkpoint_dir or resume=False"
        )


def _differences(stored: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        keys = sorted(set(stored) | set(current))
        nested = [_differences(stored.get(k), current.get(k), f"{path}{k}.") for k in keys]
        return [difference for group in nested for difference in group]
    if stored != current:
        return [f"{path.rstrip('.')}: {stored!r} then, {current!r} now"]
    return []


def _results(runs: list[_Run], folder: Path | None) -> list[TrainResult]:
    return [
        TrainResult(
            run.spec.name,
            run.spec.sae,
            run.history,
            run.step,
            run.seconds,
            folder / run.spec.name if folder is not None else None,
            run.status,
            run.message,
        )
        for run in runs
    ]
