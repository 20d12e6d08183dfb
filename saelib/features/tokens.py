"""Readable token texts: what a feature card prints for a token id.

Single-token ``decode`` turns byte-level markers into spaces and newlines, but a token holding
part of a multi-byte character decodes to U+FFFD; such a token is shown as its bytes
(``\\xe2``) instead. A SentencePiece word-start marker (``▁``) becomes a leading space.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def token_texts(tokenizer, token_sets: Iterable[Tensor]) -> dict[int, str]:
    """Every token id >= 0 in the tensors ``token_sets``, mapped to its readable text."""
    ids = torch.cat([tokens.reshape(-1) for tokens in token_sets]).unique()
    ids = ids[ids >= 0].tolist()
    return {token: token_text(tokenizer, token) for token in ids}


def token_text(tokenizer, token: int) -> str:
    """One token's readable text."""
    text = tokenizer.decode([token])
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(token) if convert is not None else None
    if not isinstance(piece, str):
        return text
    if "\ufffd" in text and all(char in _BYTE_DECODER for char in piece):
        text = bytes(_BYTE_DECODER[char] for char in piece).decode("utf-8", "backslashreplace")
    if piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    return text


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level BPE alphabet (printable stand-ins for the 256 bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [byte for byte in range(256) if byte not in printable]
    table = {chr(byte): byte for byte in printable}
    table.update({chr(256 + index): byte for index, byte in enumerate(others)})
    return table


_BYTE_DECODER = _byte_decoder()
