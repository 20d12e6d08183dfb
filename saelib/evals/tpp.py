"""Targeted probe perturbation (TPP), following SAEBench: do an SAE's latents for one class
carry that class, and only that class?

If an SAE has isolated a concept, removing the few latents most tied to it should erase it for
a probe reading the model's activations, and leave every other concept readable. SAEBench's TPP
measures exactly that; here it stands in for the SCR figures of the frequency-ordering study.

Definitions:

- Data: as :mod:`saelib.evals.sparse_probing` (same texts, split, pooling and first-token rule:
  :func:`~saelib.evals.sparse_probing.prepare_probing_data`), so one language-model pass serves
  every SAE at a layer and both evals.
- Probes: for each class c a one-vs-rest logistic regression (sklearn, L2, ``C``, ``max_iter``)
  on the pooled residual of c's balanced binary train set (positives = c's texts, as many
  negatives drawn evenly from the other classes, as SAEBench builds them). Its clean accuracy is
  on c's balanced binary test set.
- Latents of class t: the ``n`` latents with the largest (signed) mean pooled activation on t's
  binary train positives minus the mean on its negatives (SAEBench ranks TPP latents the same
  way; a latent that fires less on t is not "tied to t", and removing it would hit the others).
- Ablation: the chosen latents are zeroed in the code of every token, the code is decoded, and
  the SAE's error is kept, as SAEBench does: ablated = x - decode(f) + decode(f with the latents
  zeroed). The probes read the residual rather than the reconstruction, so (i) the clean
  accuracy is the model's own, not lowered by a lossy SAE, (ii) the only change the probes see
  is the ablated latents' decoded contribution, and (iii) an SAE whose output has a dense path
  around its code (``skip="output"``) gets no credit for it. ``probe_input="reconstruction"``
  instead trains and tests the probes on the code path's reconstruction decode(f) and ablates
  within it (what a reader of the reconstruction alone would see).
- Decoding: through ``sae.code_path`` when the SAE has one (the reconstruction through the code
  alone), else ``codes @ W_dec + b_dec``. Both are affine in the code, so the mean over a text's
  tokens of the decoded codes equals the decode of the mean code: the ablation is applied to the
  pooled latents (one decode per class and n, not per token).
- Scores, for class t and n: the targeted drop = clean - ablated accuracy of t's probe when t's
  latents are ablated; the off-target drop = the mean of the same over every other class's probe
  (still ablating t's latents); score = targeted - off-target. Reported per class and as means
  over classes (SAEBench's ``tpp_threshold_{n}_intended_diff_only``, ``..._unintended_diff_only``
  and ``..._total_metric``). Zero ablated latents give zero drops exactly.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm.auto import tqdm

from saelib.evals.sparse_probing import (
    Example,
    ProbingData,
    SparseProbingConfig,
    balanced_split,
    choose_classes,
    mean_pool,
    one_vs_rest,
    pooled_latents,
    prepare_probing_data,
    sae_layer,
)
from saelib.io import write_json
from saelib.saes import SAE

ProbeInput = Literal["residual", "reconstruction"]
Decoder = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TPPConfig:
    dataset: str = "wiki"  # used when no examples are passed
    classes: tuple[str, ...] | None = None  # None: every label with enough texts
    n_train_per_class: int = 40
    n_test_per_class: int = 20
    n_latents: tuple[int, ...] = (1, 5, 20)  # latents ablated per class
    probe_input: ProbeInput = "residual"
    context_length: int = 128
    skip_first_token: bool = True  # leave the attention-sink token out of the means
    batch_size: int = 32  # texts per language-model forward pass
    sae_batch_size: int = 2048  # token vectors per SAE forward pass
    C: float = 1.0  # inverse L2 strength of the logistic regressions
    max_iter: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if not self.n_latents or min(self.n_latents) < 0:
            raise ValueError(f"n_latents must be non-negative counts, got {self.n_latents}")
        if self.probe_input not in ("residual", "reconstruction"):
            raise ValueError(f"probe_input must be residual or reconstruction: {self.probe_input}")

    def probing_config(self) -> SparseProbingConfig:
        """The sparse-probing config with the same data settings (texts, split, pooling): every
        field the two configs share, by name."""
        shared = {item.name for item in fields(SparseProbingConfig)} & {
            item.name for item in fields(self)
        }
        return SparseProbingConfig(**{name: getattr(self, name) for name in shared})


@dataclass
class TPPOutput:
    """Accuracy drops (clean - ablated, binary probes, chance 0.5): n -> class -> value."""

    classes: list[str]
    n_latents: list[int]
    clean_accuracy: dict[str, float]  # each class's probe, nothing ablated
    targeted_drop: dict[int, dict[str, float]]  # t's probe, t's latents ablated
    off_target_drop: dict[int, dict[str, float]]  # mean of the other probes, t's latents ablated
    score: dict[int, dict[str, float]]  # targeted - off-target
    mean_targeted_drop: dict[int, float]  # means over classes
    mean_off_target_drop: dict[int, float]
    mean_score: dict[int, float]
    ablated_latents: dict[int, dict[str, list[int]]]
    n_train: int
    n_test: int
    n_unconverged_fits: int  # logistic regressions that hit max_iter
    config: TPPConfig
    metadata: dict = field(default_factory=dict)  # layer, model, SAE shape, seconds

    def save(self, path: str | Path) -> Path:
        return write_json(path, self)


def run_tpp(
    sae: SAE,
    lm,
    layer: int | None = None,
    config: TPPConfig = TPPConfig(),
    data: ProbingData | None = None,
    examples: Sequence[Example] | None = None,
    progress: bool = True,
) -> TPPOutput:
    """TPP of ``sae`` at ``layer`` (default: ``sae.metadata["layer"]``) of ``lm``.

    ``data`` (from :func:`prepare_probing_data` with ``config.probing_config()``) skips the
    language model, e.g. when several SAEs read the same layer; ``examples`` replaces the
    config's dataset.
    """
    started = time.perf_counter()
    config.validate()
    layer = sae_layer(sae, layer)
    if data is None:
        data = prepare_probing_data(lm, layer, config.probing_config(), examples, progress)
    elif data.layer != layer:
        raise ValueError(f"data holds layer {data.layer} but the SAE reads layer {layer}")
    residual = mean_pool(data.token_acts, data.doc_index, data.n_texts)
    latents = pooled_latents(
        sae, data.token_acts, data.doc_index, data.n_texts, config.probing_config(), progress
    )
    output = tpp_from_arrays(
        latents,
        residual,
        data.labels,
        code_decoder(sae),
        config,
        data.train_index,
        data.test_index,
        progress,
    )
    output.metadata = {
        "model": data.model,
        "layer": layer,
        "architecture": getattr(sae, "architecture", None),
        "d_sae": sae.d_sae,
        "k": getattr(sae, "k", None),
        "n_tokens": len(data.token_acts),
        "seconds": time.perf_counter() - started,
    }
    return output


def code_decoder(sae: SAE) -> Decoder:
    """Dense (n, d_sae) codes -> (n, d_in) through the SAE's code path (affine in the code).

    ``code_path`` when the SAE has one; otherwise ``codes @ W_dec + b_dec`` (a TopK SAE's
    ``decode`` takes the active entries, not a dense code)."""
    path = getattr(sae, "code_path", None)

    def decode(codes: Tensor) -> Tensor:
        codes = codes.to(sae.W_dec)
        if path is not None:
            return path(codes)
        bias = getattr(sae, "b_dec", None)
        out = codes @ sae.W_dec
        return out if bias is None else out + bias

    return decode


@torch.no_grad()
def ablated_features(
    latents: np.ndarray, base: np.ndarray, decode: Decoder, ablate: Sequence[int]
) -> np.ndarray:
    """``base`` minus the decoded contribution of the ``ablate`` latents of the pooled code:
    base - decode(latents) + decode(latents with those columns zeroed)."""
    if len(ablate) == 0:
        return base
    codes = torch.from_numpy(np.asarray(latents, np.float32))
    masked = codes.clone()
    masked[:, list(ablate)] = 0.0
    change = (decode(codes) - decode(masked)).double().cpu().numpy()
    return base - change


def tpp_from_arrays(
    latents: np.ndarray,
    residual: np.ndarray,
    labels: Sequence,
    decode: Decoder,
    config: TPPConfig = TPPConfig(),
    train_index: np.ndarray | None = None,
    test_index: np.ndarray | None = None,
    progress: bool = False,
) -> TPPOutput:
    """TPP on pooled features: ``latents`` (n, d_sae), ``residual`` (n, d), ``labels`` (n), and
    ``decode`` taking dense codes to the residual space (see :func:`code_decoder`).

    Without ``train_index``/``test_index`` the rows are split by :func:`balanced_split` with the
    config's sizes and seed.
    """
    config.validate()
    latents = np.asarray(latents, np.float32)
    residual = np.asarray(residual, np.float64)
    labels = np.asarray(labels).astype(str)
    if train_index is None or test_index is None:
        classes = choose_classes(labels, config.probing_config())
        train_index, test_index = balanced_split(
            labels, classes, config.n_train_per_class, config.n_test_per_class, config.seed
        )
    else:
        classes = list(config.classes or sorted(set(labels[np.r_[train_index, test_index]])))
    base = residual
    if config.probe_input == "reconstruction":
        with torch.no_grad():
            base = decode(torch.from_numpy(latents)).double().cpu().numpy()
    probes = _Probes(config, labels, train_index, test_index, classes, base)
    ns = sorted({min(n, latents.shape[1]) for n in config.n_latents})
    drops = {n: {t: {} for t in classes} for n in ns}  # n -> ablated class -> probe -> drop
    chosen = {n: {} for n in ns}
    for target in tqdm(classes, desc="TPP ablations", disable=not progress):
        ranking = _latent_ranking(latents, probes.train_rows(target))
        for n in ns:
            chosen[n][target] = ranking[:n].tolist()
            ablated = ablated_features(latents, base, decode, chosen[n][target])
            drops[n][target] = probes.drops(ablated)
    return _summarise(drops, chosen, classes, probes, config, len(train_index), len(test_index))


def _latent_ranking(latents: np.ndarray, rows: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Latent indices by decreasing (signed) mean over positives - mean over negatives."""
    index, targets = rows
    features = latents[index].astype(np.float64)
    difference = features[targets == 1].mean(0) - features[targets == 0].mean(0)
    return np.argsort(-difference, kind="stable")


