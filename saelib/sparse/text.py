"""Text for language-model training: tokenise documents, split them, pack fixed-length rows.

Documents (the embedded ``wiki`` summaries by default; any source
:func:`saelib.data.load_documents` reads) are split into train and validation BY DOCUMENT with
a seed, so no validation text was seen in training. Each side is tokenised, every document
followed by an end-of-document token, concatenated and cut into rows of ``context + 1`` tokens:
a row is a model input (its first ``context`` tokens) and its next-token targets (its last
``context``). The tail that fills no row is dropped.

Tokenizers: ``"bytes"`` (UTF-8 bytes, 256 ids, plus id 256 for end-of-document) or a language
model's (``"smollm2-135m"``, a local folder or a Hugging Face id; the embedded one is read from
the cache offline).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from saelib.data import load_documents

__all__ = [
    "ByteTokenizer",
    "PretrainedTokenizer",
    "TextConfig",
    "TextData",
    "Tokenizer",
    "load_text",
    "load_tokenizer",
    "pack",
    "split_documents",
]


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int  # appended after every document

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 marks the end of a document."""

    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class PretrainedTokenizer:
    """A transformers tokenizer behind the same two methods; its EOS ends a document."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eod_id = int(tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str = "bytes") -> Tokenizer:
    """``"bytes"``, or the tokenizer of a language model source (as :func:`saelib.lm.load_lm`
    takes it), without loading its weights."""
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    from saelib.lm import _resolve  # the embedded model's converted folder, from the cache

    folder, gguf_file = _resolve(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return PretrainedTokenizer(AutoTokenizer.from_pretrained(folder, **kwargs))


@dataclass(frozen=True)
class TextConfig:
    dataset: str = "wiki"  # embedded name, local file, or Hugging Face dataset
    tokenizer: str = "bytes"
    context: int = 128
    val_fraction: float = 0.1
    seed: int = 0  # which documents go to validation
    max_documents: int | None = None  # the first this many documents; None = all


@dataclass
class TextData:
    train: Tensor  # (n_train, context + 1) int64
    val: Tensor  # (n_val, context + 1) int64
    train_documents: list[int]  # indices into the loaded documents
    val_documents: list[int]
    tokenizer: Tokenizer


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` document indices into (train, validation), each sorted; at
    least one document on each side."""
    if n < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"cannot split {n} documents with val_fraction={val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def pack(token_lists: list[list[int]], context: int, eod_id: int) -> Tensor:
    """Documents joined (each followed by ``eod_id``) and cut into (n, context + 1) rows."""
    stream = [token for tokens in token_lists for token in (*tokens, eod_id)]
    n_rows = len(stream) // (context + 1)
    if n_rows == 0:
        raise ValueError(f"{len(stream)} tokens fill no row of {context + 1}")
    return torch.tensor(stream[: n_rows * (context + 1)], dtype=torch.int64).view(n_rows, -1)


def load_text(config: TextConfig = TextConfig()) -> TextData:
    """Documents of ``config.dataset``, split by document and packed into token rows."""
    documents = load_documents(config.dataset, limit=config.max_documents)
    train_ids, val_ids = split_documents(len(documents), config.val_fraction, config.seed)
    tokenizer = load_tokenizer(config.tokenizer)

    def rows(ids: list[int]) -> Tensor:
        tokens = [tokenizer.encode(documents[i].text) for i in ids]
        return pack(tokens, config.context, tokenizer.eod_id)

    return TextData(rows(train_ids), rows(val_ids), train_ids, val_ids, tokenizer)
