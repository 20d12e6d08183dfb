"""Training FLOPs that count only the unmasked weights.

Per token, each masked Linear with ``nnz`` active weights costs

- forward: ``2 * nnz`` (one multiply and one add per active weight),
- backward: ``4 * nnz`` (``2 * nnz`` for the input gradient, ``2 * nnz`` for the weight
  gradient),

so a training step on ``tokens`` tokens costs ``6 * nnz * tokens`` summed over masked layers.
A RigL update step also forms the dense weight gradient of every masked layer, adding
``2 * (n_in * n_out - nnz)`` per token of that step (Evci et al. 2020, appendix on FLOPs).

What masks do not change is reported apart, as ``dense`` (forward + backward per token): the
tied output head, ``6 * vocab * d_model``, and attention scores and weighted values,
``3 * 4 * context * d_model`` per layer (QK^T and AV at full context length, as the kernels
compute them). Left out: embedding look-ups, LayerNorms, softmax, GELU, biases and the
optimizer update (elementwise, not matrix products). Masks are emulated with dense kernels, so
these are the FLOPs a sparse kernel would need, not what this machine executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from saelib.sparse.lm import TransformerLM
from saelib.sparse.masks import masked_layers
from saelib.sparse.updaters import RigL
from saelib.training import StepInfo

__all__ = ["FlopCounter", "FlopsPerToken", "flops_per_token", "rigl_update_flops_per_token"]


@dataclass(frozen=True)
class FlopsPerToken:
    forward: int  # masked Linears: 2 * nnz
    backward: int  # masked Linears: 4 * nnz
    dense: int  # output head and attention scores, forward + backward (0 if not an LM)

    @property
    def sparse_training(self) -> int:
        """What the masked layers cost per training token: the sparse-training FLOPs."""
        return self.forward + self.backward

    @property
    def training(self) -> int:
        return self.sparse_training + self.dense


def flops_per_token(model: nn.Module) -> FlopsPerToken:
    """The model's training FLOPs per token with its current masks."""
    nnz = sum(layer.nnz for layer in masked_layers(model).values())
    return FlopsPerToken(2 * nnz, 4 * nnz, _dense_flops(model))


def rigl_update_flops_per_token(model: nn.Module) -> int:
    """What a RigL update step adds per token: the weight gradient at the masked positions."""
    return sum(2 * (layer.mask.numel() - layer.nnz) for layer in masked_layers(model).values())


def _dense_flops(model: nn.Module) -> int:
    if not isinstance(model, TransformerLM):
        return 0
    config = model.config
    head = 6 * config.vocab_size * config.d_model
    attention = 3 * 4 * config.context * config.d_model * config.n_layers
    return head + attention


@dataclass
class FlopCounter:
    """A hook summing each model's training FLOPs step by step (put it before the updaters:
    a step costs what its masks were during it).

    ``tokens_per_step`` is batch_size * context (a short last batch of an epoch is counted
    full). With ``rigl``, that updater's update steps add :func:`rigl_update_flops_per_token`
    to the models that keep dense gradients (``track_dense_grads``: RigL's models only).
    """

    tokens_per_step: int
    rigl: RigL | None = None
    sparse: dict[str, float] = field(default_factory=dict)  # masked Linears (+ RigL's extra)
    total: dict[str, float] = field(default_factory=dict)  # plus the dense part

    def __call__(self, info: StepInfo) -> None:
        for result in info.results:
            if result.status == "diverged":
                continue
            per_token = flops_per_token(result.model)
            sparse = per_token.sparse_training
            if self._rigl_update(info, result.model):
                sparse += rigl_update_flops_per_token(result.model)
            tokens = self.tokens_per_step
            self.sparse[result.name] = self.sparse.get(result.name, 0.0) + sparse * tokens
            extra = per_token.dense * tokens
            self.total[result.name] = self.total.get(result.name, 0.0) + (sparse * tokens + extra)

    def _rigl_update(self, info: StepInfo, model: nn.Module) -> bool:
        if self.rigl is None or not self.rigl.is_update(info.step, info.total_steps):
            return False
        return any(layer.keep_dense_grad for layer in masked_layers(model).values())
