"""Sparse probing, following SAEBench: how well do k SAE latents classify labelled texts?

Definitions:

- Data: texts with class labels (default: the embedded ``wiki`` summaries, 12 topics; any list
  of ``(text, label)`` pairs by parameter). Per class, a seeded split into
  ``n_train_per_class`` train and ``n_test_per_class`` test texts, disjoint and equal in size
  for every class.
- Features of a text: the residual stream after ``layer`` at the text's real tokens (no pad or
  special tokens, at most ``context_length`` tokens), mean-pooled; and the SAE latents (after the
  SAE's own activation, e.g. TopK) of each of those token vectors, mean-pooled the same way.
  By default the first real token is left out of both means (``skip_first_token``): in
  SmolLM2-135M it is an attention sink whose residual norm is ~24,000 against ~180 elsewhere
  (layer 15), so it would dominate every mean. SAEBench leaves out the BOS token for the same
  reason; SmolLM2's tokenizer adds no BOS, so the first real token plays that role.
- One-vs-rest probes, balanced as in SAEBench: for class c, the positives are c's texts and the
  negatives as many texts drawn evenly from the other classes (seeded), in train and test alike,
  so chance is 0.5.
- For each k: the k latents with the largest |mean over positives - mean over negatives| on the
  binary train set, a logistic regression on them (sklearn, L2, ``C``, ``max_iter``: SAEBench's
  settings), and its accuracy on the binary test set; reported per class and as the mean over
  classes.
- Baseline: the same probe on the whole pooled residual (every dimension).
- Multi-class: one multinomial logistic regression over all classes on the whole train split,
  scored on the whole test split (chance 1 / n_classes); for the SAE on the union over classes
  of the per-class top-k latents, for the residual on every dimension.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm.auto import tqdm

from saelib.activations import residuals_for_texts
from saelib.data import load_documents
from saelib.io import write_json
from saelib.saes import SAE

Example = tuple[str, str]


@dataclass(frozen=True)
class SparseProbingConfig:
    dataset: str = "wiki"  # used when no examples are passed
    classes: tuple[str, ...] | None = None  # None: every label with enough texts
    n_train_per_class: int = 40
    n_test_per_class: int = 20
    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    context_length: int = 128
    skip_first_token: bool = True  # leave the attention-sink token out of the means
    batch_size: int = 32  # texts per language-model forward pass
    sae_batch_size: int = 2048  # token vectors per SAE forward pass
    C: float = 1.0  # inverse L2 strength of the logistic regressions
    max_iter: int = 1000
    seed: int = 0


@dataclass
class SparseProbingOutput:
    """Test accuracies; binary ones (chance 0.5) per class and as the mean over classes."""

    classes: list[str]
    ks: list[int]
    sae_accuracy: dict[int, float]  # k -> mean over classes
    sae_accuracy_per_class: dict[int, dict[str, float]]
    sae_multiclass_accuracy: dict[int, float]  # chance 1 / n_classes
    sae_top_latents: dict[int, dict[str, list[int]]]  # k -> class -> chosen latents
    residual_accuracy: float
    residual_accuracy_per_class: dict[str, float]
    residual_multiclass_accuracy: float
    n_train: int
    n_test: int
    n_unconverged_fits: int  # logistic regressions that hit max_iter
    config: SparseProbingConfig
    metadata: dict = field(default_factory=dict)  # layer, model, SAE shape, seconds

    def save(self, path: str | Path) -> Path:
        return write_json(path, self)


@dataclass
class ProbingData:
    """Per-token residuals of the chosen texts: reusable across SAEs at the same layer."""

    token_acts: Tensor  # (n_tokens, d_model)
    doc_index: Tensor  # (n_tokens,) index into labels
    labels: np.ndarray  # (n_texts,) class names
    train_index: np.ndarray
    test_index: np.ndarray
    classes: list[str]
    layer: int
    model: str

    @property
    def n_texts(self) -> int:
        return len(self.labels)


def run_sparse_probing(
    sae: SAE,
    lm,
    layer: int | None = None,
    config: SparseProbingConfig = SparseProbingConfig(),
    examples: Sequence[Example] | None = None,
    data: ProbingData | None = None,
    progress: bool = True,
) -> SparseProbingOutput:
    """Sparse probing of ``sae`` at ``layer`` (default: ``sae.metadata["layer"]``) of ``lm``.

    ``examples`` replaces the config's dataset; ``data`` (from :func:`prepare_probing_data`)
    skips the language model, e.g. when several SAEs read the same layer.
    """
    started = time.perf_counter()
    layer = sae_layer(sae, layer)
    if data is None:
        data = prepare_probing_data(lm, layer, config, examples, progress)
    elif data.layer != layer:
        raise ValueError(f"data holds layer {data.layer} but the SAE reads layer {layer}")
    residual = mean_pool(data.token_acts, data.doc_index, data.n_texts)
    latents = pooled_latents(sae, data.token_acts, data.doc_index, data.n_texts, config, progress)
    output = sparse_probing_from_arrays(
        latents, residual, data.labels, config, data.train_index, data.test_index, progress
    )
    output.metadata = {
        "model": data.model,
        "layer": layer,
        "d_sae": sae.d_sae,
        "k": getattr(sae, "k", None),
        "n_tokens": len(data.token_acts),
        "seconds": time.perf_counter() - started,
    }
    return output


def sae_layer(sae: SAE, layer: int | None) -> int:
    """``layer``, or the layer the SAE's metadata says it reads."""
    if layer is not None:
        return layer
    if sae.metadata.get("layer") is None:
        raise ValueError("the SAE's metadata names no layer: pass layer=")
    return int(sae.metadata["layer"])


