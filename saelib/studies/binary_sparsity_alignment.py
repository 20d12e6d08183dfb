"""Binary sparse codes with a cosine loss ("Sparsity beyond TopK"), its two ablations and TopK
controls (spec: the binary-sparsity-alignment study spec).

Binary Sparsity Alignment (BSA) encodes x into bits b = round(sigmoid(W_e x + b_e)) with the
passthrough gradient, decodes x_hat = W_d b + b_d, and trains (1 - cos(x, x_hat)) + alpha (1 -
cos(s, t)) with t the one-hot TopK of s: the claim is that each sample then uses a number of
bits other than K, with reconstruction intact and no dead bits. This study trains the N x K
grid of the original, replaces cosine by MSE, KL and cross-entropy in each term (the loss-metric
ablation), replaces the passthrough round by other gradient estimators (the gradient-flow
ablation), and trains two controls on the same data: a TopK SAE (continuous code) and a hard
binary TopK code (exactly K bits). Every cell is measured the same way whatever it was trained
on: cosine loss and MSE, the fixed-TopK reconstruction, active bits per sample (mean, std,
histogram), dead bits in evaluation mode, a topic probe on the codes and nearest-neighbour
agreement of the reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.params import (
    ParamsError,
    require_all_positive,
    require_choices,
    require_fraction,
    require_non_empty,
    require_non_negative,
    require_positive,
    require_unique,
)
from saelib.saes import TopKConfig, TopKSAE
from saelib.saes.binary import BinaryConfig, BinarySAE
from saelib.studies.claims import Claim, seed_spread, summarize_seeds
from saelib.studies.common import check_dataset, check_device, check_seed_range
from saelib.studies.record import Headline, Study
from saelib.studies.results import StudyResults, as_float, claims_held
from saelib.training import SAESpec, TrainConfig, TrainResult, train_saes
from saelib.training.bsa import (
    ALIGN_METRICS,
    RECON_METRICS,
    BSALoss,
    alignment_term,
    anneal_progress,
    reconstruction_term,
)
from saelib.training.losses import TopKLoss

# the study's estimator names -> (BinaryConfig.estimator, hard)
ESTIMATORS = {
    "passthrough": ("passthrough", True),
    "ste_identity": ("ste_identity", True),
    "ste_sigmoid": ("ste_sigmoid", True),  # same gradient as the passthrough (a test shows it)
    "gumbel_hard": ("gumbel", True),
    "gumbel_soft": ("gumbel", False),
    "soft_quant": ("soft_quant", True),
}
CONTROLS = ("topk", "binary_topk")
ORIGINAL_LOSS = "cosine/cosine"
Model = Literal["bsa", "topk", "binary_topk"]


@dataclass
class BinarySparsityParams:
    source: Literal["embeddings", "residual"] = "embeddings"
    dataset: str = "wiki"
    n_texts: int = 2000  # embeddings: a seeded random sample of the dataset's documents
    sample_seed: int = 0
    # residual source: the embedded LM's residual stream after `layer`, harvested over
    # `max_tokens` tokens, mean-pooled per document ("mean") or one vector per token ("token")
    model: str = "smollm2-135m"
    layer: int = 15
    max_tokens: int = 20_000
    context_length: int = 128
    harvest_batch_size: int = 16
    pooling: Literal["mean", "token"] = "mean"
    latent_dims: list[int] = field(default_factory=lambda: [256, 512])  # N
    k_values: list[int] = field(default_factory=lambda: [8, 16, 32])  # K
    # both ablations run at one (N, K) of the grid
    ablation_latent_dim: int = 512
    ablation_k: int = 16
    # "reconstruction/alignment" metric pairs; the original is cosine/cosine. "ce" trains as
    # "kl" (they differ by a constant), so only the larger grid runs it
    loss_metrics: list[str] = field(
        default_factory=lambda: [
            "cosine/cosine", "mse/cosine", "kl/cosine",
            "cosine/mse", "cosine/kl", "cosine/bce", "mse/mse",
        ]
    )  # fmt: skip
    estimators: list[str] = field(
        default_factory=lambda: [
            "passthrough", "ste_identity", "gumbel_hard", "gumbel_soft", "soft_quant",
        ]
    )  # fmt: skip
    # controls at every N of the grid and each of these K (a wider range than the grid's, so
    # that BSA's mean active count falls inside it for the equal-count comparison)
    control_k_values: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    alpha: float = 1.0
    # other metrics than cosine: scale alpha so that the two terms have the ratio at
    # initialisation that cosine/cosine has (MSE on unit vectors is ~100x smaller than cosine)
    calibrate_alpha: bool = True
    softmax_temperature: float = 0.05  # KL/CE reconstruction: unit vectors need a sharp softmax
    auxk_alpha: float = 1 / 32  # the TopK SAE control
    lr: float = 1e-2
    batch_size: int = 128
    epochs: float = 25.0
    val_fraction: float = 0.2
    probe_max_iter: int = 100
    neighbours: int = 10  # k of the nearest-neighbour agreement
    checkpoint_every: int = 200
    device: str = "auto"

    def check(self) -> None:
        """Impossible values stop here, before any compute."""
        require_positive(self, "n_texts", "max_tokens", "context_length", "harvest_batch_size")
        require_positive(self, "batch_size", "epochs", "lr", "softmax_temperature")
        require_positive(self, "probe_max_iter", "neighbours")
        require_non_negative(self, "alpha", "auxk_alpha", "checkpoint_every", "sample_seed")
        require_fraction(self, "val_fraction")
        require_non_empty(self, "latent_dims", "k_values", "seeds", "loss_metrics", "estimators")
        require_all_positive(self, "latent_dims", "k_values", "control_k_values")
        require_unique(self, "latent_dims", "k_values", "control_k_values", "seeds")
        require_unique(self, "loss_metrics", "estimators")
        check_seed_range(self.seeds)
        check_device(self.device)
        self.dataset = check_dataset(self.dataset)
        self._check_cells()
        if self.source == "residual":
            from saelib.params import require_layer_in_model

            require_layer_in_model(self.model, self.layer)

    def _check_cells(self) -> None:
        for pair in self.loss_metrics:
            recon, _, align = pair.partition("/")
            if recon not in RECON_METRICS or align not in ALIGN_METRICS:
                raise ParamsError(
                    f"loss_metrics: {pair!r} is not reconstruction/alignment with reconstruction "
                    f"in {list(RECON_METRICS)} and alignment in {list(ALIGN_METRICS)}"
                )
        require_choices(self, "estimators", list(ESTIMATORS))
        if self.ablation_latent_dim not in self.latent_dims:
            raise ParamsError(f"ablation_latent_dim={self.ablation_latent_dim} is not in "
                              f"latent_dims={self.latent_dims}")  # fmt: skip
        if self.ablation_k not in self.k_values:
            raise ParamsError(f"ablation_k={self.ablation_k} is not in k_values={self.k_values}")
        for name in ("k_values", "control_k_values"):
            too_large = [k for k in getattr(self, name) if k >= min(self.latent_dims)]
            if too_large:
                raise ParamsError(f"{name}: K={too_large[0]} must be smaller than every N in "
                                  f"latent_dims={self.latent_dims}")  # fmt: skip

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            lr=self.lr,
            batch_size=self.batch_size,
            epochs=self.epochs,
            device=self.device,
            checkpoint_every=self.checkpoint_every,
        )


# ---------------------------------------------------------------------------------------- data


@dataclass
class CodeData:
    """The vectors to encode, one per text (or per token), split by document."""

    vectors: Tensor  # (n, d) float32
    doc_index: Tensor  # (n,) the document of each vector
    labels: Tensor  # (n,) topic index of its document
    label_names: list[str]
    texts: list[str]  # the text of each vector's document
    train_rows: Tensor
    val_rows: Tensor
    description: str

    @property
    def train(self) -> Tensor:
        return self.vectors[self.train_rows]

    @property
    def val(self) -> Tensor:
        return self.vectors[self.val_rows]


def load_data(params: BinarySparsityParams, progress: bool = True) -> CodeData:
    """Sentence embeddings or LM residuals, with topics and texts, split by document."""
    from saelib.activations.harvest import split_rows_by_document

    if params.source == "embeddings":
        vectors, doc_index, labels, texts, description = _embeddings(params, progress)
    else:
        vectors, doc_index, labels, texts, description = _residuals(params, progress)
    names = sorted(set(labels))
    label_ids = torch.tensor([names.index(label) for label in labels])
    train_rows, val_rows = split_rows_by_document(doc_index, params.val_fraction, seed=0)
    return CodeData(vectors.float(), doc_index, label_ids, names, texts, train_rows, val_rows,
                    description)  # fmt: skip


def _embeddings(params: BinarySparsityParams, progress: bool):
    from saelib.embeddings import EmbeddingConfig, embed_documents

    config = EmbeddingConfig(params.dataset, sample=params.n_texts, sample_seed=params.sample_seed)
    found = embed_documents(config, progress=progress)
    if any(label is None for label in found.labels):
        raise ValueError(f"dataset {params.dataset!r} has documents without a topic label")
    origin = "read from the cache" if found.from_cache else "embedded now"
    description = (f"{len(found):,} all-MiniLM-L6-v2 sentence embeddings (384 dims, unit norm) of "
                   f"a random sample of {params.dataset} texts, {origin}")  # fmt: skip
    return found.embeddings, found.doc_index, found.labels, found.texts(), description


def _residuals(params: BinarySparsityParams, progress: bool):
    """The LM's residual stream, pooled per document or per token, with document topics."""
    from saelib.activations import HarvestConfig, harvest
    from saelib.data import load_documents

    config = HarvestConfig(model=params.model, layer=params.layer, dataset=params.dataset,
                           max_tokens=params.max_tokens, context_length=params.context_length,
                           batch_size=params.harvest_batch_size)  # fmt: skip
    acts = harvest(config, progress=progress)
    vectors, doc_index = acts.acts, acts.doc_index
    if params.pooling == "mean":
        doc_index, inverse = torch.unique(acts.doc_index, return_inverse=True)
        sums = torch.zeros(len(doc_index), acts.d_model).index_add_(0, inverse, acts.acts.float())
        vectors = sums / torch.bincount(inverse).unsqueeze(1)
    documents = load_documents(params.dataset, int(acts.doc_index.max()) + 1)
    labels = [documents[int(d)].label for d in doc_index]
    if any(label is None for label in labels):
        raise ValueError(f"dataset {params.dataset!r} has documents without a topic label")
    texts = [documents[int(d)].text for d in doc_index]
    n_docs = acts.doc_index.unique().numel()
    description = (f"{len(vectors):,} residual vectors of {params.model} after layer "
                   f"{params.layer} ({params.pooling} pooling) over {n_docs} {params.dataset} "
                   "documents")  # fmt: skip
    return vectors, doc_index, labels, texts, description


