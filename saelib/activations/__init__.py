"""Activations: harvested from a language model through nnsight (``harvest``), cached on disk as
checksummed shards (``cache``), and read back for training as an in-memory tensor or a stream of
cached shards (``source``)."""

from saelib.activations.cache import (
    CorruptCacheError,
    cache_folder,
    cache_root,
    read_meta,
    read_shard,
    shard_row_counts,
    write_cache,
)
from saelib.activations.harvest import (
    ActivationSet,
    HarvestConfig,
    check_layer,
    harvest,
    residuals_for_texts,
    split_rows_by_document,
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