def prepare_probing_data(
    lm,
    layer: int,
    config: SparseProbingConfig = SparseProbingConfig(),
    examples: Sequence[Example] | None = None,
    progress: bool = True,
) -> ProbingData:
    """Choose and split the texts, then run ``lm`` up to ``layer`` over them."""
    texts, labels = _load_examples(config, examples)
    classes = choose_classes(labels, config)
    train, test = balanced_split(
        labels, classes, config.n_train_per_class, config.n_test_per_class, config.seed
    )
    chosen = np.concatenate([train, test])
    acts, doc_index = token_residuals(lm, [texts[i] for i in chosen], layer, config, progress)
    return ProbingData(
        token_acts=acts,
        doc_index=doc_index,
        labels=labels[chosen],
        train_index=np.arange(len(train)),
        test_index=np.arange(len(train), len(chosen)),
        classes=classes,
        layer=layer,
        model=lm.name,
    )


def _load_examples(
    config: SparseProbingConfig, examples: Sequence[Example] | None
) -> tuple[list[str], np.ndarray]:
    if examples is None:
        documents = load_documents(config.dataset)
        examples = [(doc.text, doc.label) for doc in documents if doc.label is not None]
    kept = [(text, str(label)) for text, label in examples if text.strip()]
    if not kept:
        raise ValueError("no labelled, non-empty texts to probe")
    return [text for text, _ in kept], np.array([label for _, label in kept])


def choose_classes(labels: np.ndarray, config: SparseProbingConfig) -> list[str]:
    """The classes to probe: those asked for, or every label with enough texts for the split."""
    counts = Counter(labels.tolist())
    needed = config.n_train_per_class + config.n_test_per_class
    if config.classes is not None:
        small = {name: counts.get(name, 0) for name in config.classes if counts[name] < needed}
        if small:
            raise ValueError(f"classes with fewer than {needed} texts: {small}")
        return list(config.classes)
    classes = sorted(name for name, count in counts.items() if count >= needed)
    dropped = sorted(set(counts) - set(classes))
    if dropped:
        warnings.warn(f"dropped classes with fewer than {needed} texts: {dropped}", stacklevel=2)
    if len(classes) < 2:
        raise ValueError(f"sparse probing needs two classes with at least {needed} texts each")
    return classes