# ---------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One trained configuration (over several seeds)."""

    model: Model
    latent_dim: int
    k: int
    estimator: str = "passthrough"
    loss: str = ORIGINAL_LOSS  # "reconstruction/alignment"

    @property
    def name(self) -> str:
        name = f"{self.model}_n{self.latent_dim}_k{self.k}"
        if self.model == "bsa" and self.estimator != "passthrough":
            name += f"_{self.estimator}"
        if self.model != "topk" and self.loss != ORIGINAL_LOSS:
            name += "_" + self.loss.replace("/", "-")
        return name

    def labels(self) -> dict[str, Any]:
        recon, align = self.loss.split("/") if self.model != "topk" else ("mse", "none")
        return {"cell": self.name, "model": self.model, "latent_dim": self.latent_dim,
                "k": self.k, "estimator": self.estimator if self.model == "bsa" else self.model,
                "loss": self.loss if self.model != "topk" else "l2+auxk",
                "recon_metric": recon, "align_metric": align}  # fmt: skip


def build_cells(params: BinarySparsityParams) -> list[Cell]:
    """Grid, loss ablation, estimator ablation and controls; a cell shared by two (the
    original at the ablation's (N, K)) is trained once."""
    n0, k0 = params.ablation_latent_dim, params.ablation_k
    cells = [Cell("bsa", n, k) for n in params.latent_dims for k in params.k_values]
    cells += [Cell("bsa", n0, k0, loss=pair) for pair in params.loss_metrics]
    cells += [Cell("bsa", n0, k0, estimator=name) for name in params.estimators]
    cells += [Cell(model, n, k) for model in CONTROLS for n in params.latent_dims
              for k in params.control_k_values]  # fmt: skip
    return list(dict.fromkeys(cells))


