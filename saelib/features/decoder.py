"""What each latent's decoder direction says on its own: the tokens it promotes and suppresses
through the model's unembedding, and the latents whose directions are most alike.

Both are products with every latent's direction, computed in blocks of latents so that no block
holds more than ``MAX_BLOCK_ELEMENTS`` floats. Logits are ``W_dec @ W_U^T`` (no final norm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

MAX_BLOCK_ELEMENTS = 1 << 24  # floats per block of the logit and cosine products


def output_embedding(lm) -> Tensor | None:
    """The model's output embedding (vocab, d_model), or None without a model."""
    if lm is None:
        return None
    return lm.hf_model.get_output_embeddings().weight.detach()


def logit_effects(
    W_dec: Tensor, unembedding: Tensor | None, n_logits: int, progress: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted ids, logits, suppressed ids, logits) of W_dec @ W_U^T, in blocks of latents."""
    d_sae = W_dec.shape[0]
    promoted = torch.full((d_sae, n_logits), -1, dtype=torch.int64)
    suppressed = promoted.clone()
    promoted_logits = torch.full((d_sae, n_logits), torch.nan)
    suppressed_logits = promoted_logits.clone()
    if unembedding is None:
        return promoted, promoted_logits, suppressed, suppressed_logits
    directions = W_dec.detach().float()
    unembedding = unembedding.to(directions.device, torch.float32)
    keep = min(n_logits, len(unembedding))
    rows = max(1, MAX_BLOCK_ELEMENTS // len(unembedding))
    starts = range(0, d_sae, rows)
    for start in tqdm(starts, desc="feature stats: logits", disable=not progress):
        logits = directions[start : start + rows] @ unembedding.T
        top, bottom = logits.topk(keep, dim=1), logits.topk(keep, dim=1, largest=False)
        block = slice(start, start + rows)
        promoted[block, :keep], promoted_logits[block, :keep] = top.indices.cpu(), top.values.cpu()
        suppressed[block, :keep] = bottom.indices.cpu()
        suppressed_logits[block, :keep] = bottom.values.cpu()
    return promoted, promoted_logits, suppressed, suppressed_logits


def decoder_neighbours(W_dec: Tensor, n_neighbours: int) -> tuple[Tensor, Tensor]:
    """For each latent, the others with the largest |cos| of decoder directions (signed cos)."""
    directions = nn.functional.normalize(W_dec.detach().float(), dim=1)
    d_sae = len(directions)
    latents = torch.full((d_sae, n_neighbours), -1, dtype=torch.int64)
    scores = torch.full((d_sae, n_neighbours), torch.nan)
    keep = min(n_neighbours, d_sae - 1)
    rows = max(1, MAX_BLOCK_ELEMENTS // d_sae)
    for start in range(0, d_sae, rows):
        cos = directions[start : start + rows] @ directions.T
        magnitude = cos.abs()
        own = torch.arange(len(cos), device=cos.device)
        magnitude[own, own + start] = -1.0  # never its own neighbour
        chosen = magnitude.topk(keep, dim=1).indices
        latents[start : start + len(cos), :keep] = chosen.cpu()
        scores[start : start + len(cos), :keep] = cos.gather(1, chosen).cpu()
    return latents, scores