def balanced_split(
    labels: np.ndarray, classes: Sequence, n_train: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test): n_train and n_test of each class, disjoint, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for name in classes:
        rows = rng.permutation(np.flatnonzero(labels == name))
        if len(rows) < n_train + n_test:
            raise ValueError(f"class {name!r} has {len(rows)} texts, needs {n_train + n_test}")
        train.append(rows[:n_train])
        test.append(rows[n_train : n_train + n_test])
    return np.concatenate(train), np.concatenate(test)


def token_residuals(
    lm, texts: list[str], layer: int, config: SparseProbingConfig, progress: bool = True
) -> tuple[Tensor, Tensor]:
    """Residuals after ``layer`` at every kept token of ``texts``, and each one's text index.

    Texts are batched in order of length, which saves most of the padding.
    """
    encoded = lm.tokenizer(texts, truncation=True, max_length=config.context_length)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    acts, doc_index = [], []
    starts = range(0, len(texts), config.batch_size)
    for start in tqdm(starts, desc=f"probing residuals, layer {layer}", disable=not progress):
        batch = order[start : start + config.batch_size]
        columns = residuals_for_texts(
            lm, [texts[i] for i in batch], layer, "all", config.context_length, len(batch)
        )
        acts.append(columns["acts"])
        doc_index.append(torch.as_tensor(batch)[columns["doc_index"]])
    acts_all, doc_all = torch.cat(acts), torch.cat(doc_index)
    if config.skip_first_token:
        keep = _not_first_of_document(doc_all)
        acts_all, doc_all = acts_all[keep], doc_all[keep]
    return acts_all, doc_all


def _not_first_of_document(doc_index: Tensor) -> Tensor:
    """False at the first row of each run of equal document indices (rows come in order)."""
    first = torch.ones_like(doc_index, dtype=torch.bool)
    first[1:] = doc_index[1:] != doc_index[:-1]
    return ~first


def mean_pool(values: Tensor, doc_index: Tensor, n_docs: int) -> np.ndarray:
    """(n_docs, d) mean of the rows of each document; zeros for a document without rows."""
    sums = values.new_zeros(n_docs, values.shape[1]).index_add_(0, doc_index, values)
    counts = torch.bincount(doc_index, minlength=n_docs).clamp_min(1)
    return (sums / counts[:, None]).cpu().numpy()


@torch.no_grad()
def pooled_latents(
    sae: SAE,
    token_acts: Tensor,
    doc_index: Tensor,
    n_docs: int,
    config: SparseProbingConfig = SparseProbingConfig(),
    progress: bool = True,
) -> np.ndarray:
    """(n_docs, d_sae) mean of the SAE latents over each document's tokens, summed from each
    token's non-zero latents (any code: fixed-k, variable-k, binary)."""
    device = next(sae.parameters()).device
    sums = torch.zeros(n_docs * sae.d_sae, device=device)
    step = config.sae_batch_size
    for start in tqdm(
        range(0, len(token_acts), step), desc="probing SAE latents", disable=not progress
    ):
        output = sae(token_acts[start : start + step].to(device))
        rows, latents, values = output.active()
        docs = doc_index[start : start + step].to(device)
        sums.index_add_(0, docs[rows] * sae.d_sae + latents, values.float())
    counts = torch.bincount(doc_index, minlength=n_docs).clamp_min(1).to(device)
    return (sums.view(n_docs, sae.d_sae) / counts[:, None]).cpu().numpy()


