"""Core evaluation: reconstruction, sparsity and model-behaviour metrics of an SAE.

Definitions follow SAEBench's core eval and SAELens:

- The SAE's reconstruction is spliced into the residual stream at its layer: it replaces the
  decoder block's output at every real (non-pad) token. "Ablation" replaces it with zeros there.
- KL: KL(clean next-token distribution || patched distribution), averaged over real positions.
  KL score = (KL_ablation - KL_sae) / KL_ablation.
- CE: mean next-token cross-entropy over positions whose next token is real.
  CE score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean).
  Both scores are 1 for a perfect reconstruction and 0 for one as bad as zeros.
- Reconstruction metrics (explained variance in SAELens's form and, named as such, the centred
  form; MSE, cosine, L0) come from
  :func:`saelib.evals.metrics.evaluate` on the residuals at the same tokens; l1 is the mean sum of
  latent activations per token and shrinkage the mean of ||x_hat|| / ||x|| (SAEBench's
  ``l2_ratio``). A latent is dead when it never fires on the evaluated tokens.

The patched forward pass skips the decoder blocks up to the SAE's layer (their output is
replaced anyway), so the SAE and ablation passes cost only the blocks above it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from saelib.activations import check_layer
from saelib.data import load_documents
from saelib.evals.metrics import ReconstructionMetrics, evaluate
from saelib.io import write_json
from saelib.saes import SAE, SAEOutput


@dataclass(frozen=True)
class CoreEvalConfig:
    dataset: str = "wiki"  # any source load_documents accepts
    n_texts: int = 64
    # index of the first document; None takes the last n_texts, which harvests (reading the
    # dataset from its start) reach last, so the eval texts are normally held out from training
    first_text: int | None = None
    context_length: int = 128  # texts are truncated to this many tokens
    batch_size: int = 8  # texts per forward pass
    histogram_bins: int = 50
    # the first token is an attention sink (in SmolLM2 its residual norm is ~100x the others'):
    # leave it unpatched and out of the reconstruction metrics, as SAEBench does with BOS
    skip_first_token: bool = True
    progress: bool = True


@dataclass
class DensityHistogram:
    """Histogram of log10(firing frequency) over the latents that fired at least once.

    The edges span [log10(1 / n_tokens), 0], the smallest and largest possible frequencies of a
    live latent; dead latents (frequency 0, log undefined) are counted in ``n_dead`` instead.
    """

    bin_edges: list[float]
    counts: list[int]
    n_dead: int


@dataclass
class CoreEvalOutput:
    explained_variance: float  # SAELens's form (see saelib.evals.metrics)
    explained_variance_centred: float  # dictionary_learning's form
    mse: float
    cosine_similarity: float
    l0: float
    l1: float
    shrinkage: float
    alive_fraction: float
    dead_fraction: float
    kl_div_score: float
    ce_loss_score: float
    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    kl_div_with_sae: float
    kl_div_with_ablation: float
    n_tokens: int  # tokens where the SAE was spliced in (real tokens, maybe not the first)
    n_kl_tokens: int  # real tokens: where KL was averaged
    n_ce_tokens: int  # positions whose next token is real: where CE was averaged
    layer: int
    density: DensityHistogram
    config: dict = field(default_factory=dict)
    sae_metadata: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self)

    @classmethod
    def load(cls, path: str | Path) -> CoreEvalOutput:
        data = json.loads(Path(path).read_text())
        data["density"] = DensityHistogram(**data["density"])
        return cls(**data)


def run_core_eval(
    sae: SAE, lm, layer: int | None = None, config: CoreEvalConfig | None = None
) -> CoreEvalOutput:
    """Evaluate ``sae`` spliced into ``lm`` (a :class:`saelib.lm.LoadedLM`) after ``layer``.

    ``layer`` defaults to ``sae.metadata["layer"]``. Any SAE whose forward returns an
    :class:`~saelib.saes.SAEOutput` works; it must sit on the language model's device.
    """
    layer = _resolve_layer(sae, lm, layer)
    return run_core_eval_many({"sae": sae}, lm, layer, config)["sae"]


def run_core_eval_many(
    saes: dict[str, SAE], lm, layer: int, config: CoreEvalConfig | None = None
) -> dict[str, CoreEvalOutput]:
    """:func:`run_core_eval` for several SAEs of one layer, sharing the clean and ablated passes."""
    config = config or CoreEvalConfig()
    for sae in saes.values():
        _resolve_layer(sae, lm, layer)
    totals = {name: _Totals(sae.d_sae) for name, sae in saes.items()}
    batches = list(_batches(lm, _texts(config), config))
    for input_ids, mask in tqdm(
        batches, desc=f"core eval layer {layer}", disable=not config.progress
    ):
        _eval_batch(saes, lm, layer, input_ids, mask, totals, config.skip_first_token)
    return {
        name: totals[name].output(
            evaluate(sae, torch.cat(totals[name].inputs)), layer, config, sae.metadata
        )
        for name, sae in saes.items()
    }


def _resolve_layer(sae: SAE, lm, layer: int | None) -> int:
    if layer is None:
        layer = sae.metadata.get("layer")
        if layer is None:
            raise ValueError("pass layer=...: the SAE's metadata does not say which layer it reads")
    check_layer(layer, lm.n_layers, lm.name)
    if sae.d_in != lm.d_model:
        raise ValueError(f"the SAE reads {sae.d_in} dims but {lm.name} has d_model {lm.d_model}")
    trained_on = sae.metadata.get("model")
    if trained_on is not None and trained_on != lm.name:
        message = f"the SAE was trained on {trained_on!r}, evaluating on {lm.name!r}"
        warnings.warn(message, stacklevel=3)
    return int(layer)


def _texts(config: CoreEvalConfig) -> list[str]:
    documents = load_documents(config.dataset)
    first = config.first_text
    if first is None:
        first = max(0, len(documents) - config.n_texts)
    texts = [doc.text for doc in documents[first : first + config.n_texts]]
    if not texts:
        raise ValueError(f"no texts from index {first} of {config.dataset!r}")
    return texts


def _batches(lm, texts: list[str], config: CoreEvalConfig) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids, attention_mask) right-padded batches of texts of similar length.

    Sorting by length first keeps the padding, which is computed but unused, small.
    """
    tokenizer = lm.tokenizer
    tokenize = dict(truncation=True, max_length=config.context_length)
    lengths = [len(ids) for ids in tokenizer(texts, **tokenize)["input_ids"]]
    ordered = [texts[i] for i in np.argsort(lengths, kind="stable")]
    device = next(lm.hf_model.parameters()).device
    for start in range(0, len(ordered), config.batch_size):
        chunk = ordered[start : start + config.batch_size]
        encoded = tokenizer(
            chunk, return_tensors="pt", padding=True, padding_side="right", **tokenize
        )
        yield encoded["input_ids"].to(device), encoded["attention_mask"].to(device).bool()