def spec_name(cell: Cell, seed: int) -> str:
    return spec_name_of(cell.name, seed)


def build_model(cell: Cell, d_in: int, seed: int) -> torch.nn.Module:
    """The cell's SAE; a seed gives the same initial weights to every cell of one size."""
    generator = torch.Generator().manual_seed(seed)
    if cell.model == "topk":
        return TopKSAE(TopKConfig(d_in, cell.latent_dim, cell.k), generator=generator)
    estimator, hard = ("topk", True) if cell.model == "binary_topk" else ESTIMATORS[cell.estimator]
    config = BinaryConfig(d_in, cell.latent_dim, cell.k, estimator=estimator, hard=hard,
                          noise_seed=seed)  # fmt: skip
    return BinarySAE(config, generator=generator)


def bsa_loss(params: BinarySparsityParams, cell: Cell, alpha: float) -> BSALoss:
    recon, align = cell.loss.split("/")
    return BSALoss(alpha, recon, align, params.softmax_temperature)


@torch.no_grad()
def calibrated_alpha(params: BinarySparsityParams, cell: Cell, seed: int, train: Tensor) -> float:
    """alpha for ``cell``: the cosine/cosine ratio recon/align at initialisation, kept for other
    metrics (each term measured on the same initial model and training rows)."""
    if cell.model == "topk" or cell.loss == ORIGINAL_LOSS or not params.calibrate_alpha:
        return params.alpha
    model = build_model(cell, train.shape[1], seed)
    rows = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:1024]]
    model.on_first_batch(rows[: params.batch_size])
    model.eval()
    output = model(rows)
    target = torch.zeros_like(output.logits).scatter_(
        -1, output.logits.topk(cell.k, dim=-1).indices, 1.0
    )
    recon, align = cell.loss.split("/")
    terms = {}
    for metric_r, metric_a in ((recon, align), ("cosine", "cosine")):
        r = reconstruction_term(rows, output.recon, metric_r, params.softmax_temperature)
        a = alignment_term(output.logits, target, metric_a)
        terms[(metric_r, metric_a)] = float(r) / max(float(a), 1e-12)
    return params.alpha * terms[(recon, align)] / terms[("cosine", "cosine")]


