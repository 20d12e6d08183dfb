"""Running an SAE on any text: which latents fire on each of its tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from saelib.activations import residuals_for_texts
from saelib.features.tokens import token_text
from saelib.saes import SAE


@torch.no_grad()
def latent_activations_for_text(
    sae: SAE, lm, text: str, layer: int | None = None, context_length: int = 256
) -> tuple[list[str], Tensor]:
    """Tokens of ``text`` and the SAE's latents on each: (token texts, (n_tokens, d_sae)).

    The activations are dense (zeros where a latent is not active). Every token is included,
    also the first, which harvests leave out (an attention sink): its latents are unreliable.
    ``layer`` defaults to the SAE's metadata layer.
    """
    layer = int(sae.metadata["layer"]) if layer is None else layer
    columns = residuals_for_texts(
        lm, [text], layer, positions="all", context_length=context_length, skip_first_token=False
    )
    device = next(sae.parameters()).device
    acts = sae(columns["acts"].to(device)).dense().detach().cpu()
    tokens = [token_text(lm.tokenizer, int(token)) for token in columns["token_id"]]
    return tokens, acts
