"""Activations: harvested from a language model through nnsight, cached on disk, and read back
for training as an in-memory tensor or a stream of cached shards."""

from saelib.activations.harvest import (
    ActivationSet,
    CorruptCacheError,
    HarvestConfig,
    cache_folder,
    cache_root,
    check_layer,
    harvest,
    read_meta,
    read_shard,
    residuals_for_texts,
    shard_row_counts,
    split_rows_by_document,
    write_cache,
)
from saelib.activations.source import (
    ActivationSource,
    ShardedSource,
    TensorSource,
    as_source,
    epoch_permutation,
    split_cache_by_document,
    tensor_fingerprint,
)

__all__ = [
    "ActivationSet",
    "ActivationSource",
    "CorruptCacheError",
    "HarvestConfig",
    "ShardedSource",
    "TensorSource",
    "as_source",
    "cache_folder",
    "cache_root",
    "check_layer",
    "epoch_permutation",
    "harvest",
    "read_meta",
    "read_shard",
    "residuals_for_texts",
    "shard_row_counts",
    "split_cache_by_document",
    "split_rows_by_document",
    "tensor_fingerprint",
    "write_cache",
]