def build_specs(params: BinarySparsityParams, train: Tensor) -> list[SAESpec]:
    specs = []
    for cell in build_cells(params):
        for seed in params.seeds:
            model = build_model(cell, train.shape[1], seed)
            if cell.model == "topk":
                loss = TopKLoss(params.auxk_alpha)
                alpha = float("nan")
            else:
                alpha = calibrated_alpha(params, cell, seed, train)
                loss = bsa_loss(params, cell, alpha)
            labels = cell.labels() | {"seed": seed, "alpha": alpha}
            specs.append(SAESpec(spec_name(cell, seed), model, loss, labels=labels))
    return specs


def train_all(
    params: BinarySparsityParams, data: CodeData, checkpoint_dir: Path | None,
    progress: bool = True,
) -> list[TrainResult]:  # fmt: skip
    """Every cell and seed in one pass over the data (one training config for all); the
    annealing hook tells the Gumbel and soft-quantisation cells the training progress."""
    specs = build_specs(params, data.train)
    return train_saes(specs, data.train, params.train_config(), checkpoint_dir=checkpoint_dir,
                      hooks=[anneal_progress], progress=progress)  # fmt: skip


# ----------------------------------------------------------------------------------- evaluation

METRICS = [
    "cosine_loss",  # 1 - cos(x, x_hat), validation
    "mse",  # per element
    "explained_variance",
    "topk_cosine_loss",  # fixed-TopK reconstruction: decode t instead of b
    "active_mean",  # active bits (latents) per sample
    "active_std",
    "exactly_k",  # fraction of samples with exactly K active
    "dead_fraction",  # bits never on over train + validation (evaluation mode)
    "always_on_fraction",  # bits on for every sample
    "probe_accuracy",  # topic probe on the codes
    "knn_agreement",  # nearest neighbours shared by x and x_hat
    "train_seconds",
]
LABELS = ["model", "latent_dim", "k", "estimator", "loss", "recon_metric", "align_metric"]


@torch.no_grad()
def encode(model: torch.nn.Module, x: Tensor, batch: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, reconstructions, fixed-TopK reconstructions) in evaluation mode."""
    model.eval()
    codes, recons, topk = [], [], []
    for start in range(0, len(x), batch):
        rows = x[start : start + batch]
        output = model(rows)
        codes.append(output.dense())
        recons.append(output.recon)
        topk.append(model.topk_recon(rows) if isinstance(model, BinarySAE) else output.recon)
    return torch.cat(codes), torch.cat(recons), torch.cat(topk)


def cosine_loss(x: Tensor, recon: Tensor) -> float:
    return float((1 - torch.nn.functional.cosine_similarity(x, recon, dim=-1)).mean())


def knn_agreement(x: Tensor, recon: Tensor, k: int) -> float:
    """Mean fraction of each sample's k nearest neighbours (cosine, itself left out) among the
    inputs that are also its reconstruction's k nearest among the reconstructions."""
    k = min(k, len(x) - 1)

    def nearest(vectors: Tensor) -> Tensor:
        unit = torch.nn.functional.normalize(vectors.float(), dim=1)
        return (unit @ unit.T).fill_diagonal_(-2.0).topk(k, dim=1).indices

    a, b = nearest(x), nearest(recon)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).float().sum(dim=1)
    return float((shared / k).mean())