def _summarise(drops, chosen, classes, probes, config, n_train: int, n_test: int) -> TPPOutput:
    targeted = {n: {t: drops[n][t][t] for t in classes} for n in drops}
    off = {
        n: {t: float(np.mean([drops[n][t][j] for j in classes if j != t])) for t in classes}
        for n in drops
    }
    score = {n: {t: targeted[n][t] - off[n][t] for t in classes} for n in drops}

    def mean(values: dict[int, dict[str, float]]) -> dict[int, float]:
        return {n: float(np.mean(list(per_class.values()))) for n, per_class in values.items()}

    return TPPOutput(
        classes=list(classes),
        n_latents=list(drops),
        clean_accuracy=dict(probes.clean),
        targeted_drop=targeted,
        off_target_drop=off,
        score=score,
        mean_targeted_drop=mean(targeted),
        mean_off_target_drop=mean(off),
        mean_score=mean(score),
        ablated_latents=chosen,
        n_train=n_train,
        n_test=n_test,
        n_unconverged_fits=probes.unconverged,
        config=config,
    )


class _Probes:
    """One fitted one-vs-rest probe per class on ``features``, with its balanced binary sets
    (drawn as sparse probing draws them) and its clean test accuracy."""

    def __init__(self, config: TPPConfig, labels, train, test, classes: list[str], features):
        rng = np.random.default_rng(config.seed)
        self.unconverged = 0
        self.sets, self.models, self.clean = {}, {}, {}
        for name in classes:
            train_rows = one_vs_rest(labels, train, name, classes, rng)
            test_rows = one_vs_rest(labels, test, name, classes, rng)
            self.sets[name] = (train_rows, test_rows)
            self.models[name] = self._fit(config, features[train_rows[0]], train_rows[1])
            self.clean[name] = self._score(name, features)

    def train_rows(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.sets[name][0]

    def drops(self, features: np.ndarray) -> dict[str, float]:
        """Clean - current test accuracy of every probe on ``features``."""
        return {name: self.clean[name] - self._score(name, features) for name in self.models}

    def _score(self, name: str, features: np.ndarray) -> float:
        rows, targets = self.sets[name][1]
        return float(self.models[name].score(features[rows], targets))

    def _fit(self, config: TPPConfig, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        model = LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=config.seed)
        # One BLAS thread: these fits are tiny, and on a busy machine extra threads make them
        # 10-20x slower.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x, y)
        self.unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return model
