"""Activation sources: the in-memory tensor order, and streaming a cache shard by shard."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelib.activations import (
    ActivationSet,
    CorruptCacheError,
    HarvestConfig,
    ShardedSource,
    TensorSource,
    as_source,
    split_cache_by_document,
    tensor_fingerprint,
    write_cache,
)
from saelib.training import tensor_fingerprint as training_fingerprint


def _columns(first: int, n: int, d: int, doc_length: int = 7) -> dict[str, torch.Tensor]:
    """Rows numbered first..first+n-1: acts[:, 0] holds the row number, the rest is noise."""
    index = torch.arange(first, first + n)
    acts = torch.randn(n, d, generator=torch.Generator().manual_seed(first))
    acts[:, 0] = index.float()
    return {
        "acts": acts,
        "doc_index": index // doc_length,
        "position": index % doc_length,
        "token_id": index % 50,
    }


def _write(
    folder: Path,
    n: int,
    d: int,
    shard_size: int,
    chunk: int = 97,
    config: HarvestConfig | None = None,
) -> Path:
    """A cache in the harvest format of ``n`` numbered rows (see :func:`_columns`)."""
    config = config or HarvestConfig(max_tokens=n, shard_size=shard_size)
    chunks = (_columns(first, min(chunk, n - first), d) for first in range(0, n, chunk))
    write_cache(folder, chunks, config)
    return folder


def _epoch(source, epoch: int, batch_size: int, seed: int) -> torch.Tensor:
    per_epoch = math.ceil(source.n_rows / batch_size)
    steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
    return torch.cat([source.batch(step, batch_size, seed) for step in steps])


@pytest.fixture
def cache(tmp_path) -> Path:
    return _write(tmp_path / "cache", n=1000, d=5, shard_size=130)  # 7 full shards and one of 90


def test_tensor_source_keeps_the_per_epoch_seeded_permutation():
    data = torch.randn(103, 4)
    source = as_source(data)
    batch_size, seed = 10, 3
    per_epoch = math.ceil(103 / batch_size)
    for step in range(3 * per_epoch + 2):
        epoch, offset = divmod(step, per_epoch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(103, generator=generator)
        expected = data[perm[offset * batch_size : (offset + 1) * batch_size]]
        assert torch.equal(source.batch(step, batch_size, seed), expected)
    assert len(source.batch(per_epoch - 1, batch_size, seed)) == 3  # the short last batch


def test_tensor_source_fingerprint_and_as_source():
    data = torch.randn(20, 3)
    source = TensorSource(data)
    assert source.fingerprint() == tensor_fingerprint(data) == training_fingerprint(data)
    assert as_source(source) is source
    assert (source.n_rows, source.d) == (20, 3)
    with pytest.raises(TypeError):
        as_source([[1.0, 2.0]])


def test_sharded_source_reads_every_row_once_per_epoch(cache):
    source = ShardedSource(cache)
    assert (source.n_rows, source.d) == (1000, 5)
    epochs = [_epoch(source, epoch, 64, seed=0) for epoch in range(2)]
    for rows in epochs:
        assert torch.equal(rows[:, 0].sort().values, torch.arange(1000).float())
    assert not torch.equal(epochs[0], epochs[1])  # each epoch its own order
    # rows spread over the shards, not shard after shard in file order
    first_batch_shards = torch.unique(epochs[0][:64, 0].long() // 130)
    assert len(first_batch_shards) == 2


def test_sharded_source_is_a_pure_function_of_seed_and_step(cache):
    sequential = _epoch(ShardedSource(cache), 1, 64, seed=4)
    per_epoch = math.ceil(1000 / 64)
    resumed = ShardedSource(cache)  # a fresh instance asked for steps out of order
    for offset in (9, 3, per_epoch - 1, 0):
        expected = sequential[offset * 64 : (offset + 1) * 64]
        assert torch.equal(resumed.batch(per_epoch + offset, 64, seed=4), expected)
    assert not torch.equal(_epoch(ShardedSource(cache), 1, 64, seed=5), sequential)


def test_sharded_source_layout_needs_no_rows_in_meta(cache):
    """Caches written before meta.json recorded rows per shard stream the same batches."""
    expected = _epoch(ShardedSource(cache), 0, 100, seed=1)
    meta = json.loads((cache / "meta.json").read_text())
    for entry in meta["shards"]:
        del entry["rows"]
    (cache / "meta.json").write_text(json.dumps(meta))
    assert torch.equal(_epoch(ShardedSource(cache), 0, 100, seed=1), expected)
    meta["config"]["shard_size"] = 120  # shards that do not hold what meta.json implies
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCacheError, match="holds 130 vectors"):
        _epoch(ShardedSource(cache), 0, 100, seed=1)


def test_sharded_source_row_subsets(cache):
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:300]] = True
    mask[130:260] = False  # a shard with no rows kept
    by_mask = ShardedSource(cache, rows=mask)
    by_index = ShardedSource(cache, rows=torch.nonzero(mask).squeeze(1))
    assert by_mask.n_rows == by_index.n_rows == int(mask.sum())
    rows = _epoch(by_mask, 0, 32, seed=2)
    assert torch.equal(rows[:, 0].sort().values, torch.nonzero(mask).squeeze(1).float())
    assert torch.equal(_epoch(by_index, 0, 32, seed=2), rows)
    assert by_mask.fingerprint() == by_index.fingerprint() != ShardedSource(cache).fingerprint()
    with pytest.raises(ValueError, match="repeat"):
        ShardedSource(cache, rows=torch.tensor([1, 1]))


def test_split_cache_by_document_matches_the_in_memory_split(cache):
    columns = _columns(0, 1000, 5)
    in_memory = ActivationSet(**columns, config=HarvestConfig())
    expected = in_memory.split_by_document(0.25, seed=3)
    train, val = split_cache_by_document(cache, 0.25, seed=3)
    assert torch.equal(train, expected[0]) and torch.equal(val, expected[1])
    rows = _epoch(ShardedSource(cache, rows=train), 0, 64, seed=0)
    assert torch.equal(rows[:, 0].sort().values, train.float())


def test_sharded_source_from_a_harvest_config(tmp_path):
    config = HarvestConfig(max_tokens=300, shard_size=100)
    with pytest.raises(FileNotFoundError, match="harvest"):
        ShardedSource(config, cache_dir=tmp_path)
    _write(tmp_path / config.cache_key(), n=300, d=4, shard_size=100, config=config)
    source = ShardedSource(config, cache_dir=tmp_path)
    assert source.n_rows == 300 and source.config == config


def test_sharded_source_refuses_a_corrupt_shard(cache):
    shard = cache / "shard_00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the vectors: same size, other sha256
    shard.write_bytes(bytes(data))
    source = ShardedSource(cache, shards_in_memory=8)  # the whole epoch reads every shard
    with pytest.raises(CorruptCacheError, match="shard_00003.safetensors"):
        source.batch(0, 64, seed=0)


def _peak_rss_streaming(folder: Path) -> int:
    """Peak resident memory (bytes) of a fresh process streaming one epoch of the cache."""
    script = (
        "import math, resource, sys\n"
        "from saelib.activations import ShardedSource\n"
        "source = ShardedSource(sys.argv[1])\n"
        "for step in range(math.ceil(source.n_rows / 4096)):\n"
        "    source.batch(step, 4096, 0)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1]) * 1024  # Linux reports KiB


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_peak_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    shard_rows, d = 8192, 576  # ~19 MB of vectors per shard
    small = _write(tmp_path / "small", 2 * shard_rows, d, shard_rows, chunk=shard_rows)
    large = _write(tmp_path / "large", 20 * shard_rows, d, shard_rows, chunk=shard_rows)
    peak_small, peak_large = _peak_rss_streaming(small), _peak_rss_streaming(large)
    more_data = 18 * shard_rows * d * 4  # ~340 MB
    assert peak_large - peak_small < 0.25 * more_data, (peak_small, peak_large)
