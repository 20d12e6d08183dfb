"""Per-latent statistics of a trained SAE, for feature cards and the feature explorer.

``compute_feature_stats`` makes one pass over the activation set an SAE was trained on and
records, for every latent: how often it fires, its activation histogram, its top-activating
examples and samples from activation quantile groups (each with a few tokens of context and
the latent's activation on them), the tokens its decoder direction promotes and suppresses
through the model's unembedding, and its most co-activating and most decoder-similar latents.
``FeatureStats.save`` / ``load_feature_stats`` store them beside the checkpoint so that
reopening is instant; ``feature_stats_for_checkpoint`` does both.

How it is computed:

- One encoder pass over the rows in batches keeps the SAE's sparse code of every row (the k
  kept values and latent ids: n * k * 8 bytes, at most 2k / d_model of the activation set
  itself). Everything else reads those codes, never the encoder again: a first sweep gives
  density, mean, max and the top examples (a running top-n merge per latent across batches); a
  second sweep, which needs every latent's max, gives the histograms (``histogram_bins`` equal
  bins from 0 to the latent's max) and the quantile-group samples.
- Quantile group g of a latent holds its activations in [g/G, (g+1)/G) of its max (the last
  group includes the max). Each (latent, group) keeps the ``n_per_group`` entries with the
  smallest random keys, a hash of (row, latent, seed): a uniform sample without replacement
  that does not depend on how the rows are batched. Samples are shown largest first.
- Context windows come from the activation set where it holds the token (its token id, and
  the latent's activation from the codes); other tokens get their id from the re-tokenized
  source document (with an ``lm``) or -1, and a NaN activation.
- "Active" means a positive activation; mean activation is over the active vectors (0 for a
  latent that never fires). Logits are ``W_dec @ W_U^T`` (no final norm), in blocks of latents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelib.activations import ActivationSet, HarvestConfig, harvest, residuals_for_texts
from saelib.assets import sha256_of
from saelib.data import load_documents
from saelib.evals.feature_separation import coactivation_pairs
from saelib.saes import SAE, SAEOutput, load_sae
from saelib.saes.sparse_ops import dense_latents

STATS_FORMAT = 1  # bump when the meaning of stored statistics changes: old caches recompute
STATS_FOLDER = "feature_stats"  # inside a checkpoint folder
MAX_BLOCK_ELEMENTS = 1 << 24  # floats per block of the logit and cosine products


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
        """Write ``stats.safetensors`` + ``stats.json`` into ``folder``, replacing it atomically.

        Both files are written into a sibling staging folder that is then renamed, so a reader
        never sees the tensors of one computation with the JSON of another.
        """
        folder = Path(folder)
        staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(self._tensors(), str(staging / "stats.safetensors"))
        info = {
            "format": STATS_FORMAT,
            "config": asdict(self.config),
            "n_vectors": self.n_vectors,
            "vocab": {str(token): text for token, text in self.vocab.items()},
            "metadata": self.metadata,
        }
        (staging / "stats.json").write_text(json.dumps(info, indent=1, default=str))
        _replace_folder(staging, folder)
        return folder

    def _tensors(self) -> dict[str, Tensor]:
        return {
            item.name: value.detach().cpu().contiguous()
            for item in fields(self)
            if isinstance(value := getattr(self, item.name), Tensor)
        }


def load_feature_stats(folder: str | Path) -> FeatureStats:
    """Read what :meth:`FeatureStats.save` wrote."""
    folder = Path(folder)
    info = json.loads((folder / "stats.json").read_text())
    tensors = load_file(folder / "stats.safetensors")
    known = {item.name for item in fields(FeatureStatsConfig)}
    config = FeatureStatsConfig(**{key: v for key, v in info["config"].items() if key in known})
    tensor_fields = {item.name for item in fields(FeatureStats)} & tensors.keys()
    return FeatureStats(
        config=config,
        n_vectors=int(info["n_vectors"]),
        vocab={int(token): text for token, text in info["vocab"].items()},
        metadata=info["metadata"],
        **{name: tensors[name] for name in tensor_fields},
    )


def _replace_folder(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; readers see the old folder, none, or the new one."""
    old = target.with_name(f"{target.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging)  # another process put equivalent stats in place meanwhile
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- computing


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
    codes = _encode(sae, activations.acts, config.batch_size, progress)
    summary = _summarise(codes, config.n_top, config.batch_size)
    edges, counts, samples = _histograms_and_samples(codes, summary.maximum, config)
    tokenizer = getattr(lm, "tokenizer", None)
    windows = _Windows(activations, codes, tokenizer, config.context_left, config.context_right)
    top_tokens, top_token_acts = windows.for_examples(summary.top_rows)
    quantile_tokens, quantile_token_acts = windows.for_examples(samples.rows)
    logits = _logit_effects(sae.W_dec, _unembedding(lm), config.n_logits, progress)
    coactive = _coactive_neighbours(codes, config.n_neighbours, config.batch_size, progress)
    similar = _decoder_neighbours(sae.W_dec, config.n_neighbours)
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


# ------------------------------------------------------------------------- sparse codes


@dataclass
class _Codes:
    """The SAE's code of every row: its k kept (value, latent) pairs; value 0 = not active."""

    values: Tensor  # (n, k) float32
    latents: Tensor  # (n, k) int32
    d_sae: int

    def __len__(self) -> int:
        return len(self.values)

    def active(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """(row, latent, value) of the active entries of rows start..stop."""
        values = self.values[start:stop]
        mask = values > 0
        rows = torch.arange(start, start + len(values)).unsqueeze(1).expand_as(values)
        return rows[mask], self.latents[start:stop][mask].long(), values[mask]

    def lookup(self, rows: Tensor, latents: Tensor, chunk: int = 1 << 16) -> Tensor:
        """Activation of latents[i] on rows[i] (0 where it is not among the row's k)."""
        parts = [torch.zeros(0)]
        for start in range(0, len(rows), chunk):
            some_rows, wanted = rows[start : start + chunk], latents[start : start + chunk]
            hit = self.latents[some_rows] == wanted.unsqueeze(1)
            parts.append((self.values[some_rows] * hit).sum(1))
        return torch.cat(parts)


def _encode(sae: SAE, acts: Tensor, batch_size: int, progress: bool) -> _Codes:
    """The one encoder pass."""
    device = next(sae.parameters()).device
    values, latents = [], []
    bar = tqdm(total=len(acts), desc="feature stats: encode", unit="vec", disable=not progress)
    for start in range(0, len(acts), batch_size):
        output = sae(acts[start : start + batch_size].to(device).float())
        values.append(output.acts.detach().float().cpu())
        latents.append(output.indices.cpu().to(torch.int32))
        bar.update(len(values[-1]))
    bar.close()
    return _Codes(torch.cat(values), torch.cat(latents), sae.d_sae)


# --------------------------------------------------------------------- running top-n


def top_per_group(
    groups: Tensor, scores: Tensor, payload: Tensor, n_groups: int, n_keep: int
) -> tuple[Tensor, Tensor]:
    """The ``n_keep`` largest scores of each group, largest first, with their payloads.

    Returns (n_groups, n_keep) scores (float64, -inf = empty slot) and payloads (-1 = empty).
    Equal scores keep their input order.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order)) - starts[sorted_groups]
    keep = rank < n_keep
    kept_groups, kept_rank, kept = sorted_groups[keep], rank[keep], order[keep]
    top_scores = torch.full((n_groups, n_keep), -torch.inf, dtype=torch.float64)
    top_payload = torch.full((n_groups, n_keep), -1, dtype=torch.int64)
    top_scores[kept_groups, kept_rank] = scores[kept].double()
    top_payload[kept_groups, kept_rank] = payload[kept].long()
    return top_scores, top_payload


class _TopKeeper:
    """The ``n_keep`` largest (score, payload) of each group over batches, merged exactly."""

    def __init__(self, n_groups: int, n_keep: int):
        self.scores = torch.full((n_groups, n_keep), -torch.inf, dtype=torch.float64)
        self.payload = torch.full((n_groups, n_keep), -1, dtype=torch.int64)

    def add(self, groups: Tensor, scores: Tensor, payload: Tensor) -> None:
        n_groups, n_keep = self.scores.shape
        if n_keep == 0:
            return
        may_enter = scores.double() > self.scores[groups, -1]  # skip hopeless entries early
        batch = top_per_group(
            groups[may_enter], scores[may_enter], payload[may_enter], n_groups, n_keep
        )
        merged_scores = torch.cat([self.scores, batch[0]], dim=1)
        self.scores, where = merged_scores.topk(n_keep, dim=1)
        self.payload = torch.cat([self.payload, batch[1]], dim=1).gather(1, where)


# ------------------------------------------------------------------------------ sweeps


@dataclass
class _Summary:
    fired: Tensor  # (d_sae,) int64
    total: Tensor  # (d_sae,) float64 sum of active values
    maximum: Tensor  # (d_sae,) float32
    top_scores: Tensor  # (d_sae, n_top) float64, -inf = empty
    top_rows: Tensor  # (d_sae, n_top) int64, -1 = empty


def _summarise(codes: _Codes, n_top: int, batch_size: int) -> _Summary:
    d_sae = codes.d_sae
    fired = torch.zeros(d_sae, dtype=torch.int64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    maximum = torch.zeros(d_sae)
    top = _TopKeeper(d_sae, n_top)
    for start in range(0, len(codes), batch_size):
        rows, latents, values = codes.active(start, start + batch_size)
        fired += torch.bincount(latents, minlength=d_sae)
        total.index_add_(0, latents, values.double())
        maximum.scatter_reduce_(0, latents, values, reduce="amax")
        top.add(latents, values, rows)
    return _Summary(fired, total, maximum, top.scores, top.payload)


@dataclass
class _Samples:
    rows: Tensor  # (d_sae, groups * n_per_group) int64, -1 = empty slot
    values: Tensor  # (d_sae, groups * n_per_group) float32, 0 = empty slot
    group: Tensor  # (d_sae, groups * n_per_group) int64, -1 = empty slot


def _histograms_and_samples(
    codes: _Codes, maximum: Tensor, config: FeatureStatsConfig
) -> tuple[Tensor, Tensor, _Samples]:
    """The second sweep: it needs every latent's max for the bins and quantile groups."""
    d_sae, bins, n_groups = codes.d_sae, config.histogram_bins, config.n_quantile_groups
    edges = maximum.unsqueeze(1) * (torch.arange(bins + 1) / bins)
    group_edges = group_boundaries(maximum, n_groups)
    counts = torch.zeros(d_sae * bins, dtype=torch.int64)
    keeper = _TopKeeper(d_sae * n_groups, config.n_per_group)
    for start in range(0, len(codes), config.batch_size):
        rows, latents, values = codes.active(start, start + config.batch_size)
        column = (values.unsqueeze(1) >= edges[latents, 1:bins]).sum(1)  # numpy's binning
        counts += torch.bincount(latents * bins + column, minlength=d_sae * bins)
        group = (values.unsqueeze(1) >= group_edges[latents]).sum(1)
        keys = random_keys(rows, latents, d_sae, config.seed)
        keeper.add(latents * n_groups + group, -keys, rows)  # smallest keys: a uniform sample
    rows = keeper.payload.view(d_sae, n_groups, config.n_per_group)
    return edges, counts.view(d_sae, bins), _order_samples(codes, rows)


def group_boundaries(maximum: Tensor, n_groups: int) -> Tensor:
    """(d_sae, n_groups - 1) inner boundaries of the quantile groups: max * g / n_groups."""
    return maximum.unsqueeze(1) * (torch.arange(1, n_groups) / n_groups)


def _order_samples(codes: _Codes, rows: Tensor) -> _Samples:
    """Flatten (d_sae, groups, n) samples to slots, largest activation first in each group."""
    d_sae, n_groups, n_per_group = rows.shape
    latents = torch.arange(d_sae).view(d_sae, 1, 1).expand_as(rows)
    present = rows >= 0
    values = torch.zeros(rows.shape)
    values[present] = codes.lookup(rows[present], latents[present])
    order = values.masked_fill(~present, -1.0).argsort(dim=2, descending=True, stable=True)
    rows, values, present = rows.gather(2, order), values.gather(2, order), present.gather(2, order)
    group = torch.arange(n_groups).view(1, n_groups, 1).expand_as(rows).masked_fill(~present, -1)
    shape = (d_sae, n_groups * n_per_group)
    return _Samples(rows.reshape(shape), values.reshape(shape), group.reshape(shape))


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def random_keys(rows: Tensor, latents: Tensor, d_sae: int, seed: int) -> Tensor:
    """A uniform [0, 1) float64 key per (row, latent): splitmix64 of the pair and the seed.

    A key depends on its entry only, so keeping the smallest keys per group gives the same
    sample however the rows are batched. int64 products wrap, as the hash needs.
    """
    x = rows.long() * d_sae + latents.long() + _signed((seed + 1) * 0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).double() / float(1 << 53)


# ----------------------------------------------------------------------- context windows


class _Windows:
    """Token ids and latent activations around example rows, from the activation set.

    A window token the set does not hold (positions left out of the harvest, or beyond the
    harvested part of a document) gets its id from the source document re-tokenized the way
    :func:`saelib.activations.harvest` tokenized it (with a tokenizer; else -1) and a NaN
    activation. Positions before the document start or past its end are -1 / NaN.
    """

    def __init__(self, activations: ActivationSet, codes: _Codes, tokenizer, left: int, right: int):
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


# ---------------------------------------------------------------------- decoder geometry


def _unembedding(lm) -> Tensor | None:
    if lm is None:
        return None
    return lm.hf_model.get_output_embeddings().weight.detach()


def _logit_effects(
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


def _decoder_neighbours(W_dec: Tensor, n_neighbours: int) -> tuple[Tensor, Tensor]:
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


class _CodeReplay(nn.Module):
    """Stands in for the SAE in :func:`coactivation_pairs`, which encodes its input with
    ``sae(x)``: here x is a column of row numbers and the output their stored codes, so the
    pairs cost no second encoder pass."""

    def __init__(self, codes: _Codes, bar: tqdm):
        super().__init__()
        self.codes, self.d_sae, self.bar = codes, codes.d_sae, bar
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # tells the device

    def forward(self, row_numbers: Tensor) -> SAEOutput:
        rows = row_numbers[:, 0].long()
        self.bar.update(len(rows))
        values, latents = self.codes.values[rows], self.codes.latents[rows].long()
        return SAEOutput(torch.zeros(0), values, latents, self.d_sae)


def _coactive_neighbours(codes: _Codes, n_neighbours: int, batch_size: int, progress: bool):
    """For each latent j, the latents i with the largest n_ij = P(i fires | j fires).

    Ties go to the smaller latent id; slots beyond the latents that ever fire with j are -1
    (score NaN).
    """
    if len(codes) >= 1 << 24:  # float32 row numbers would no longer be exact
        raise ValueError("co-activation over more than 2**24 vectors is not supported")
    row_numbers = torch.arange(len(codes), dtype=torch.float32).unsqueeze(1)
    desc = "feature stats: co-activation"
    with tqdm(total=len(codes), desc=desc, unit="vec", disable=not progress) as bar:
        replay = _CodeReplay(codes, bar)
        i, j, n_ij, _ = coactivation_pairs(replay, row_numbers, batch_size=batch_size)
    scores, latents = top_per_group(j.cpu(), n_ij.cpu(), i.cpu(), codes.d_sae, n_neighbours)
    return latents, scores.float().masked_fill(latents < 0, torch.nan)


# ------------------------------------------------------------------------- token texts


def token_texts(tokenizer, token_sets) -> dict[int, str]:
    """Every token id >= 0 in the tensors ``token_sets``, mapped to readable text.

    Single-token ``decode`` turns byte-level markers into spaces/newlines; a token holding part
    of a multi-byte character decodes to U+FFFD, so it is shown as its bytes (``\\xe2``) instead.
    A SentencePiece word-start marker (``▁``) becomes a leading space.
    """
    ids = torch.cat([tokens.reshape(-1) for tokens in token_sets]).unique()
    ids = ids[ids >= 0].tolist()
    return {token: _token_text(tokenizer, token) for token in ids}


def _token_text(tokenizer, token: int) -> str:
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


# ----------------------------------------------------------------------- checkpoints


def default_harvest_config(metadata: dict) -> HarvestConfig:
    """The activations for an SAE's checkpoint: its metadata model/layer/dataset, and
    :class:`HarvestConfig` defaults for the rest (positions "all", max_tokens, context_length,
    skip_first_token), since checkpoints do not store the training harvest in full."""
    missing = [key for key in ("model", "layer", "dataset") if key not in metadata]
    if missing:
        raise ValueError(f"SAE metadata lacks {missing}: pass the activations explicitly")
    return HarvestConfig(
        model=metadata["model"], layer=int(metadata["layer"]), dataset=metadata["dataset"]
    )


def feature_stats_for_checkpoint(
    checkpoint_folder: str | Path,
    activations: ActivationSet | None = None,
    lm=None,
    config: FeatureStatsConfig = FeatureStatsConfig(),  # noqa: B008 (frozen: safe default)
    progress: bool = True,
    device: str = "cpu",
) -> FeatureStats:
    """Stats of the SAE in ``checkpoint_folder``, cached in ``<checkpoint>/feature_stats/``.

    The cache is used when it was made with the same ``config``, the same SAE weights (sha256 of
    sae.safetensors), the same activation cache key and, when ``activations`` are passed, the
    same rows. Otherwise the stats are computed and saved. Without ``activations`` they are
    harvested with :func:`default_harvest_config` (only if the cache misses); without ``lm``
    the activations' model is loaded (:func:`saelib.lm.load_lm`, cached per process). The SAE
    is loaded on ``device`` for the encoder pass.
    """
    folder = Path(checkpoint_folder)
    sae = load_sae(folder, device=device)
    harvest_config = activations.config if activations is not None else None
    harvest_config = harvest_config or default_harvest_config(sae.metadata)
    expected = {
        "stats_format": STATS_FORMAT,
        "sae_sha256": sha256_of(folder / "sae.safetensors"),
        "activation_cache_key": harvest_config.cache_key(),
    }
    if activations is not None:
        expected["activation_rows"] = rows_digest(activations)
    cached = _cached_stats(folder / STATS_FOLDER, config, expected)
    if cached is not None:
        return cached
    if activations is None:
        activations = harvest(harvest_config, progress=progress)
    if lm is None:
        from saelib.lm import load_lm

        lm = load_lm(harvest_config.model)
    stats = compute_feature_stats(sae, activations, lm, config, progress)
    stats.metadata.update(expected, checkpoint=str(folder))
    stats.save(folder / STATS_FOLDER)
    return stats


def _cached_stats(folder: Path, config: FeatureStatsConfig, expected: dict):
    if not (folder / "stats.json").exists():
        return None
    try:
        stats = load_feature_stats(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"unreadable feature stats in {folder}, recomputing: {error}", stacklevel=3)
        return None
    matches = stats.config == config and all(
        stats.metadata.get(key) == value for key, value in expected.items()
    )
    return stats if matches else None


# ------------------------------------------------------------------------ search by text


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
    output = sae(columns["acts"].to(device))
    acts = dense_latents(output.acts.detach(), output.indices, sae.d_sae).cpu()
    tokens = [_token_text(lm.tokenizer, int(token)) for token in columns["token_id"]]
    return tokens, acts
