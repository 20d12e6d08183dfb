"""Sparse training of a small causal language model: the model, its text, masked Linears with
ERK densities, mask updaters (static magnitude, SET, RigL, and SparsAE's evolution strategy),
self-distillation from an EMA teacher, FLOPs counting only unmasked weights, and the
next-token loss for the shared training loop.

```
text.py (documents -> token rows) -> lm.py (TransformerLM) -> masks.py (MaskedLinear, ERK)
    -> train_saes(NextTokenLoss or distill.py's DistillationLoss,
                  hooks=[FlopCounter, updater, EMATeacherUpdate])
       (updaters: updaters.py's static, SET and RigL; evolution.py's SparsAE)
    -> perplexity; explore.py and plots.py show the results
```
"""

from saelib.sparse.distill import DistillationLoss, EMATeacherUpdate
from saelib.sparse.evolution import SparsAE
from saelib.sparse.flops import (
    FlopCounter,
    FlopsPerToken,
    flops_per_token,
    rigl_update_flops_per_token,
)
from saelib.sparse.lm import LM_PRESETS, LMConfig, TransformerLM
from saelib.sparse.masks import (
    MaskedLinear,
    apply_masks,
    erk_densities,
    global_density,
    layer_counts,
    layer_densities,
    mask_linears,
    masked_layers,
    random_masks,
    track_dense_grads,
)
from saelib.sparse.text import (
    ByteTokenizer,
    PretrainedTokenizer,
    TextConfig,
    TextData,
    load_text,
    load_tokenizer,
    pack,
    split_documents,
)
from saelib.sparse.train import NextTokenLoss, perplexity, validation_loss
from saelib.sparse.updaters import SET, RigL, StaticMagnitude, drop_and_grow, magnitude_prune

__all__ = [
    "LM_PRESETS",
    "SET",
    "ByteTokenizer",
    "DistillationLoss",
    "EMATeacherUpdate",
    "FlopCounter",
    "FlopsPerToken",
    "LMConfig",
    "MaskedLinear",
    "NextTokenLoss",
    "PretrainedTokenizer",
    "RigL",
    "SparsAE",
    "StaticMagnitude",
    "TextConfig",
    "TextData",
    "TransformerLM",
    "apply_masks",
    "drop_and_grow",
    "erk_densities",
    "flops_per_token",
    "global_density",
    "layer_counts",
    "layer_densities",
    "load_text",
    "load_tokenizer",
    "magnitude_prune",
    "mask_linears",
    "masked_layers",
    "pack",
    "perplexity",
    "random_masks",
    "rigl_update_flops_per_token",
    "split_documents",
    "track_dense_grads",
    "validation_loss",
]
