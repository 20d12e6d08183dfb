"""Context windows around example rows: the tokens before and after, and the latent on each.

A window token the activation set holds gets its id from the set and the latent's activation
from the stored codes. Other tokens (positions left out of the harvest, or beyond the harvested
part of a document) get their id from the source document re-tokenized the way
:func:`saelib.activations.harvest` tokenized it (with a tokenizer; else -1) and a NaN
activation. Positions before the document start or past its end are -1 / NaN.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from saelib.activations import ActivationSet
from saelib.data import load_documents
from saelib.features.codes import Codes


class ContextWindows:
    """Token ids and latent activations in windows of ``left`` + 1 + ``right`` tokens."""

    def __init__(self, activations: ActivationSet, codes: Codes, tokenizer, left: int, right: int):
        self.activations, self.codes, self.tokenizer = activations, codes, tokenizer
        self.offsets = torch.arange(-left, right + 1)
        self.stride = int(activations.position.max()) + right + 2  # keys never alias
        keys = activations.doc_index * self.stride + activations.position
        self.keys, self.key_rows = keys.sort()
        self.texts: list[str] | None = None  # source documents, loaded when first needed

    def for_examples(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens, acts) of shape rows.shape + (window,) for rows (d_sae, slots), -1 = empty."""
        latents = torch.arange(rows.shape[0]).view(-1, 1).expand_as(rows).reshape(-1)
        tokens, acts = self._windows(rows.reshape(-1), latents)
        return tokens.view(*rows.shape, -1), acts.view(*rows.shape, -1)

    def _windows(self, rows: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        valid = rows >= 0
        safe = rows.clamp_min(0)
        position = self.activations.position[safe].unsqueeze(1) + self.offsets
        doc = self.activations.doc_index[safe].unsqueeze(1).expand_as(position)
        found = self._find(doc, position).masked_fill(~valid.unsqueeze(1), -1)
        tokens = torch.full(position.shape, -1, dtype=torch.int64)
        acts = torch.full(position.shape, torch.nan)
        inside = found >= 0
        tokens[inside] = self.activations.token_id[found[inside]].long()
        wanted = latents.unsqueeze(1).expand_as(position)[inside]
        acts[inside] = self.codes.lookup(found[inside], wanted)
        missing = valid.unsqueeze(1) & ~inside & (position >= 0)
        if self.tokenizer is not None and missing.any():
            tokens[missing] = self._document_tokens(doc[missing], position[missing])
        return tokens, acts

    def _find(self, doc: Tensor, position: Tensor) -> Tensor:
        """Row holding (doc, position), -1 where the set has none."""
        keys = torch.where(position >= 0, doc * self.stride + position, -1)
        where = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        hit = self.keys[where] == keys
        return torch.where(hit, self.key_rows[where], -1)

    def _document_tokens(self, doc: Tensor, position: Tensor) -> Tensor:
        table, first = self._token_table(doc.unique())
        local = doc - first
        inside = position < table.shape[1]
        result = torch.full(doc.shape, -1, dtype=torch.int64)
        result[inside] = table[local[inside], position[inside]]
        return result

    def _token_table(self, needed: Tensor) -> tuple[Tensor, int]:
        """(documents, length) token ids of documents needed.min()..needed.max(), -1 padded."""
        first, last = int(needed.min()), int(needed.max())
        texts = self._load_texts(last + 1)
        wanted = set(needed.tolist())
        chosen = [index for index in range(first, min(last + 1, len(texts))) if index in wanted]
        ids = [[] for _ in range(first, last + 1)]
        for start in range(0, len(chosen), 256):
            batch = chosen[start : start + 256]
            encoded = self.tokenizer(
                [texts[index] for index in batch],
                truncation=True,
                max_length=self.activations.config.context_length,
            )["input_ids"]
            for index, row in zip(batch, encoded, strict=True):
                ids[index - first] = list(row)
        table = torch.full((len(ids), max(map(len, ids), default=0)), -1, dtype=torch.int64)
        for index, row in enumerate(ids):
            table[index, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return self._checked(table, first), first

    def _load_texts(self, count: int) -> list[str]:
        """The first ``count`` documents of the harvested dataset ([] if it cannot be read)."""
        if self.texts is None or 0 < len(self.texts) < count:  # [] = unreadable: no retry
            try:
                documents = load_documents(self.activations.config.dataset, limit=count)
                self.texts = [document.text for document in documents]
            except (OSError, ValueError, ImportError) as error:
                warnings.warn(
                    f"context tokens outside the activation set left out: {error}", stacklevel=6
                )
                self.texts = []
        return self.texts

    def _checked(self, table: Tensor, first: int) -> Tensor:
        """The table, or an empty one if it disagrees with the tokens the set holds."""
        local = self.activations.doc_index - first
        rows = (local >= 0) & (local < len(table)) & (self.activations.position < table.shape[1])
        known = table[local[rows], self.activations.position[rows]]
        held = self.activations.token_id[rows]
        if bool(((known < 0) | (known == held)).all()):
            return table
        warnings.warn(
            "re-tokenized documents disagree with the activation set's tokens (was the dataset "
            "or tokenizer changed?): context tokens outside the set left out",
            stacklevel=6,
        )
        return table[:, :0]