@torch.no_grad()
def _eval_batch(
    saes: dict[str, SAE],
    lm,
    layer: int,
    input_ids: Tensor,
    mask: Tensor,
    totals: dict,
    skip_first_token: bool,
) -> None:
    block_output, clean_logits = _clean_pass(lm, layer, input_ids, mask)
    hidden = block_output[0] if isinstance(block_output, tuple) else block_output
    spliced = mask.clone()
    if skip_first_token:
        spliced[:, 0] = False
    x = hidden[spliced].float()
    zeros = torch.zeros_like(x)
    ablated_logits = _spliced_logits(lm, layer, input_ids, mask, spliced, block_output, zeros)
    for name, sae in saes.items():
        output = sae(x)
        recon = output.recon.float()
        totals[name].add_latents(x, output)
        sae_logits = _spliced_logits(lm, layer, input_ids, mask, spliced, block_output, recon)
        totals[name].add_logits(clean_logits, sae_logits, ablated_logits, input_ids, mask)


def _spliced_logits(lm, layer, input_ids, mask, spliced, block_output, values: Tensor) -> Tensor:
    """Logits with the residual after ``layer`` replaced by ``values`` where ``spliced``."""
    hidden = block_output[0] if isinstance(block_output, tuple) else block_output
    residual = hidden.clone()
    residual[spliced] = values.to(hidden.dtype)
    # blocks that return tuples (older transformers) are replaced by a tuple too; the next
    # block reads only its first element
    replacement = (residual,) if isinstance(block_output, tuple) else residual
    return _patched_pass(lm, layer, input_ids, mask, replacement)


def _clean_pass(lm, layer: int, input_ids: Tensor, mask: Tensor) -> tuple[Any, Tensor]:
    """The output of block ``layer`` (a tensor, or a tuple starting with one) and the logits."""
    with lm.model.trace(input_ids=input_ids, attention_mask=mask.long()):
        block_output = lm.layers[layer].output.save()
        logits = lm.model.output.logits.save()
    return block_output, logits


def _patched_pass(lm, layer: int, input_ids: Tensor, mask: Tensor, replacement: Any) -> Tensor:
    """Logits with the output of block ``layer`` replaced by ``replacement``.

    Blocks 0..layer are skipped (not run): block ``layer`` returns ``replacement`` and those
    below it return it too, since nothing but the next block reads their output.
    """
    with lm.model.trace(input_ids=input_ids, attention_mask=mask.long()):
        for index in range(layer + 1):
            lm.layers[index].skip(replacement)
        logits = lm.model.output.logits.save()
    return logits


