"""The on-disk activation cache: safetensors shards and a meta.json that lists them.

A cache folder (named by a hash of everything that determines its vectors, see
``HarvestConfig.cache_key``) holds shards ``shard_00000.safetensors``, ... with the columns
``acts`` (n, d_model) float32, ``doc_index``, ``position`` and ``token_id`` (n,) int64, and
``meta.json``: the harvest config, the vector count, and each shard's name, size in bytes,
sha256 and number of vectors. Every read checks a shard's size and sha256 first: a shard that
fails raises :class:`CorruptCacheError` naming it. Counts in meta.json let a reader plan its way
through the shards without opening them (``saelib.activations.source.ShardedSource``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from saelib import assets
from saelib.io import write_bytes, write_json

if TYPE_CHECKING:
    from saelib.activations.harvest import HarvestConfig

CACHE_FORMAT = 2  # 2: meta.json records each shard's size and sha256
COLUMNS = ("acts", "doc_index", "position", "token_id")
META = "meta.json"
Tensor = torch.Tensor


class CorruptCacheError(ValueError):
    """A cache folder whose files do not match its meta.json."""

    def __init__(self, folder: Path, file: str, problem: str):
        super().__init__(f"corrupt activation cache {folder}: {file} {problem}")
        self.folder, self.file = folder, file


def cache_root() -> Path:
    return assets.cache_dir() / "activations"


def cache_folder(config: HarvestConfig, cache_dir: Path | None = None) -> Path:
    """Where ``config``'s cache lives (it exists once harvested)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / config.cache_key()


def check_count(folder: Path, meta: dict, n_rows: int) -> None:
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
    check_count(folder, meta, sum(counts))
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


def new_staging_folder(folder: Path) -> Path:
    """Create a uniquely named, empty folder beside ``folder`` (pid and random suffix; mkdir
    fails rather than share one)."""
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    return staging


def cache_meta(
    config: HarvestConfig, n_vectors: int, n_documents: int, d_model: int, shards: list[dict]
) -> dict:
    """meta.json's content for shards written by :class:`ShardWriter`."""
    return {
        "config": config.to_dict(),
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
    writer = ShardWriter(folder, config.shard_size)
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
    meta = cache_meta(config, n_vectors, n_documents, d_model, writer.close())
    write_json(folder / META, meta)
    return meta


class ShardWriter:
    """Buffers columns and writes fixed-size safetensors shards, recording each one's name, size
    and sha256 for meta.json."""

    def __init__(self, folder: Path, shard_size: int, prefix: str = "shard"):
        self.folder, self.shard_size, self.prefix = folder, shard_size, prefix
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
        name = f"{self.prefix}_{len(self.shards):05d}.safetensors"
        data = save(columns)
        write_bytes(self.folder / name, data)
        sha256 = hashlib.sha256(data).hexdigest()
        rows = len(columns["acts"])
        self.shards.append({"name": name, "bytes": len(data), "sha256": sha256, "rows": rows})