def probe_accuracy(train: Tensor, train_y: Tensor, val: Tensor, val_y: Tensor, iters: int) -> float:
    """Validation accuracy of a multinomial logistic regression (L2, sklearn's C = 1) on
    standardised features, fitted by full-batch L-BFGS in torch: the same model as sklearn's,
    several times faster on a hundred codes."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    features, targets = (train - mean) / std, train_y.long()
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    weights = torch.zeros(features.shape[1] + 1, n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=iters, line_search_fn="strong_wolfe")
    ones = torch.ones(len(features), 1)

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = torch.cat([features, ones], dim=1) @ weights
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss = loss + 0.5 * weights[:-1].pow(2).sum()  # sklearn: C = 1, intercept unpenalised
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = torch.cat([(val - mean) / std, torch.ones(len(val), 1)], dim=1) @ weights
    return float((logits.argmax(dim=1) == val_y).float().mean())


def evaluate_one(result: TrainResult, data: CodeData, params: BinarySparsityParams):
    """One row of metrics and the histogram of active counts (validation samples)."""
    model = result.model.cpu()
    codes, recon, topk = encode(model, data.vectors)
    val, train = data.val_rows, data.train_rows
    x = data.vectors[val]
    active = (codes[val] != 0).sum(dim=1)
    k = result.labels["k"]
    residual = (x - recon[val]).pow(2).sum()
    on = codes != 0
    row = {
        "cosine_loss": cosine_loss(x, recon[val]),
        "mse": float((x - recon[val]).pow(2).mean()),
        "explained_variance": float(1 - residual / (x - x.mean(0)).pow(2).sum()),
        "topk_cosine_loss": cosine_loss(x, topk[val]),
        "active_mean": float(active.float().mean()),
        "active_std": float(active.float().std()),
        "exactly_k": float((active == k).float().mean()),
        "dead_fraction": float((~on.any(0)).float().mean()),
        "always_on_fraction": float(on.all(0).float().mean()),
        "probe_accuracy": probe_accuracy(codes[train], data.labels[train], codes[val],
                                         data.labels[val], params.probe_max_iter),
        "knn_agreement": knn_agreement(x, recon[val], params.neighbours),
        "train_seconds": result.seconds,
    }  # fmt: skip
    return row, torch.bincount(active).tolist()


def evaluate_all(
    results: list[TrainResult], data: CodeData, params: BinarySparsityParams
) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """One row per (cell, seed); diverged models keep their labels and NaN metrics. Also each
    model's histogram of active counts on validation samples."""
    rows, histograms = [], {}
    for result in results:
        if result.status == "diverged":
            rows.append(result.labels | {"status": "diverged", "steps": result.steps})
            continue
        metrics, histograms[result.name] = evaluate_one(result, data, params)
        rows.append(result.labels | metrics | {"status": result.status, "steps": result.steps})
    table = pd.DataFrame(rows)
    table[METRICS] = table.reindex(columns=METRICS).astype(float)
    return table, histograms


def reference_probe(data: CodeData, params: BinarySparsityParams) -> float:
    """The topic probe on the input vectors themselves, the ceiling a code is measured against."""
    train, val = data.train_rows, data.val_rows
    return probe_accuracy(data.vectors[train], data.labels[train], data.vectors[val],
                          data.labels[val], params.probe_max_iter)  # fmt: skip


