"""Self-distillation of a sparse language model from an EMA teacher (SparsAE).

The teacher is an exponential moving average of the student's effective (masked) weights,
updated after every optimizer step by the :class:`EMATeacherUpdate` hook:

    W_T <- beta * W_T + (1 - beta) * (W_S * M),    beta = 0.999,

and the student minimises next-token cross-entropy plus the teacher's KL divergence from it,

    loss = CE + alpha(t) * KL(p_T || p_S)    (nats per token, averaged over every token).

Schedule of alpha (:meth:`DistillationLoss.alpha`, step t 0-based, T total steps): 0 for the
first ``W`` steps (warm-up: ``warmup_steps``, or ``round(warmup_fraction * T)`` when
``warmup_fraction`` is set), then cosine from ``alpha_start`` at t = W down to ``alpha_end`` at
t = ``anneal_fraction * T``, then held at ``alpha_end``. When the anneal would end before the
warm-up does, alpha goes straight from 0 to ``alpha_end``.

The teacher belongs to the loss (one :class:`DistillationLoss` per model). It is made on the
loss's first call, as a deep copy of the student with weights W_S * M, and starts being
averaged at once, warm-up included. It is DENSE: each of its masked Linears gets an all-ones
mask. Its weights average the student's masked weights over many past masks (RigL and SET move
them), so a weight the current mask drops still carries what it learned while it was active;
multiplying by a mask, stale or current, would cut that out. The teacher's state goes into
training checkpoints (``state_dict``), so a resumed run goes on with the same teacher.

Cost: after warm-up, one extra forward pass per step without gradients (the teacher, at the
dense cost of the model), plus a second copy of the weights in memory and one multiply-add per
weight for the EMA. During warm-up the teacher forward is skipped: the loss is the plain
next-token loss and ``kl`` is reported as 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from saelib.sparse.masks import MaskedLinear, masked_layers
from saelib.sparse.train import NextTokenLoss
from saelib.training import StepInfo, TrainState

__all__ = ["DistillationLoss", "EMATeacherUpdate"]


@dataclass
class DistillationLoss:
    """Next-token cross-entropy plus ``alpha * KL(p_T || p_S)`` from an EMA teacher.

    Terms: ``total`` (minimised), ``ce``, ``kl`` (0 during warm-up, when the teacher is not
    run) and ``alpha``. With ``temperature`` tau != 1 both distributions are softened,
    ``softmax(logits / tau)``, and the KL is multiplied by tau^2 so its gradients keep their
    scale (Hinton et al. 2015); tau = 1 (the default, and SparsAE's) is the plain KL.

    ``warmup_fraction``, when set, replaces ``warmup_steps``: the warm-up is then
    ``round(warmup_fraction * total_steps)`` steps, so one setting fits runs of any length.
    Train with :class:`EMATeacherUpdate` among the hooks, or the teacher stays where it began.
    """

    beta: float = 0.999
    warmup_steps: int = 500
    warmup_fraction: float | None = None  # overrides warmup_steps when set
    alpha_start: float = 0.5
    alpha_end: float = 0.1
    anneal_fraction: float = 0.7  # alpha reaches alpha_end at this fraction of training
    temperature: float = 1.0
    _teacher: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    # a loaded teacher state waiting for the student the teacher is copied from
    _pending: dict[str, Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    _last_step: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0 <= self.anneal_fraction <= 1:
            raise ValueError(f"anneal_fraction must be in [0, 1], got {self.anneal_fraction}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def teacher(self) -> nn.Module | None:
        """The EMA teacher, once the first call has made it."""
        return self._teacher

    def model_input(self, rows: Tensor) -> Tensor:
        return rows[:, :-1]

    def warmup_length(self, total_steps: int) -> int:
        """Steps with alpha = 0."""
        if self.warmup_fraction is not None:
            return round(self.warmup_fraction * total_steps)
        return self.warmup_steps

    def alpha(self, step: int, total_steps: int) -> float:
        """The distillation weight at 0-based ``step`` of ``total_steps``."""
        warmup = self.warmup_length(total_steps)
        if step < warmup:
            return 0.0
        anneal_end = self.anneal_fraction * total_steps
        if step >= anneal_end:
            return self.alpha_end
        fraction = (step - warmup) / (anneal_end - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return self.alpha_end + (self.alpha_start - self.alpha_end) * cosine

    def __call__(
        self, model: nn.Module, rows: Tensor, logits: Tensor, state: TrainState
    ) -> dict[str, Tensor]:
        if self._teacher is None:
            self._make_teacher(model)
        self._last_step = state.step
        ce = NextTokenLoss()(model, rows, logits, state)["total"]
        alpha = self.alpha(state.step, state.total_steps)
        if alpha == 0:
            kl = torch.zeros((), device=ce.device)
            total = ce
        else:
            kl = self.kl(logits, self.model_input(rows))
            total = ce + alpha * kl
        alpha_term = torch.tensor(alpha, device=ce.device)
        return {"total": total, "ce": ce, "kl": kl, "alpha": alpha_term}

    def kl(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """KL(p_T || p_S) in nats, averaged over tokens, of the student's ``logits`` for
        ``tokens`` (times tau^2 when the temperature tau is not 1)."""
        if self._teacher is None:
            raise RuntimeError("the teacher is made on the loss's first call")
        with torch.no_grad():
            teacher_logits = self._teacher(tokens)
        tau = self.temperature
        log_p_student = F.log_softmax(logits.flatten(0, 1).float() / tau, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.flatten(0, 1).float() / tau, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        return kl * tau**2 if tau != 1 else kl

    @torch.no_grad()
    def update_teacher(self, model: nn.Module) -> None:
        """W_T <- beta W_T + (1 - beta) W_S for every parameter, W_S being ``weight * mask``
        for a masked Linear; the student's other buffers (not its masks) are copied."""
        if self._teacher is None:
            raise RuntimeError("no teacher yet: it is made on the loss's first call")
        student = _effective_parameters(model)
        for name, parameter in self._teacher.named_parameters():
            parameter.mul_(self.beta).add_(student[name], alpha=1 - self.beta)
        student_buffers = dict(model.named_buffers())
        for name, buffer in self._teacher.named_buffers():
            if not _is_mask(name, self._teacher):
                buffer.copy_(student_buffers[name])

    def trained_at(self, step: int) -> bool:
        """Whether this loss trained its model at ``step`` (so the teacher should follow)."""
        return self._teacher is not None and self._last_step == step

    def state_dict(self) -> dict:
        """``{"teacher": its state dict, or None before it exists}`` (tensors only)."""
        if self._teacher is None:
            return {"teacher": self._pending}
        return {
            "teacher": {name: value.detach() for name, value in self._teacher.state_dict().items()}
        }

    def load_state_dict(self, state: dict) -> None:
        """Take a saved teacher: at once when there is one, else on the next call (the
        teacher is copied from the student, which this loss does not hold). A saved None
        (no teacher yet) drops the current one: the next call copies the student afresh."""
        saved = state["teacher"]
        if saved is not None and self._teacher is not None:
            self._teacher.load_state_dict(saved)
        else:
            self._teacher = None
            self._pending = dict(saved) if saved is not None else None

    @torch.no_grad()
    def _make_teacher(self, model: nn.Module) -> None:
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        teacher.eval()
        for parameter in teacher.parameters():
            parameter.grad = None
        for layer in masked_layers(teacher).values():
            layer.weight.mul_(layer.mask)  # W_S * M (the student keeps them zero already)
            layer.mask.fill_(True)  # dense: see the module docstring
            layer.keep_dense_grad, layer.dense_grad = False, None
        if self._pending is not None:
            teacher.load_state_dict(self._pending)
            self._pending = None
        self._teacher = teacher


@dataclass
class EMATeacherUpdate:
    """A hook: after every step, move the EMA teacher of each model trained with a
    :class:`DistillationLoss` towards the student. Models that diverged, or that did not train
    at this step (a resumed run's models may be at different steps), are left alone."""

    def __call__(self, info: StepInfo) -> None:
        for result in info.results:
            loss = result.loss
            if result.status == "diverged" or not isinstance(loss, DistillationLoss):
                continue
            if loss.trained_at(info.step):
                loss.update_teacher(result.model)


def _effective_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters by name, a masked Linear's weight multiplied by its mask."""
    parameters = dict(model.named_parameters())
    for name, layer in masked_layers(model).items():
        parameters[f"{name}.weight" if name else "weight"] = layer.weight * layer.mask
    return parameters


def _is_mask(name: str, model: nn.Module) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf == "mask" and isinstance(model.get_submodule(owner), MaskedLinear)
