"""A small causal Transformer language model for sparse-training studies.

Pre-norm blocks (LayerNorm, causal self-attention, LayerNorm, GELU MLP), learned positions, and
the output head tied to the token embedding. Attention is ``scaled_dot_product_attention`` with
``is_causal=True``, so a position never sees a later token. Every Linear has no bias: the
weights a mask acts on are the whole layer. The output head is the embedding matrix applied
with ``F.linear``, not a Linear module, so mask helpers that look for Linears never touch it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LM_PRESETS", "LMConfig", "TransformerLM"]


@dataclass(frozen=True)
class LMConfig:
    """Model size. The defaults (about 0.8M parameters with a byte vocabulary) train in
    minutes on a CPU; :data:`LM_PRESETS` holds larger sizes."""

    vocab_size: int = 257  # 256 bytes + an end-of-document token
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    context: int = 128  # most positions a sequence may have

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


# Sizes by name; the vocabulary comes from the tokenizer (``dataclasses.replace``). Parameter
# counts below exclude the embeddings (which a byte vocabulary keeps small and a 49k-token
# vocabulary does not).
LM_PRESETS: dict[str, LMConfig] = {
    "cpu": LMConfig(),  # 0.79M in the blocks: trains in minutes on 2 cores
    "plan": LMConfig(d_model=512, n_layers=4, n_heads=4, d_mlp=2048, context=256),  # 12.6M
    "gpt2-small": LMConfig(d_model=768, n_layers=12, n_heads=12, d_mlp=3072, context=1024),  # 85M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.down = nn.Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.mlp(self.norm_mlp(x))


class TransformerLM(nn.Module):
    """tokens (batch, length) int64 -> next-token logits (batch, length, vocab_size)."""

    def __init__(self, config: LMConfig = LMConfig(), seed: int = 0):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = nn.LayerNorm(config.d_model)
        self._init_weights(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator) -> None:
        """GPT-2's: N(0, 0.02), residual outputs scaled by 1/sqrt(2 n_layers); seeded."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, parameter in self.named_parameters():
            if parameter.ndim < 2:
                continue  # LayerNorms keep weight 1, bias 0
            std = residual_std if name.endswith(("out.weight", "down.weight")) else 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.config.context:
            raise ValueError(f"{length} tokens exceed the model's context {self.config.context}")
        x = self.embed(tokens) + self.positions(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm_out(x), self.embed.weight)  # tied output head

    def n_parameters(self, embeddings: bool = True) -> int:
        skipped = {"embed.weight", "positions.weight"} if not embeddings else set()
        return sum(p.numel() for name, p in self.named_parameters() if name not in skipped)

    def after_optimizer_step(self) -> None:
        """Let submodules that keep an invariant restore it after each update (a masked
        Linear zeroes its masked weights; the training loop calls this)."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()
