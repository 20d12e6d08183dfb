"""Harvest residual-stream activations through nnsight into the on-disk cache (``cache``).

``harvest(HarvestConfig(...))`` runs the language model over a dataset, stops the forward pass
after the requested layer, keeps the residual stream at the chosen token positions (no pad or
special tokens), and stores it as safetensors shards under a folder named by a hash of
everything that determines the result. A second request with the same config reads the shards
and runs no forward pass.

The cache is checked and shared safely:

- ``meta.json`` records each shard's size and sha256; a load checks every shard before reading
  it. A cache that fails the check is rebuilt with a warning naming it (``on_corrupt="rebuild"``)
  or raises :class:`CorruptCacheError` (``on_corrupt="error"``).
- A harvest writes into a private staging folder ``<key>.partial-<pid>-<random>`` and claims the
  final ``<key>`` folder with one rename, so a final folder is never half-written.
- An exclusive lock on ``<key>.lock`` is held around "check, harvest, rename": a second process
  asking for the same key waits, then reads the first one's cache instead of redoing it.

Each vector keeps where it came from (document index, position, token id), so later tools can
show the context a latent fires in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from saelib import assets
from saelib.activations.cache import (
    CACHE_FORMAT,
    COLUMNS,
    META,
    CorruptCacheError,
    ShardWriter,
    Tensor,
    cache_folder,
    cache_meta,
    check_count,
    new_staging_folder,
    read_meta,
    read_shard,
)
from saelib.data import Document, load_documents
from saelib.io import exclusive_lock, write_json

Positions = Literal["all", "last", "answer"]


OnCorrupt = Literal["rebuild", "error"]


@dataclass(frozen=True)
class HarvestConfig:
    model: str = "smollm2-135m"
    layer: int = 15
    dataset: str = "gsm8k"
    positions: Positions = "all"
    max_tokens: int = 16_384  # how many activation vectors to keep
    context_length: int = 256  # documents are truncated to this many tokens
    # the first token of a document is an attention sink (in SmolLM2 its residual norm is ~100x
    # the others'), which would dominate an SAE's loss: leave it out, as others leave out BOS
    skip_first_token: bool = True
    batch_size: int = 16  # documents per forward pass
    shard_size: int = 65_536  # vectors per safetensors shard

    def to_dict(self) -> dict:
        """Plain JSON values (checkpoints record the harvest they were trained on)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HarvestConfig:
        """The config recorded by :meth:`to_dict`; keys it does not know are left out."""
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)

    def cache_key(self) -> str:
        """Hash of every field that changes the harvested vectors (not batching or sharding)."""
        determining = {
            "format": CACHE_FORMAT,
            "model": self.model,
            "model_fingerprint": assets.source_fingerprint(self.model),
            "layer": self.layer,
            "dataset": self.dataset,
            "dataset_fingerprint": assets.source_fingerprint(self.dataset),
            "positions": self.positions,
            "max_tokens": self.max_tokens,
            "context_length": self.context_length,
            "skip_first_token": self.skip_first_token,
        }
        text = json.dumps(determining, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class ActivationSet:
    """Activation vectors with where each came from."""

    acts: torch.Tensor  # (n, d_model) float32
    doc_index: torch.Tensor  # (n,) int64: index of the source document
    position: torch.Tensor  # (n,) int64: token position within the document
    token_id: torch.Tensor  # (n,) int64
    config: HarvestConfig
    path: Path | None = None
    from_cache: bool = False
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d_model(self) -> int:
        return self.acts.shape[1]

    def split_by_document(self, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Row indices (train, val), with whole documents on one side so no text leaks across."""
        return split_rows_by_document(self.doc_index, val_fraction, seed)


def split_rows_by_document(
    doc_index: Tensor, val_fraction: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Row indices (train, val) of rows with these document indices, whole documents on one
    side: a seeded shuffle of the documents puts ``val_fraction`` of them in val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    documents = torch.unique(doc_index)
    if len(documents) < 2:
        raise ValueError("a train/val split by document needs at least two documents")
    generator = torch.Generator().manual_seed(seed)
    shuffled = documents[torch.randperm(len(documents), generator=generator)]
    n_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
    is_val = torch.isin(doc_index, shuffled[:n_val])
    return torch.nonzero(~is_val).squeeze(1), torch.nonzero(is_val).squeeze(1)


def harvest(
    config: HarvestConfig,
    progress: bool = True,
    cache_dir: Path | None = None,
    on_corrupt: OnCorrupt = "rebuild",
) -> ActivationSet:
    """Return the activations for ``config``, from the cache (default :func:`cache_root`).

    A cache that fails its size and checksum check is removed and harvested again with a warning
    (``on_corrupt="rebuild"``), or raises :class:`CorruptCacheError` (``on_corrupt="error"``).

    Under torchrun (a ``torch.distributed`` process group of several processes) every process
    must call this: they share the forward passes, each taking a contiguous run of the document
    batches, into one cache equal to a one-process harvest (see :func:`_harvest_in_group`).
    """
    if on_corrupt not in ("rebuild", "error"):
        raise ValueError(f"on_corrupt must be 'rebuild' or 'error', got {on_corrupt!r}")
    folder = cache_folder(config, cache_dir)
    if _process_group_size() > 1:
        return _harvest_in_group(config, folder, progress, on_corrupt)
    root = folder.parent
    try:  # without the lock: a final folder only ever appears whole
        cached = _load_if_present(folder, config)
    except CorruptCacheError:
        cached = None  # checked again under the lock, where no other process is changing it
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f"{folder.name}.lock"):
        cached = _load_or_discard(folder, config, on_corrupt)  # another process may have built it
        if cached is not None:
            return cached
        _remove_leftover_staging(folder)
        return _harvest_to_cache(config, folder, progress)


def _remove_leftover_staging(folder: Path) -> None:
    """Called with the key's lock held: only its holder writes this key's staging folders, so
    any found are from a killed harvest."""
    for leftover in folder.parent.glob(f"{folder.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _load_if_present(folder: Path, config: HarvestConfig) -> ActivationSet | None:
    return _load(folder, config) if folder.exists() else None


def _load_or_discard(
    folder: Path, config: HarvestConfig, on_corrupt: OnCorrupt
) -> ActivationSet | None:
    """The cache in ``folder``, or None when there is none or it was corrupt and is now removed.
    Called with the key's lock held."""
    try:
        return _load_if_present(folder, config)
    except CorruptCacheError as error:
        if on_corrupt == "error":
            raise
        warnings.warn(f"{error}; removing it and harvesting again", stacklevel=3)
        shutil.rmtree(folder)
        return None


def _load(folder: Path, config: HarvestConfig) -> ActivationSet:
    """The cache in ``folder``, each shard checked against meta.json before it is parsed."""
    meta = read_meta(folder)
    parts = [read_shard(folder, entry) for entry in meta["shards"]]
    columns = {key: torch.cat([part[key] for part in parts]) for key in COLUMNS}
    check_count(folder, meta, len(columns["acts"]))
    return ActivationSet(
        acts=columns["acts"],
        doc_index=columns["doc_index"],
        position=columns["position"],
        token_id=columns["token_id"],
        config=config,
        path=folder,
        from_cache=True,
        meta=meta,
    )


def _harvest_to_cache(config: HarvestConfig, folder: Path, progress: bool) -> ActivationSet:
    """Harvest into a private staging folder, then claim ``folder`` with one rename.

    The caller holds the key's lock, so ``folder`` does not exist and nobody else writes it.
    """
    lm, documents = _model_and_documents(config)
    staging = new_staging_folder(folder)
    try:
        meta = _harvest_into(staging, lm, documents, config, progress)
        write_json(staging / META, meta)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = _load(folder, config)
    result.from_cache = False
    return result


def _model_and_documents(config: HarvestConfig) -> tuple[Any, list[Document]]:
    from saelib.lm import load_lm

    lm = load_lm(config.model)
    check_layer(config.layer, lm.n_layers, config.model)
    documents = load_documents(config.dataset)
    if config.positions == "answer" and documents[0].answer_start is None:
        raise ValueError(
            f"positions='answer' needs question/answer documents; {config.dataset!r} has none"
        )
    return lm, documents


def _harvest_into(
    staging: Path, lm, documents: list[Document], config: HarvestConfig, progress: bool
) -> dict:
    """Write the shards into ``staging``; return the meta.json content describing them."""
    writer = ShardWriter(staging, config.shard_size)
    collected = 0
    bar = tqdm(total=config.max_tokens, desc=f"harvest layer {config.layer}", disable=not progress)
    for start in range(0, len(documents), config.batch_size):
        batch = documents[start : start + config.batch_size]
        columns = _forward_batch(lm, batch, start, config)
        take = min(len(columns["acts"]), config.max_tokens - collected)
        writer.add({key: value[:take] for key, value in columns.items()})
        collected += take
        bar.update(take)
        if collected >= config.max_tokens:
            break
    bar.close()
    if collected == 0:
        raise ValueError(f"no tokens matched positions={config.positions!r} in {config.dataset!r}")
    n_documents = min(start + config.batch_size, len(documents))
    return cache_meta(config, collected, n_documents, lm.d_model, writer.close())


def _process_group_size() -> int:
    """The size of the process group (1 without one); a notebook kernel started by
    ``python -m saelib run --processes N`` joins its group here."""
    from saelib.training.distributed import join_launched_group, world_size

    join_launched_group()
    return world_size()


def _harvest_in_group(
    config: HarvestConfig, folder: Path, progress: bool, on_corrupt: OnCorrupt
) -> ActivationSet:
    """The harvest shared by every process of the group, sharded by document into one cache.

    Process 0 holds the key's lock throughout and decides whether to harvest. Every process then
    plans the batches a one-process harvest reads (tokenizer only: how many vectors each batch
    gives, up to ``max_tokens``), forwards its contiguous run of them (about equal vector counts)
    and writes its own shards into one staging folder; process 0 lists all shards in batch order
    in meta.json and renames the folder into place. The vectors, their order and the cache key
    are a one-process harvest's. All processes then read the cache.
    """
    from torch import distributed

    rank, world = distributed.get_rank(), distributed.get_world_size()
    root = folder.parent
    with contextlib.ExitStack() as stack:
        staging = None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(root / f"{folder.name}.lock"))
            if _load_or_discard(folder, config, on_corrupt) is None:
                _remove_leftover_staging(folder)
                staging = new_staging_folder(folder)
        shared = [staging]
        distributed.broadcast_object_list(shared, src=0)
        staging = shared[0]
        if staging is not None:
            try:
                lm, documents = _model_and_documents(config)
                plan = _batch_plan(lm, documents, config)
                mine = _contiguous_shares(plan, world)[rank]
                shards = _harvest_batches(staging, lm, documents, config, mine, rank, progress)
                every = [None] * world
                distributed.all_gather_object(every, shards)
                if rank == 0:
                    shards = [entry for part in every for entry in part]
                    n_vectors = sum(take for _, take in plan)
                    n_documents = min(plan[-1][0] + config.batch_size, len(documents))
                    meta = cache_meta(config, n_vectors, n_documents, lm.d_model, shards)
                    write_json(staging / META, meta)
                    os.rename(staging, folder)
            except BaseException:
                if rank == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
        distributed.barrier()  # the cache is in place before anyone reads it
    result = _load(folder, config)
    result.from_cache = staging is None
    return result


def _batch_plan(lm, documents: list[Document], config: HarvestConfig) -> list[tuple[int, int]]:
    """(first document, vectors kept) of each batch a one-process harvest forwards, in order:
    the tokenizer alone says how many vectors a batch gives; the last batch is cut at
    ``max_tokens``."""
    plan, collected = [], 0
    for start in range(0, len(documents), config.batch_size):
        _, keep = _encode(lm, documents[start : start + config.batch_size], config)
        take = min(int(keep.sum()), config.max_tokens - collected)
        plan.append((start, take))
        collected += take
        if collected >= config.max_tokens:
            break
    if collected == 0:
        raise ValueError(f"no tokens matched positions={config.positions!r} in {config.dataset!r}")
    return plan


def _contiguous_shares(plan: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """``plan`` cut into ``parts`` contiguous runs of about equal vector counts."""
    total = sum(take for _, take in plan)
    shares: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    collected = 0
    for batch in plan:
        shares[min(parts - 1, collected * parts // max(total, 1))].append(batch)
        collected += batch[1]
    return shares


def _harvest_batches(
    staging: Path,
    lm,
    documents: list[Document],
    config: HarvestConfig,
    batches: list[tuple[int, int]],
    rank: int,
    progress: bool,
) -> list[dict]:
    """Forward ``batches`` (first document, vectors kept) into this process's own shards."""
    writer = ShardWriter(staging, config.shard_size, prefix=f"shard_rank{rank:03d}")
    desc = f"harvest layer {config.layer} (process {rank})"
    for start, take in tqdm(batches, desc=desc, disable=not progress):
        columns = _forward_batch(lm, documents[start : start + config.batch_size], start, config)
        writer.add({key: value[:take] for key, value in columns.items()})
    return writer.close()


def residuals_for_texts(
    lm,
    texts: list[str],
    layer: int,
    positions: Positions = "last",
    context_length: int = 128,
    batch_size: int = 32,
    progress: bool = False,
    skip_first_token: bool = False,
) -> dict[str, Tensor]:
    """Residual stream after ``layer`` for in-memory texts, uncached.

    Returns the same columns as the cache: ``acts`` (n, d), ``doc_index`` (index into
    ``texts``), ``position`` and ``token_id``. With positions="last" row i belongs to texts[i].
    """
    check_layer(layer, lm.n_layers, lm.name)
    config = HarvestConfig(
        model=lm.name,
        layer=layer,
        positions=positions,
        context_length=context_length,
        skip_first_token=skip_first_token,
    )
    parts = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=f"residuals layer {layer}", disable=not progress):
        batch = [Document(text) for text in texts[start : start + batch_size]]
        parts.append(_forward_batch(lm, batch, start, config))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def check_layer(layer: int, n_layers: int, model: str) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for {model} (layers 0..{n_layers - 1})")


def _encode(lm, batch: list[Document], config: HarvestConfig):
    """(tokenized batch, (batch, seq) bool mask of the tokens whose vectors are kept)."""
    encoded = lm.tokenizer(
        [doc.text for doc in batch],
        return_tensors="pt",
        padding=True,
        padding_side="right",
        truncation=True,
        max_length=config.context_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    keep = _position_mask(encoded, batch, config.positions)
    if config.skip_first_token:
        keep[:, 0] = False
    return encoded, keep


@torch.inference_mode()
def _forward_batch(lm, batch: list[Document], first_index: int, config: HarvestConfig) -> dict:
    encoded, keep = _encode(lm, batch, config)
    with lm.model.trace(
        input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
    ) as tracer:
        hidden = lm.layers[config.layer].output.save()
        tracer.stop()  # nothing after this layer is needed
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    rows, cols = torch.nonzero(keep, as_tuple=True)
    return {
        "acts": hidden[rows, cols].float().cpu(),
        "doc_index": rows + first_index,
        "position": cols,
        "token_id": encoded["input_ids"][rows, cols],
    }


def _position_mask(encoded, batch: list[Document], positions: Positions) -> torch.Tensor:
    """(batch, seq) bool: which tokens to keep. Pad and special tokens are never kept."""
    real = encoded["attention_mask"].bool() & ~encoded["special_tokens_mask"].bool()
    if positions == "all":
        return real
    if positions == "last":
        last = real.cumsum(1).argmax(1)  # first index reaching the row's count of real tokens
        mask = torch.zeros_like(real)
        mask[torch.arange(len(batch)), last] = real.any(1)
        return mask
    if positions == "answer":
        starts = torch.tensor([doc.answer_start for doc in batch]).unsqueeze(1)
        offsets = encoded["offset_mapping"]  # (batch, seq, 2) character spans
        return real & (offsets[..., 1] > starts) & (offsets[..., 1] > offsets[..., 0])
    raise ValueError(f"positions must be 'all', 'last' or 'answer', got {positions!r}")
