"""Harvest residual-stream activations through nnsight, with an on-disk cache.

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
show the context a latent fires in. meta.json also records each shard's number of vectors, so a
reader can plan its way through the shards without opening them (``ShardedSource`` streams a
cache for training; :func:`write_cache` writes one from any columns).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from saelib import assets
from saelib.data import Document, load_documents
from saelib.io import exclusive_lock, write_bytes, write_json

Positions = Literal["all", "last", "answer"]
OnCorrupt = Literal["rebuild", "error"]
CACHE_FORMAT = 2  # 2: meta.json records each shard's size and sha256
COLUMNS = ("acts", "doc_index", "position", "token_id")
META = "meta.json"
Tensor = torch.Tensor


class CorruptCacheError(ValueError):
    """A cache folder whose files do not match its meta.json."""

    def __init__(self, folder: Path, file: str, problem: str):
        super().__init__(f"corrupt activation cache {folder}: {file} {problem}")
        self.folder, self.file = folder, file


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
            "model_fingerprint": _fingerprint(self.model),
            "layer": self.layer,
            "dataset": self.dataset,
            "dataset_fingerprint": _fingerprint(self.dataset),
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


def cache_root() -> Path:
    return assets.cache_dir() / "activations"


def cache_folder(config: HarvestConfig, cache_dir: Path | None = None) -> Path:
    """Where ``config``'s cache lives (it exists once harvested)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / config.cache_key()