def sparse_probing_from_arrays(
    latents: np.ndarray,
    residual: np.ndarray,
    labels: Sequence,
    config: SparseProbingConfig = SparseProbingConfig(),
    train_index: np.ndarray | None = None,
    test_index: np.ndarray | None = None,
    progress: bool = False,
) -> SparseProbingOutput:
    """The probes on pooled features: ``latents`` (n, d_sae), ``residual`` (n, d), ``labels`` (n).

    Without ``train_index``/``test_index`` the rows are split by :func:`balanced_split` with the
    config's sizes and seed.
    """
    latents, residual = np.asarray(latents, np.float64), np.asarray(residual, np.float64)
    labels = np.asarray(labels).astype(str)
    if train_index is None or test_index is None:
        classes = choose_classes(labels, config)
        train_index, test_index = balanced_split(
            labels, classes, config.n_train_per_class, config.n_test_per_class, config.seed
        )
    else:
        classes = list(config.classes or sorted(set(labels[np.r_[train_index, test_index]])))
    probe = _Probe(config, labels, train_index, test_index, classes)
    ks = sorted({min(k, latents.shape[1]) for k in config.ks})
    per_class, top, residual_per_class = {k: {} for k in ks}, {k: {} for k in ks}, {}
    for name in tqdm(classes, desc="sparse probes", disable=not progress):
        rows = probe.one_vs_rest(name)
        ranking = _mean_difference_ranking(latents[rows[0]], rows[1])
        for k in ks:
            top[k][name] = ranking[:k].tolist()
            per_class[k][name] = probe.binary(latents[:, ranking[:k]], rows)
        residual_per_class[name] = probe.binary(residual, rows)
    return SparseProbingOutput(
        classes=list(classes),
        ks=ks,
        sae_accuracy={k: float(np.mean(list(per_class[k].values()))) for k in ks},
        sae_accuracy_per_class=per_class,
        sae_multiclass_accuracy={k: probe.multiclass(latents[:, _union(top[k])]) for k in ks},
        sae_top_latents=top,
        residual_accuracy=float(np.mean(list(residual_per_class.values()))),
        residual_accuracy_per_class=residual_per_class,
        residual_multiclass_accuracy=probe.multiclass(residual),
        n_train=len(train_index),
        n_test=len(test_index),
        n_unconverged_fits=probe.unconverged,
        config=config,
    )


def _union(chosen: dict[str, list[int]]) -> np.ndarray:
    return np.unique(np.concatenate(list(chosen.values())))


def one_vs_rest(
    labels: np.ndarray, index: np.ndarray, positive: str, classes: Sequence[str], rng
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (positives first) and 0/1 targets of a balanced binary set, as SAEBench builds it:
    as many negatives as positives, drawn evenly from the other classes."""
    positives = index[labels[index] == positive]
    others = [name for name in classes if name != positive]
    per_class = math.ceil(len(positives) / len(others))
    pool = []
    for name in others:
        rows = index[labels[index] == name]
        pool.append(rng.choice(rows, min(per_class, len(rows)), replace=False))
    pool = np.concatenate(pool)
    negatives = rng.choice(pool, min(len(positives), len(pool)), replace=False)
    targets = np.r_[np.ones(len(positives), int), np.zeros(len(negatives), int)]
    return np.r_[positives, negatives], targets


def _mean_difference_ranking(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Feature indices by decreasing |mean over positives - mean over negatives|."""
    difference = features[targets == 1].mean(0) - features[targets == 0].mean(0)
    return np.argsort(-np.abs(difference), kind="stable")


class _Probe:
    """Seeded logistic regressions on one train/test split; counts the unconverged fits."""

    def __init__(self, config: SparseProbingConfig, labels, train, test, classes: list[str]):
        self.config, self.labels, self.train, self.test = config, labels, train, test
        self.classes = classes
        self.rng = np.random.default_rng(config.seed)
        self.unconverged = 0

    def one_vs_rest(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train rows, train targets, test rows, test targets) of class ``name``."""
        train = one_vs_rest(self.labels, self.train, name, self.classes, self.rng)
        test = one_vs_rest(self.labels, self.test, name, self.classes, self.rng)
        return (*train, *test)

    def binary(self, features: np.ndarray, rows: tuple) -> float:
        train_rows, train_y, test_rows, test_y = rows
        return self._accuracy(features[train_rows], train_y, features[test_rows], test_y)

    def multiclass(self, features: np.ndarray) -> float:
        labels, train, test = self.labels, self.train, self.test
        return self._accuracy(features[train], labels[train], features[test], labels[test])

    def _accuracy(self, x_train, y_train, x_test, y_test) -> float:
        model = LogisticRegression(
            C=self.config.C, max_iter=self.config.max_iter, random_state=self.config.seed
        )
        # One BLAS thread: these fits are tiny, and on a busy machine extra threads make them
        # 10-20x slower.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, y_train)
        self.unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return float(model.score(x_test, y_test))
