"""Activations: harvested from a language model through nnsight, cached on disk, and read back
for training as an in-memory tensor or a stream of cached shards."""

from saelib.activations.harvest import (
    ActivationSet,
    CorruptCacheError,
    HarvestConfig,
    cache_root,
    check_layer,
    harvest,
    residuals_for_texts,
)
from saelib.activations.source import (
    ActivationSource,
    TensorSource,
    as_source,
    epoch_permutation,
    tensor_fingerprint,
)

__all__ = [
    "ActivationSource",
    "TensorSource",
    "as_source",
    "epoch_permutation",
    "tensor_fingerprint",
    "ActivationSet",
    "CorruptCacheError",
    "HarvestConfig",
    "cache_root",
    "check_layer",
    "harvest",
    "residuals_for_texts",
]