class _Totals:
    """Token-weighted running sums over all batches."""

    def __init__(self, d_sae: int):
        self.inputs: list[Tensor] = []
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.l1_sum = self.shrinkage_sum = 0.0
        self.kl = {"sae": 0.0, "ablation": 0.0}
        self.ce = {"clean": 0.0, "sae": 0.0, "ablation": 0.0}
        self.n_tokens = self.n_kl_tokens = self.n_ce_tokens = 0

    def add_latents(self, x: Tensor, output: SAEOutput) -> None:
        """The latent statistics of one batch, from the code's non-zero entries."""
        recon = output.recon.float()
        self.inputs.append(x.cpu())
        self.l1_sum += float(output.acts.float().abs().sum())  # inactive slots hold zeros
        self.shrinkage_sum += float((recon.norm(dim=1) / x.norm(dim=1)).sum())
        latents = output.active()[1].cpu()
        self.fire_counts += torch.bincount(latents, minlength=len(self.fire_counts))
        self.n_tokens += len(x)

    def add_logits(
        self, clean: Tensor, with_sae: Tensor, ablated: Tensor, input_ids: Tensor, mask: Tensor
    ) -> None:
        # the next token of position t, and whether it is real (right padding: then t is too)
        targets = input_ids.roll(-1, dims=1)[mask]
        has_target = F.pad(mask[:, 1:], (0, 1), value=False)[mask]
        log_probs = {
            name: logits[mask].float().log_softmax(-1)
            for name, logits in (("clean", clean), ("sae", with_sae), ("ablation", ablated))
        }
        for name, values in log_probs.items():
            target_log_probs = values.gather(1, targets[:, None]).squeeze(1)[has_target]
            self.ce[name] -= float(target_log_probs.double().sum())
        clean_probs = log_probs["clean"].exp()  # once for both KLs: faster than F.kl_div twice
        for name in ("sae", "ablation"):
            kl = torch.linalg.vecdot(clean_probs, log_probs["clean"] - log_probs[name])
            self.kl[name] += float(kl.double().sum())
        self.n_ce_tokens += int(has_target.sum())
        self.n_kl_tokens += int(mask.sum())

    def output(
        self,
        reconstruction: ReconstructionMetrics,
        layer: int,
        config: CoreEvalConfig,
        metadata: dict,
    ) -> CoreEvalOutput:
        kl = {name: value / self.n_kl_tokens for name, value in self.kl.items()}
        ce = {name: value / max(self.n_ce_tokens, 1) for name, value in self.ce.items()}
        dead = int((self.fire_counts == 0).sum())
        return CoreEvalOutput(
            explained_variance=reconstruction.explained_variance,
            explained_variance_centred=reconstruction.explained_variance_centred,
            mse=reconstruction.mse,
            cosine_similarity=reconstruction.cosine_similarity,
            l0=reconstruction.l0,
            l1=self.l1_sum / self.n_tokens,
            shrinkage=self.shrinkage_sum / self.n_tokens,
            alive_fraction=1.0 - dead / len(self.fire_counts),
            dead_fraction=dead / len(self.fire_counts),
            kl_div_score=_score(kl["ablation"] - kl["sae"], kl["ablation"]),
            ce_loss_score=_score(ce["ablation"] - ce["sae"], ce["ablation"] - ce["clean"]),
            ce_loss_clean=ce["clean"],
            ce_loss_with_sae=ce["sae"],
            ce_loss_with_ablation=ce["ablation"],
            kl_div_with_sae=kl["sae"],
            kl_div_with_ablation=kl["ablation"],
            n_tokens=self.n_tokens,
            n_kl_tokens=self.n_kl_tokens,
            n_ce_tokens=self.n_ce_tokens,
            layer=layer,
            density=density_histogram(self.fire_counts, self.n_tokens, config.histogram_bins),
            config=asdict(config),
            sae_metadata=dict(metadata),
        )


def _score(gained: float, possible: float) -> float:
    return gained / possible if possible != 0 else float("nan")


def density_histogram(fire_counts: Tensor, n_tokens: int, bins: int) -> DensityHistogram:
    """Histogram of log10(count / n_tokens) of the live latents; see :class:`DensityHistogram`."""
    counts = np.asarray(fire_counts.cpu(), dtype=np.float64)
    alive = counts[counts > 0]
    lowest = float(np.log10(1.0 / n_tokens))
    histogram, edges = np.histogram(np.log10(alive / n_tokens), bins=bins, range=(lowest, 0.0))
    return DensityHistogram(
        bin_edges=edges.tolist(), counts=histogram.tolist(), n_dead=int((counts == 0).sum())
    )