def harvest(
    config: HarvestConfig,
    progress: bool = True,
    cache_dir: Path | None = None,
    on_corrupt: OnCorrupt = "rebuild",
) -> ActivationSet:
    """Return the activations for ``config``, from the cache (default :func:`cache_root`).

    A cache that fails its size and checksum check is removed and harvested again with a warning
    (``on_corrupt="rebuild"``), or raises :class:`CorruptCacheError` (``on_corrupt="error"``).
    """
    if on_corrupt not in ("rebuild", "error"):
        raise ValueError(f"on_corrupt must be 'rebuild' or 'error', got {on_corrupt!r}")
    folder = cache_folder(config, cache_dir)
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
        # only the lock holder writes this key's staging folders: any found are from a killed run
        for leftover in root.glob(f"{folder.name}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return _harvest_to_cache(config, folder, progress)


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
    _check_count(folder, meta, len(columns["acts"]))
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


def _check_count(folder: Path, meta: dict, n_rows: int) -> None:
    if n_rows != meta["n_vectors"]:
        problem = f"records {meta['n_vectors']} vectors, the shards hold {n_rows}"
        raise CorruptCacheError(folder, META, problem)


def read_meta(folder: Path) -> dict:
    """A cache folder's meta.json, checked to list each shard's name, size and sha256."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        shards = meta["shards"]
        valid = isinstance(meta["n_vectors"], int) and len(shards) > 0
        valid = valid and all(_valid_shard_entry(entry) for entry in shards)
    except FileNotFoundError:
        raise CorruptCacheError(folder, META, "is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"is unreadable ({type(error).__name__}: {error})"
        raise CorruptCacheError(folder, META, problem) from None
    if not valid:
        raise CorruptCacheError(folder, META, "does not list its shards' names, sizes and sha256")
    return meta


def _valid_shard_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and Path(entry["name"]).name == entry["name"]  # a plain file name inside the folder
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    )


def shard_row_counts(folder: Path, meta: dict) -> list[int]:
    """Vectors in each shard, from meta.json alone (no shard is read). Caches that predate the
    per-shard ``rows`` entry hold ``shard_size`` vectors in every shard but the last."""
    shards = meta["shards"]
    if all(isinstance(entry.get("rows"), int) for entry in shards):
        counts = [entry["rows"] for entry in shards]
    else:
        size = meta.get("config", {}).get("shard_size")
        if not isinstance(size, int) or size < 1:
            raise CorruptCacheError(folder, META, "records neither shard rows nor shard_size")
        last = meta["n_vectors"] - size * (len(shards) - 1)
        counts = [size] * (len(shards) - 1) + [last]
    if min(counts) < 1:
        raise CorruptCacheError(folder, META, "records a shard without vectors")
    _check_count(folder, meta, sum(counts))
    return counts


def read_shard(
    folder: Path, entry: dict, columns: Sequence[str] = COLUMNS, verify: bool = True
) -> dict[str, Tensor]:
    """Read ``columns`` of the shard that meta.json's ``entry`` describes, first checking its
    size and sha256 (``verify``); a shard that fails raises :class:`CorruptCacheError`."""
    folder = Path(folder)
    if verify:
        _verify_shard(folder, entry)
    name = entry["name"]
    try:
        with safe_open(folder / name, framework="pt") as handle:
            stored = sorted(handle.keys())
            read = {key: handle.get_tensor(key) for key in columns if key in stored}
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        problem = f"is not a readable safetensors file ({type(error).__name__})"
        raise CorruptCacheError(folder, name, problem) from None
    if stored != sorted(COLUMNS):
        raise CorruptCacheError(folder, name, f"holds {stored}, not {list(COLUMNS)}")
    rows = {len(tensor) for tensor in read.values()}
    if len(rows) > 1 or ("rows" in entry and rows != {entry["rows"]}):
        raise CorruptCacheError(folder, name, f"holds columns of {sorted(rows)} rows")
    return read


def _verify_shard(folder: Path, entry: dict) -> None:
    """Check a shard's size and sha256 against meta.json."""
    name = entry["name"]
    path = folder / name
    try:
        size = path.stat().st_size
        digest = _sha256(path) if size == entry["bytes"] else None
    except FileNotFoundError:
        raise CorruptCacheError(folder, name, "is missing") from None
    except OSError as error:
        raise CorruptCacheError(folder, name, f"is unreadable ({error.strerror})") from None
    if size != entry["bytes"]:
        raise CorruptCacheError(folder, name, f"has {size} bytes, {META} records {entry['bytes']}")
    if digest != entry["sha256"]:
        raise CorruptCacheError(folder, name, f"does not match its sha256 in {META}")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _harvest_to_cache(config: HarvestConfig, folder: Path, progress: bool) -> ActivationSet:
    """Harvest into a private staging folder, then claim ``folder`` with one rename.

    The caller holds the key's lock, so ``folder`` does not exist and nobody else writes it.
    """
    from saelib.lm import load_lm

    lm = load_lm(config.model)
    check_layer(config.layer, lm.n_layers, config.model)
    documents = load_documents(config.dataset)
    if config.positions == "answer" and documents[0].answer_start is None:
        raise ValueError(
            f"positions='answer' needs question/answer documents; {config.dataset!r} has none"
        )
    staging = _new_staging_folder(folder)
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


def _new_staging_folder(folder: Path) -> Path:
    """Create a uniquely named, empty folder beside ``folder`` (pid and random suffix; mkdir
    fails rather than share one)."""
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    return staging


def _harvest_into(
    staging: Path, lm, documents: list[Document], config: HarvestConfig, progress: bool
) -> dict:
    """Write the shards into ``staging``; return the meta.json content describing them."""
    writer = _ShardWriter(staging, config.shard_size)
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
    return _meta(config, collected, n_documents, lm.d_model, writer.close())


def _meta(config: HarvestConfig, n_vectors: int, n_documents: int, d_model: int, shards) -> dict:
    return {
        "config": asdict(config),
        "cache_key": config.cache_key(),
        "n_vectors": n_vectors,
        "n_documents_read": n_documents,
        "d_model": d_model,
        "shards": shards,
    }


def write_cache(folder: Path, chunks: Iterable[dict[str, Tensor]], config: HarvestConfig) -> dict:
    """Write column chunks (``acts``, ``doc_index``, ``position``, ``token_id``) as a cache in
    the harvest format, shard by shard (``config.shard_size`` vectors each), with its meta.json;
    return the meta. For caches built outside :func:`harvest`, e.g. synthetic data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(folder, config.shard_size)
    n_vectors, n_documents, d_model = 0, 0, 0
    for chunk in chunks:
        if sorted(chunk) != sorted(COLUMNS):
            raise ValueError(f"a chunk must hold the columns {list(COLUMNS)}, not {sorted(chunk)}")
        writer.add(chunk)
        n_vectors += len(chunk["acts"])
        n_documents = max(n_documents, int(chunk["doc_index"].max()) + 1)
        d_model = chunk["acts"].shape[1]
    if n_vectors == 0:
        raise ValueError("write_cache needs at least one vector")
    meta = _meta(config, n_vectors, n_documents, d_model, writer.close())
    write_json(folder / META, meta)
    return meta


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


@torch.inference_mode()
def _forward_batch(lm, batch: list[Document], first_index: int, config: HarvestConfig) -> dict:
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


class _ShardWriter:
    """Buffers columns and writes fixed-size safetensors shards, recording each one's name, size
    and sha256 for meta.json."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.pending: list[dict] = []
        self.pending_rows = 0
        self.shards: list[dict] = []

    def add(self, columns: dict) -> None:
        self.pending.append(columns)
        self.pending_rows += len(columns["acts"])
        while self.pending_rows >= self.shard_size:
            merged = self._merge()
            self._write({key: value[: self.shard_size] for key, value in merged.items()})
            rest = {key: value[self.shard_size :] for key, value in merged.items()}
            self.pending, self.pending_rows = [rest], len(rest["acts"])

    def close(self) -> list[dict]:
        if self.pending_rows:
            self._write(self._merge())
        return self.shards

    def _merge(self) -> dict:
        keys = self.pending[0].keys()
        return {key: torch.cat([part[key] for part in self.pending]).contiguous() for key in keys}

    def _write(self, columns: dict) -> None:
        name = f"shard_{len(self.shards):05d}.safetensors"
        data = save(columns)
        write_bytes(self.folder / name, data)
        sha256 = hashlib.sha256(data).hexdigest()
        rows = len(columns["acts"])
        self.shards.append({"name": name, "bytes": len(data), "sha256": sha256, "rows": rows})


def _fingerprint(source: str) -> str:
    """Identify the content behind a model or dataset source, cheaply."""
    if source in assets.ASSETS:
        return assets.ASSETS[source].sha256
    path = Path(source).expanduser()
    if path.exists():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return source
