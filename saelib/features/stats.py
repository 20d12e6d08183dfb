"""Per-latent statistics of a trained SAE, for feature cards and the feature explorer.

``compute_feature_stats`` makes one pass over the activation set an SAE was trained on and
records, for every latent: how often it fires, its activation histogram, its top-activating
examples and samples from activation quantile groups (each with a few tokens of context and
the latent's activation on them), the tokens its decoder direction promotes and suppresses
through the model's unembedding, and its most co-activating and most decoder-similar latents.
:func:`saelib.features.store.feature_stats_for_checkpoint` caches them beside the checkpoint,
so that reopening is instant.

How it is computed, one module per step:

- ``codes``: one encoder pass keeps the active entries of every row's code (for a TopK SAE
  n * k entries of 12 bytes); everything else reads those codes, never the encoder again.
- ``sweeps``: density, mean, max and the top examples; then, knowing every latent's max, the
  histograms and the quantile-group samples (a uniform sample that does not depend on
  batching). Samples are shown largest first.
- ``windows``: the context of each example, from the activation set where it holds the token,
  else from the re-tokenized source document (with an ``lm``).
- ``decoder`` and ``coactivation``: promoted/suppressed tokens and the two kinds of neighbours.
- ``tokens``: the readable text of every token id used.

"Active" means a non-zero (positive) activation; codes must be non-negative, as TopK, ReLU,
JumpReLU and binary codes are. Mean activation is over the active vectors (0 for a latent that
never fires).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saelib.activations import ActivationSet
from saelib.features.coactivation import coactive_neighbours
from saelib.features.codes import encode_rows
from saelib.features.decoder import decoder_neighbours, logit_effects, output_embedding
from saelib.features.sweeps import histograms_and_samples, summarise
from saelib.features.tokens import token_texts
from saelib.features.windows import ContextWindows
from saelib.saes import SAE

STATS_FORMAT = 1  # bump when the meaning of stored statistics changes: old caches recompute


@dataclass(frozen=True)
class FeatureStatsConfig:
    n_top: int = 12  # top-activating examples per latent
    n_quantile_groups: int = 4  # groups by activation as a fraction of the latent's max
    n_per_group: int = 3  # examples sampled per group
    context_left: int = 8  # tokens of context before the example token
    context_right: int = 3  # and after it
    n_logits: int = 10  # promoted and suppressed tokens
    n_neighbours: int = 8  # co-activating and decoder-similar latents
    histogram_bins: int = 24
    batch_size: int = 4096
    seed: int = 0

    def validate(self) -> None:
        at_least_one = ("n_quantile_groups", "histogram_bins", "batch_size")
        for name, value in asdict(self).items():
            lowest = 1 if name in at_least_one else 0
            if name != "seed" and value < lowest:
                raise ValueError(f"FeatureStatsConfig.{name} must be >= {lowest}, got {value}")


@dataclass
class FeatureStats:
    """Everything a feature card shows, for all latents of one SAE (index = latent id).

    Tensors have the latent dimension first. Examples are stored as windows of token ids with
    the latent's activation on each token (NaN where the token's activation is unknown, e.g.
    context outside the harvested positions); ``vocab`` maps every token id used to its text.
    """

    config: FeatureStatsConfig
    n_vectors: int
    density: Tensor  # (d_sae,) fraction of vectors where the latent fires
    mean_activation: Tensor  # (d_sae,) over the vectors where it fires
    max_activation: Tensor  # (d_sae,)
    histogram_edges: Tensor  # (d_sae, bins + 1) per latent, from 0 to its max
    histogram_counts: Tensor  # (d_sae, bins)
    top_tokens: Tensor  # (d_sae, n_top, window) token ids, -1 = padding
    top_token_acts: Tensor  # (d_sae, n_top, window)
    top_values: Tensor  # (d_sae, n_top) activation at the example token; 0 = no example
    quantile_tokens: Tensor  # (d_sae, groups * n_per_group, window)
    quantile_token_acts: Tensor  # (d_sae, groups * n_per_group, window)
    quantile_group: Tensor  # (d_sae, groups * n_per_group) group index, -1 = empty slot
    promoted_tokens: Tensor  # (d_sae, n_logits) token ids, largest W_dec @ W_U first
    promoted_logits: Tensor  # (d_sae, n_logits)
    suppressed_tokens: Tensor  # (d_sae, n_logits) most negative first
    suppressed_logits: Tensor  # (d_sae, n_logits)
    coactive_latents: Tensor  # (d_sae, n_neighbours) by n_ij = P(i fires | j fires), -1 = none
    coactive_scores: Tensor  # (d_sae, n_neighbours)
    similar_latents: Tensor  # (d_sae, n_neighbours) by |cos| of decoder directions
    similar_scores: Tensor  # (d_sae, n_neighbours) signed cosine
    vocab: dict[int, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # SAE name/path, model, layer, dataset...
    # added by compute_feature_stats (None in hand-made stats): where each example comes from
    top_rows: Tensor | None = None  # (d_sae, n_top) row in the activation set, -1 = none
    quantile_rows: Tensor | None = None  # (d_sae, groups * n_per_group), -1 = empty slot
    quantile_values: Tensor | None = None  # (d_sae, groups * n_per_group), 0 = empty slot

    @property
    def d_sae(self) -> int:
        return len(self.density)

    @property
    def window(self) -> int:
        return self.config.context_left + 1 + self.config.context_right

    def save(self, folder: str | Path) -> Path:
        """Write the stats into ``folder``: :func:`saelib.features.store.save_feature_stats`."""
        from saelib.features.store import save_feature_stats  # store builds on this module

        return save_feature_stats(self, folder)


@torch.no_grad()
def compute_feature_stats(
    sae: SAE,
    activations: ActivationSet,
    lm=None,
    config: FeatureStatsConfig = FeatureStatsConfig(),  # noqa: B008 (frozen: safe default)
    progress: bool = True,
) -> FeatureStats:
    """Statistics of every latent of ``sae`` on ``activations`` (see the module docstring).

    ``lm`` (a :class:`saelib.lm.LoadedLM`, or anything with ``tokenizer`` and ``hf_model``)
    enables the token texts, the context tokens outside the activation set and the
    promoted/suppressed tokens; without it those are -1 (NaN logits) and ``vocab`` is empty.
    """
    started = time.perf_counter()
    config.validate()
    _check_inputs(sae, activations)
    codes = encode_rows(sae, activations.acts, config.batch_size, progress)
    summary = summarise(codes, config.n_top, config.batch_size)
    edges, counts, samples = histograms_and_samples(codes, summary.maximum, config)
    tokenizer = getattr(lm, "tokenizer", None)
    windows = ContextWindows(
        activations, codes, tokenizer, config.context_left, config.context_right
    )
    top_tokens, top_token_acts = windows.for_examples(summary.top_rows)
    quantile_tokens, quantile_token_acts = windows.for_examples(samples.rows)
    logits = logit_effects(sae.W_dec, output_embedding(lm), config.n_logits, progress)
    coactive = coactive_neighbours(codes, config.n_neighbours, config.batch_size, progress)
    similar = decoder_neighbours(sae.W_dec, config.n_neighbours)
    token_sets = (top_tokens, quantile_tokens, logits[0], logits[2])
    fired = summary.fired.clamp_min(1)
    return FeatureStats(
        config=config,
        n_vectors=len(activations),
        density=(summary.fired.double() / len(activations)).float(),
        mean_activation=(summary.total / fired).float(),
        max_activation=summary.maximum,
        histogram_edges=edges,
        histogram_counts=counts,
        top_tokens=top_tokens,
        top_token_acts=top_token_acts,
        top_values=summary.top_scores.float().clamp_min(0.0),  # -inf (no example) -> 0
        quantile_tokens=quantile_tokens,
        quantile_token_acts=quantile_token_acts,
        quantile_group=samples.group,
        promoted_tokens=logits[0],
        promoted_logits=logits[1],
        suppressed_tokens=logits[2],
        suppressed_logits=logits[3],
        coactive_latents=coactive[0],
        coactive_scores=coactive[1],
        similar_latents=similar[0],
        similar_scores=similar[1],
        vocab=token_texts(tokenizer, token_sets) if tokenizer is not None else {},
        metadata=_metadata(sae, activations, lm, time.perf_counter() - started),
        top_rows=summary.top_rows,
        quantile_rows=samples.rows,
        quantile_values=samples.values,
    )


def _check_inputs(sae: SAE, activations: ActivationSet) -> None:
    if len(activations) == 0:
        raise ValueError("feature statistics need at least one activation vector")
    if activations.d_model != sae.d_in:
        raise ValueError(f"activations have d={activations.d_model}, the SAE reads d={sae.d_in}")
    harvested = activations.config
    for key in ("model", "layer", "dataset"):
        expected = sae.metadata.get(key)
        if expected is not None and expected != getattr(harvested, key):
            warnings.warn(
                f"the SAE was trained on {key}={expected!r}, the activations come from "
                f"{key}={getattr(harvested, key)!r}",
                stacklevel=3,
            )


def _metadata(sae: SAE, activations: ActivationSet, lm, seconds: float) -> dict:
    return {
        **sae.metadata,
        "architecture": getattr(sae, "architecture", type(sae).__name__),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": getattr(sae, "k", None),
        "n_vectors": len(activations),
        "activation_cache_key": activations.config.cache_key(),
        "activation_config": asdict(activations.config),
        "activation_rows": rows_digest(activations),
        "activation_path": str(activations.path) if activations.path else None,
        "lm": getattr(lm, "name", None),
        "stats_format": STATS_FORMAT,
        "seconds": round(seconds, 3),
    }


def rows_digest(activations: ActivationSet) -> str:
    """Hash of which (document, position) rows a set holds: tells a subset from the whole."""
    digest = hashlib.sha256()
    for column in (activations.doc_index, activations.position):
        digest.update(column.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]
