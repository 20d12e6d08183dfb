"""Training a language model with :func:`saelib.training.train_saes`, and its validation.

The shared loop trains the LM on rows of ``context + 1`` token ids (an int64 tensor): the loss
tells the loop that the model reads each row but its last token (``model_input``) and scores
the next-token predictions against the row shifted by one. Mask updaters and the FLOP counter
are hooks; masked weights are re-zeroed after every update by the model's
``after_optimizer_step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from saelib.training import TrainState

__all__ = ["NextTokenLoss", "next_token_cross_entropy", "perplexity", "validation_loss"]


def next_token_cross_entropy(logits: Tensor, rows: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy (nats, float32) of ``logits`` (batch, length, vocab) for the next tokens
    of ``rows`` (batch, length + 1)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction=reduction)


@dataclass
class NextTokenLoss:
    """Mean cross-entropy of each next token (nats), the "total" the loop minimises."""

    def model_input(self, rows: Tensor) -> Tensor:
        return rows[:, :-1]

    def __call__(
        self, model: nn.Module, rows: Tensor, logits: Tensor, state: TrainState
    ) -> dict[str, Tensor]:
        return {"total": next_token_cross_entropy(logits, rows)}


@torch.no_grad()
def validation_loss(model: nn.Module, rows: Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats per token) over every row of ``rows``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size].to(device)
        total += float(next_token_cross_entropy(model(batch[:, :-1]), batch, reduction="sum"))
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def perplexity(model: nn.Module, rows: Tensor, batch_size: int = 64) -> float:
    """exp of :func:`validation_loss`: per token of the model's own tokenizer (bytes for the
    byte tokenizer), so only models with the same tokenizer compare."""
    return math.exp(validation_loss(model, rows, batch_size))