def summarize(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per cell, with the cell's labels, in training order."""
    summary = summarize_seeds(per_seed, "cell", METRICS + ["alpha"])
    labels = per_seed.drop_duplicates("cell").set_index("cell")[LABELS]
    order = list(dict.fromkeys(per_seed["cell"]))
    return labels.join(summary).loc[[cell for cell in order if cell in summary.index]]


# ------------------------------------------------------------------------------------ tables


def grid_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The original BSA over the N x K grid."""
    chosen = summary[(summary.model == "bsa") & (summary.estimator == "passthrough")
                     & (summary.loss == ORIGINAL_LOSS)]  # fmt: skip
    return chosen.sort_values(["latent_dim", "k"])


def loss_table(summary: pd.DataFrame, params: BinarySparsityParams) -> pd.DataFrame:
    """The loss-metric ablation, indexed by "reconstruction/alignment"."""
    chosen = _at_ablation(summary, params)
    chosen = chosen[(chosen.model == "bsa") & (chosen.estimator == "passthrough")]
    present = [pair for pair in params.loss_metrics if pair in set(chosen.loss)]
    return chosen.set_index("loss").reindex(present)


def estimator_table(summary: pd.DataFrame, params: BinarySparsityParams) -> pd.DataFrame:
    """The gradient-flow ablation, indexed by estimator."""
    chosen = _at_ablation(summary, params)
    chosen = chosen[(chosen.model == "bsa") & (chosen.loss == ORIGINAL_LOSS)]
    return chosen.set_index("estimator").reindex(
        [name for name in params.estimators if name in set(chosen.estimator)]
    )


def control_table(summary: pd.DataFrame) -> pd.DataFrame:
    """BSA and both controls, every (N, K) they were trained at."""
    chosen = summary[(summary.model != "bsa") | (summary.index.isin(grid_table(summary).index))]
    return chosen.sort_values(["latent_dim", "k", "model"])


def _at_ablation(summary: pd.DataFrame, params: BinarySparsityParams) -> pd.DataFrame:
    return summary[(summary.latent_dim == params.ablation_latent_dim)
                   & (summary.k == params.ablation_k)]  # fmt: skip


SHOWN = ["cosine_loss", "mse", "topk_cosine_loss", "active_mean", "active_std", "exactly_k",
         "dead_fraction", "probe_accuracy", "knn_agreement"]  # fmt: skip


def mean_std(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """``metrics`` of a summary table as "mean ± std" text, for display."""
    shown = pd.DataFrame(index=table.index)
    for metric in metrics:
        means, stds = table[f"{metric}_mean"], table[f"{metric}_std"].fillna(0)
        digits = 1 if metric.startswith("active") else 4
        shown[metric] = [
            f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(means, stds, strict=True)
        ]
    return shown


def short_label(row: pd.Series) -> str:
    """A cell's name within one (N, K): its control, estimator or loss pair."""
    if row.model != "bsa":
        return row.model
    return row.estimator if row.estimator != "passthrough" else row.loss


def ablation_bars(summary: pd.DataFrame, params: BinarySparsityParams) -> pd.DataFrame:
    """Every cell at the ablation's (N, K), indexed by :func:`short_label`."""
    chosen = _at_ablation(summary, params)
    return chosen.set_index(pd.Index([short_label(row) for _, row in chosen.iterrows()]))


def pooled_histograms(
    histograms: dict[str, list[int]], summary: pd.DataFrame, params: BinarySparsityParams
) -> dict[str, list[int]]:
    """Active-count histograms of the cells at the ablation's (N, K), seeds pooled."""
    pooled = {}
    for cell, row in _at_ablation(summary, params).iterrows():
        found = [histograms[spec_name_of(cell, seed)] for seed in params.seeds
                 if spec_name_of(cell, seed) in histograms]  # fmt: skip
        width = max((len(counts) for counts in found), default=0)
        pooled[short_label(row)] = [sum(c[i] for c in found if i < len(c)) for i in range(width)]
    return pooled


def spec_name_of(cell: str, seed: int) -> str:
    return f"{cell}_s{seed}"


def inspect_bits(results: list[TrainResult], data: CodeData, params: BinarySparsityParams):
    """Per-bit statistics (:mod:`saelib.features.bits`) of the original BSA and the binary
    TopK control at the ablation's (N, K), first seed, over every sample."""
    from saelib.features.bits import bit_stats

    by_name = {result.name: result for result in results if result.status != "diverged"}
    labels = [data.label_names[int(i)] for i in data.labels]
    found = {}
    for model in ("bsa", "binary_topk"):
        name = spec_name(
            Cell(model, params.ablation_latent_dim, params.ablation_k), params.seeds[0]
        )
        if name in by_name:
            sae = by_name[name].model.cpu().eval()
            codes = encode(sae, data.vectors)[0]
            with torch.no_grad():
                scores = sae.logits(data.vectors)
            found[name] = bit_stats(codes, scores, sae.W_dec.detach(), data.texts, labels)
    return found


# ------------------------------------------------------------------------------------ claims


def check_claims(summary: pd.DataFrame, params: BinarySparsityParams) -> list[Claim]:
    """The original's claims and the ablations' questions, each judged on our seed means
    against the seed spread."""
    claims = [
        claim_count_varies(summary),
        claim_equal_count(summary),
        claim_no_dead_bits(summary),
        claim_best(loss_table(summary, params), ORIGINAL_LOSS, params.ablation_k, 4, "loss metric"),
        claim_best(estimator_table(summary, params), "passthrough", params.ablation_k, 5,
                   "gradient estimator"),
    ]  # fmt: skip
    return [claim for claim in claims if claim is not None]


def _value(row: pd.Series, metric: str) -> tuple[float, float]:
    return float(row[f"{metric}_mean"]), float(row[f"{metric}_std"])


def _binary_topk(summary: pd.DataFrame, n: int, k: int) -> pd.Series | None:
    found = summary[(summary.model == "binary_topk") & (summary.latent_dim == n) & (summary.k == k)]
    return found.iloc[0] if len(found) else None


def claim_count_varies(summary: pd.DataFrame) -> Claim | None:
    """Claim 1: per sample, the active count is not K (most samples differ from K, the count
    varies by more than one bit) while reconstruction is no worse than the hard binary TopK
    code with exactly K bits (beyond the seed spread)."""
    grid = grid_table(summary)
    if grid.empty:
        return None
    parts, holds = [], True
    for _, row in grid.iterrows():
        varies = row.exactly_k_mean < 0.5 and row.active_std_mean > 1.0
        control = _binary_topk(summary, row.latent_dim, row.k)
        text = (f"N={row.latent_dim} K={row.k}: active {row.active_mean_mean:.1f} ± "
                f"{row.active_std_mean:.1f} per sample, "
                f"{row.exactly_k_mean:.0%} exactly K")  # fmt: skip
        if control is not None:
            mine, theirs = _value(row, "cosine_loss"), _value(control, "cosine_loss")
            difference, spread = mine[0] - theirs[0], seed_spread(mine[1], theirs[1])
            keeps = difference <= spread
            text += (f", cosine loss {mine[0]:.4f} vs binary TopK {theirs[0]:.4f} "
                     f"({difference:+.4f}, spread {spread:.4f})")  # fmt: skip
        else:
            keeps = True
        holds &= bool(varies and keeps)
        parts.append(text)
    statement = ("The active count differs from K per sample while reconstruction holds (no "
                 "worse than exactly K binary bits)")  # fmt: skip
    return Claim(statement, holds, "; ".join(parts), 1)


def interpolate_control(summary: pd.DataFrame, model: str, n: int, count: float):
    """(cosine loss mean, std) of ``model`` at N=n interpolated at mean active ``count``
    (linear in log count between the controls' Ks); None outside their range."""
    rows = summary[(summary.model == model) & (summary.latent_dim == n)]
    rows = rows.dropna(subset=["active_mean_mean", "cosine_loss_mean"])
    rows = rows.sort_values("active_mean_mean")
    if len(rows) < 2 or not rows.active_mean_mean.min() <= count <= rows.active_mean_mean.max():
        return None
    at = np.log(rows.active_mean_mean.to_numpy())
    mean = np.interp(np.log(count), at, rows.cosine_loss_mean.to_numpy())
    std = np.interp(np.log(count), at, rows.cosine_loss_std.fillna(0).to_numpy())
    return float(mean), float(std)


def claim_equal_count(summary: pd.DataFrame) -> Claim | None:
    """Claim 2: at BSA's mean active count, its reconstruction against each control's
    (interpolated over the controls' Ks at the same N)."""
    grid = grid_table(summary)
    if grid.empty or not (summary.model != "bsa").any():
        return None
    verdicts: dict[str, list[str]] = {model: [] for model in CONTROLS}
    parts = []
    for _, row in grid.iterrows():
        mine = _value(row, "cosine_loss")
        for model in CONTROLS:
            found = interpolate_control(summary, model, row.latent_dim, row.active_mean_mean)
            if found is None:
                parts.append(f"N={row.latent_dim} K={row.k} vs {model}: "
                             f"{row.active_mean_mean:.1f} bits, outside the controls' "
                             "range")  # fmt: skip
                continue
            difference, spread = mine[0] - found[0], seed_spread(mine[1], found[1])
            verdict = ("better" if difference < -spread else "worse" if difference > spread
                       else "same")  # fmt: skip
            verdicts[model].append(verdict)
            parts.append(f"N={row.latent_dim} K={row.k} ({row.active_mean_mean:.1f} bits) vs "
                         f"{model}: {difference:+.4f} cosine loss (spread {spread:.4f}): "
                         f"{verdict}")  # fmt: skip
    counts = {model: {v: found.count(v) for v in ("better", "same", "worse")}
              for model, found in verdicts.items()}  # fmt: skip
    compared = all(verdicts.values())
    holds = compared and all(count["worse"] == 0 for count in counts.values())
    tally = "; ".join(f"vs {model}: {c['better']} better, {c['same']} within the spread, "
                      f"{c['worse']} worse" for model, c in counts.items())  # fmt: skip
    statement = ("At equal mean active count BSA reconstructs at least as well as TopK "
                 "(continuous and binary)")  # fmt: skip
    return Claim(statement, holds, f"{tally}. " + "; ".join(parts), 2)


def claim_no_dead_bits(summary: pd.DataFrame) -> Claim | None:
    """Claim 3: no bit of the original BSA is off for every sample (evaluation mode)."""
    grid = grid_table(summary)
    if grid.empty:
        return None
    dead = grid.dead_fraction_mean
    parts = [f"N={row.latent_dim} K={row.k}: {row.dead_fraction_mean:.1%} dead, "
             f"{row.always_on_fraction_mean:.1%} always on"
             for _, row in grid.iterrows()]  # fmt: skip
    statement = "BSA has no dead bits (never on over all samples, hard bits)"
    return Claim(statement, bool((dead == 0).all()), "; ".join(parts), 3)


def sparse_rows(table: pd.DataFrame, k: int) -> pd.Series:
    """Cells whose mean active count is a sparse code near K (between K/2 and 2K): a cell that
    turns on most bits reconstructs well for the wrong reason."""
    return (table.active_mean_mean >= k / 2) & (table.active_mean_mean <= 2 * k)


def claim_best(table: pd.DataFrame, original: str, k: int, number: int, what: str) -> Claim | None:
    """Claims 4 and 5: the original's choice has the lowest validation cosine loss among the
    sparse cells of its ablation, or none beats it beyond the seed spread."""
    if original not in table.index or len(table) < 2:
        return None
    sparse = sparse_rows(table, k)
    base = _value(table.loc[original], "cosine_loss")
    beaten, parts = [], []
    for name, row in table.iterrows():
        mean, std = _value(row, "cosine_loss")
        note = "" if sparse[name] else " (not sparse: left out)"
        parts.append(f"{name}: {mean:.4f} ± {std:.4f}, {row.active_mean_mean:.1f} bits, "
                     f"probe {row.probe_accuracy_mean:.3f}{note}")  # fmt: skip
        if name != original and sparse[name] and base[0] - mean > seed_spread(base[1], std):
            beaten.append(name)
    candidates = table[sparse]
    best = candidates.cosine_loss_mean.idxmin() if len(candidates) else None
    holds = not beaten and bool(sparse[original])
    summary = (f"lowest cosine loss among sparse cells: {best}; beating {original} beyond the "
               f"spread: {', '.join(beaten) or 'none'}")  # fmt: skip
    statement = f"The original's {what} ({original}) works best (lowest reconstruction loss)"
    return Claim(statement, holds, f"{summary}. " + "; ".join(parts), number)


# ------------------------------------------------------------------------ results and record


def write_results(
    run_dir: Path,
    params: BinarySparsityParams,
    data: CodeData,
    per_seed: pd.DataFrame,
    summary: pd.DataFrame,
    histograms: dict[str, list[int]],
    seconds: dict[str, float],
    reference_probe_accuracy: float,
) -> StudyResults:
    """Judge the claims and write ``results.json`` into ``run_dir``."""
    results = StudyResults.from_tables(
        STUDY.name, params, per_seed, summary,
        claims=check_claims(summary, params),
        seconds=seconds,
        extra={"n_train_vectors": len(data.train_rows), "n_val_vectors": len(data.val_rows),
               "data": data.description, "active_histograms": histograms,
               "reference_probe_accuracy": reference_probe_accuracy,
               "topics": data.label_names},
    )  # fmt: skip
    results.save(run_dir)
    return results


def headlines(results: dict[str, Any]) -> dict[str, Headline]:
    """The index page's numbers: the original at the ablation cell, and the claims."""
    params = results["params"]
    name = Cell("bsa", params["ablation_latent_dim"], params["ablation_k"]).name
    rows = {row["cell"]: row for row in results["summary"]}
    numbers = {}
    if name in rows:
        row = rows[name]
        numbers["BSA active bits"] = Headline(
            f"{as_float(row['active_mean_mean']):.1f} ± {as_float(row['active_std_mean']):.1f} "
            f"(K={params['ablation_k']})",
            f"{name}: mean and per-sample std of active bits, validation",
        )
        numbers["BSA cosine loss"] = Headline(f"{as_float(row['cosine_loss_mean']):.4f}", name)
    numbers["claims held"] = claims_held(results["claims"])
    return numbers


STUDY = Study(
    name="binary_sparsity_alignment",
    params_class=BinarySparsityParams,
    description="binary codes with a cosine loss: N x K grid, loss and gradient ablations, "
    "TopK controls",
    headlines=headlines,
    key_params=("source", "dataset", "n_texts", "latent_dims", "k_values", "seeds", "epochs"),
)
