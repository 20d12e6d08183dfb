"""Frequency ordering of SAE latents (spec: the frequency-ordering study spec).

Can an SAE be trained so that latent index means something (low indices fire more), at no cost
to reconstruction? The original's nine runs add, one after another, an ordering penalty, its
ramp, dead-latent resampling, adaptive L1, gradient clipping, LayerNorm, a skip connection and
self-attention to a ReLU + L1 SAE. This study trains that cumulative sequence, each change alone
on top of the baseline (the ablation the original lacked), and four ways to order latents on
ReLU and TopK SAEs, each over several seeds, and measures ordering, reconstruction, absorption,
targeted probe perturbation and how much of the reconstruction goes through the sparse code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from saelib.params import (
    ParamsError,
    require_fraction,
    require_non_empty,
    require_non_negative,
    require_positive,
    require_unique,
)
from saelib.saes import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saelib.studies.claims import Claim, compare_to_reference, describe, summarize_seeds
from saelib.studies.common import (
    EvalContext,
    SAEStudyParams,
    SplitData,
    absorption_config,
    core_eval_config,
    load_split,
    prepare_lm_evals,
)
from saelib.studies.record import Headline, Study
from saelib.studies.results import StudyResults, as_float, claims_held
from saelib.training import SAESpec, TrainConfig, TrainResult, for_models, train_saes
from saelib.training.l1 import L1Loss
from saelib.training.losses import TopKLoss
from saelib.training.matryoshka import MatryoshkaLoss
from saelib.training.ordering import OrderingLoss, ResortByFrequency
from saelib.training.resampling import ResampleDead

Ordering = Literal["none", "published", "published_ramp", "soft", "matryoshka", "resort"]


@dataclass(frozen=True)
class Variant:
    """One trained configuration: the architecture and each change of the original's runs."""

    arch: Literal["relu", "topk"] = "relu"
    ordering: Ordering = "none"
    resample: bool = False
    adaptive_l1: bool = False
    clip: bool = False
    layer_norm: bool = False
    skip: bool = False
    attention: bool = False


def _cumulative() -> dict[str, Variant]:
    """The original's sequence: each run keeps the previous runs' changes."""
    steps = [
        ("run0", {}),
        ("run2", {"ordering": "published"}),
        ("run3", {"ordering": "published_ramp"}),
        ("run4", {"resample": True}),
        ("run5", {"adaptive_l1": True}),
        ("run6", {"clip": True}),
        ("run7", {"layer_norm": True}),
        ("run8", {"skip": True}),
        ("run9", {"attention": True}),
    ]
    runs, current = {}, Variant()
    for name, change in steps:
        current = dataclasses.replace(current, **change)
        runs[name] = current
    return runs


CUMULATIVE = _cumulative()
CHANGES = ["resample", "adaptive_l1", "clip", "layer_norm", "skip", "attention"]
ABLATION = {f"{change}_alone": Variant(**{change: True}) for change in CHANGES}
METHODS: tuple[Ordering, ...] = ("none", "published", "soft", "matryoshka", "resort")
ORDERING_RUNS = {
    f"{arch}_{method}": Variant(arch=arch, ordering=method)
    for arch in ("relu", "topk")
    for method in METHODS
}
# A configuration trained once, under its first name: relu_none is run0, relu_published is run2.
VARIANTS: dict[str, Variant] = {}
for _name, _variant in {**CUMULATIVE, **ABLATION, **ORDERING_RUNS}.items():
    if _variant not in VARIANTS.values():
        VARIANTS[_name] = _variant
ALIASES = {
    name: next(first for first, kept in VARIANTS.items() if kept == variant)
    for name, variant in {**CUMULATIVE, **ABLATION, **ORDERING_RUNS}.items()
}

# The original's table (gemma-2-2b layer 19, d_sae 2304, 10M tokens, one seed; SAEBench core).
ORIGINAL_RESULTS = pd.DataFrame(
    [
        ("run0", None, None, None, None, None, None),
        ("run2", 200.2, 0.795, 0.770, 85.2, None, None),
        ("run3", 200.2, 0.795, 0.770, 85.2, None, None),
        ("run4", 1080.9, 0.298, 0.480, 22.5, None, None),
        ("run5", 565.2, 0.348, 0.535, 26.4, 46.5, -0.645),
        ("run6", 355.0, 0.397, 0.617, 23.8, 32.5, -0.182),
        ("run7", 182.9, 0.918, 0.852, None, 14.3, 0.477),
        ("run8", 85.8, 0.990, 0.969, None, 3.27, 0.883),
        ("run9", 147.0, 0.938, 0.883, None, 11.1, 0.586),
    ],
    columns=["run", "final_loss", "kl_score", "cossim", "l0", "mse", "ev"],
).set_index("run")


@dataclass
class FrequencyOrderingParams(SAEStudyParams):
    model: str = "smollm2-135m"
    layer: int = 22  # round(19/26 * 30): the original's relative depth on SmolLM2-135M
    dataset: str = "wiki"
    max_tokens: int = 14_000
    context_length: int = 128
    harvest_batch_size: int = 16
    d_sae: int = 576  # d_model, as the original (2304 = gemma-2-2b's d_model: not overcomplete)
    k: int = 32  # the TopK SAEs of the ordering comparison
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 1e-2  # the original: 3e-4 over 4,882 steps; ours has ~230 steps to get sparse
    batch_size: int = 128
    epochs: float = 2.0
    # leave training vectors with a norm above this times the median out (0: keep them all);
    # see saelib.studies.common.load_split
    max_norm_ratio: float = 10.0
    warmup_fraction: float = 0.2  # the original: 1,000 of 4,882 steps
    # the original's loss convention: squared error summed over d_in, mean over the batch, plus
    # l1_coefficient times the per-sample L1 norm (decoder rows unit norm). Its 0.04 was set for
    # gemma-2-2b's residual scale; on ours (mean norm ~320) it leaves ~320 of 576 latents active,
    # so the coefficient is chosen for a baseline L0 near the TopK SAEs' k (see the notebook)
    l1_coefficient: float = 8.0
    auxk_alpha: float = 1 / 32
    ordering_weight: float = 0.3  # run 2
    ramp_weight: float = 0.5  # run 3: 0 -> 0.5 over the first ramp_fraction of training
    ramp_fraction: float = 0.2  # the original: 1,000 of 4,882 batches
    # the differentiable penalty: weight relative to the reconstruction term, temperature in
    # units of each latent's pre-activation spread (see saelib.training.ordering)
    soft_weight: float = 3.0
    soft_temperature: float = 0.5
    soft_margin: float = 0.0
    matryoshka_prefixes: list[int] = field(default_factory=lambda: [36, 72, 144, 288, 576])
    resort_every: int = 20  # steps between hard re-sorts by frequency
    resample_every: int = 60  # the original: every 1,000 of 4,882 steps
    resample_threshold: float = 0.01  # latents firing below this fraction of samples
    grad_clip_norm: float = 1.0  # run 6
    skip_position: Literal["encoder", "output"] = "output"
    val_fraction: float = 0.1
    core_eval_texts: int = 4
    absorption_letters: str = "abcdefghijklmnopqrstuvwxyz"
    absorption_words_per_letter: int = 20
    probing_train_per_class: int = 20
    probing_test_per_class: int = 10
    checkpoint_every: int = 50
    dead_after_tokens: int = 50_000
    device: str = "auto"

    def check(self) -> None:
        """Impossible values stop here, before any compute."""
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ParamsError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
        require_non_empty(self, "variants", "seeds", "absorption_letters", "matryoshka_prefixes")
        require_unique(self, "variants", "absorption_letters", "matryoshka_prefixes")
        require_positive(self, "max_tokens", "context_length", "harvest_batch_size", "batch_size")
        require_positive(self, "d_sae", "epochs", "lr", "dead_after_tokens", "resort_every")
        require_positive(self, "resample_every", "soft_temperature", "grad_clip_norm")
        require_positive(self, "core_eval_texts", "probing_train_per_class")
        require_positive(self, "probing_test_per_class")
        require_non_negative(self, "checkpoint_every", "l1_coefficient", "auxk_alpha")
        require_non_negative(self, "max_norm_ratio")
        require_non_negative(self, "ordering_weight", "ramp_weight", "soft_weight", "soft_margin")
        require_fraction(self, "val_fraction")
        for name in ("warmup_fraction", "ramp_fraction", "resample_threshold"):
            if not 0 <= getattr(self, name) < 1:
                raise ParamsError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 1 <= self.k <= self.d_sae:
            raise ParamsError(f"k={self.k} must lie in 1..d_sae={self.d_sae}")
        if not all(1 <= m <= self.d_sae for m in self.matryoshka_prefixes):
            raise ParamsError(f"matryoshka_prefixes must lie in 1..d_sae={self.d_sae}")
        if not set(self.absorption_letters) <= set(string.ascii_lowercase):
            raise ParamsError(f"absorption_letters must be a-z, got {self.absorption_letters!r}")
        self.check_shared([self.d_sae] * (len(self.variants) * len(self.seeds)), "d_sae")

    def train_config(self, clip: bool = False, total_steps: int = 0) -> TrainConfig:
        return super().train_config(
            grad_clip_norm=self.grad_clip_norm if clip else None,  # runs 0-5 clip nothing
            warmup_steps=int(self.warmup_fraction * total_steps),
        )


# ------------------------------------------------------------------------------------ training


def load_data(params: FrequencyOrderingParams, progress: bool = True) -> SplitData:
    """Train and validation vectors, norm outliers left out of training (``max_norm_ratio``)."""
    return load_split(params, progress, max_norm_ratio=params.max_norm_ratio or None)


def spec_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def build_spec(params: FrequencyOrderingParams, name: str, seed: int, d_in: int, total: int):
    """The SAE and loss of one (variant, seed); the same seed gives the same initial weights."""
    variant = VARIANTS[name]
    generator = torch.Generator().manual_seed(seed)
    if variant.arch == "topk":
        sae = TopKSAE(TopKConfig(d_in, params.d_sae, params.k), generator=generator)
    else:
        config = ReLUConfig(
            d_in, params.d_sae, layer_norm=variant.layer_norm,
            skip=params.skip_position if variant.skip else "none", attention=variant.attention,
        )  # fmt: skip
        sae = ReLUSAE(config, generator=generator)
    labels = {"variant": name, "seed": seed}
    loss = _loss(params, variant, total)
    return SAESpec(spec_name(name, seed), sae, loss, params.sae_metadata(), labels=labels)


def _loss(params: FrequencyOrderingParams, variant: Variant, total: int):
    relu = variant.arch == "relu"
    if variant.ordering == "matryoshka":
        return MatryoshkaLoss(
            prefixes=tuple(params.matryoshka_prefixes),
            l1_coefficient=params.l1_coefficient if relu else 0.0,
            auxk_alpha=0.0 if relu else params.auxk_alpha,
        )
    if relu:
        base = L1Loss(params.l1_coefficient, adaptive=variant.adaptive_l1)
    else:
        base = TopKLoss(params.auxk_alpha)
    kinds = {"published": "published", "published_ramp": "published", "soft": "soft",
             "resort": "published"}  # fmt: skip
    if variant.ordering not in kinds:
        return base
    ramp = int(params.ramp_fraction * total) if variant.ordering == "published_ramp" else 0
    weight = {"published_ramp": params.ramp_weight, "resort": 0.0, "soft": params.soft_weight}.get(
        variant.ordering, params.ordering_weight
    )  # a re-sort only needs the frequency tracker
    return OrderingLoss(
        base, kind=kinds[variant.ordering], weight=weight, ramp_steps=ramp,
        temperature=params.soft_temperature, margin=params.soft_margin,
    )  # fmt: skip


def train_all(
    params: FrequencyOrderingParams, data: SplitData, checkpoint_dir: Path | None,
    hooks: tuple = (), progress: bool = True,
) -> list[TrainResult]:  # fmt: skip
    """Every (variant, seed) SAE: one pass over the data per training config (clipped or not)."""
    d_in = data.train.shape[1]
    total = params.train_config().total_steps(len(data.train))
    results = []
    for clip in (False, True):
        names = [name for name in params.variants if VARIANTS[name].clip == clip]
        if not names:
            continue
        specs = [build_spec(params, n, seed, d_in, total) for n in names for seed in params.seeds]
        config = params.train_config(clip=clip, total_steps=total)
        results += train_saes(
            specs, data.train, config, checkpoint_dir=checkpoint_dir,
            hooks=[*_variant_hooks(params, specs, data), *hooks], progress=progress,
        )  # fmt: skip
    return results


def _variant_hooks(params: FrequencyOrderingParams, specs: list, data: SplitData) -> list:
    """Resampling and re-sorting, each for the SAEs whose variant has it."""
    hooks = []
    resampled = [s.name for s in specs if VARIANTS[s.labels["variant"]].resample]
    if resampled:
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        every, threshold = params.resample_every, params.resample_threshold
        hook = ResampleDead(data.train[order[:4096]], every=every, threshold=threshold)
        hooks.append(for_models(resampled, hook))
    resorted = [s.name for s in specs if VARIANTS[s.labels["variant"]].ordering == "resort"]
    if resorted:
        hooks.append(for_models(resorted, ResortByFrequency(every=params.resort_every)))
    return hooks


# ---------------------------------------------------------------------------------- evaluation

EVAL_COLUMNS = {
    # column: (what, higher is better)
    "final_loss": ("final training loss (the original's scale)", False),
    "explained_variance": ("explained variance (core eval)", True),
    "mse": ("MSE (core eval)", False),
    "cosine_similarity": ("cosine similarity", True),
    "kl_div_score": ("KL-divergence score", True),
    "l0": ("L0", False),
    "dead_fraction": ("dead latents (core eval)", False),
    "spearman": ("Spearman(index, frequency) (-1: low indices fire most)", False),
    "out_of_order": ("adjacent pairs out of order", False),
    "code_path_ev": ("EV through the sparse code alone", True),
    "batch_dependence": ("batch dependence (mean relative change)", False),
    "absorption_rate": ("first-letter absorption rate", False),
    "n_split": ("split features per letter", False),
    "tpp_score": ("targeted probe perturbation score (5 latents)", True),
    "weight_change_vs_base": ("largest weight change vs the same SAE without the penalty", False),
}
METRICS = list(EVAL_COLUMNS)
TPP_LATENTS = 5  # latents ablated per topic in targeted probe perturbation


def eval_configs(params: FrequencyOrderingParams):
    from saelib.evals.tpp import TPPConfig

    tpp = TPPConfig(
        n_latents=(TPP_LATENTS,),
        n_train_per_class=params.probing_train_per_class,
        n_test_per_class=params.probing_test_per_class,
        context_length=params.context_length,
    )
    return core_eval_config(params), absorption_config(params), tpp


def prepare_evals(params: FrequencyOrderingParams, val: torch.Tensor) -> EvalContext:
    return prepare_lm_evals(params, val, eval_configs(params)[2].probing_config())


def evaluate_all(
    params: FrequencyOrderingParams, results: list[TrainResult], context: EvalContext,
    eval_dir: Path | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Every eval on every trained SAE: one row per (variant, seed); diverged SAEs stay NaN."""
    from saelib.evals.absorption import absorption_from_data
    from saelib.evals.core import run_core_eval_many
    from saelib.evals.encoder_honesty import batch_dependence, code_path_explained_variance
    from saelib.evals.ordering import (
        fraction_out_of_order,
        index_frequency_spearman,
        latent_frequency,
    )
    from saelib.evals.tpp import run_tpp

    core_config, absorption_config, tpp_config = eval_configs(params)
    trained = [result for result in results if result.status != "diverged"]
    twins = same_weights(trained)
    by_name = {result.name: result for result in trained}
    unique = {r.name: r.sae for r in trained if twins[r.name] == r.name}
    core = run_core_eval_many(unique, context.lm, params.layer, core_config)
    lm_evals = {}
    for name, sae in unique.items():
        absorption = absorption_from_data(sae, context.absorption, absorption_config, False)
        tpp = run_tpp(sae, context.lm, params.layer, tpp_config, data=context.probing)
        lm_evals[name] = absorption, tpp
        if eval_dir is not None:
            for kind, output in (("core", core[name]), ("absorption", absorption), ("tpp", tpp)):
                output.save(eval_dir / f"{name}.{kind}.json")
    rows = [result.labels | {"status": "diverged"} for result in results
            if result.status == "diverged"]  # fmt: skip
    for result in trained:
        sae, twin = result.sae, twins[result.name]
        (absorption, tpp), scores = lm_evals[twin], core[twin]
        frequency = latent_frequency(sae, context.val)
        rows.append(result.labels | {
            "final_loss": result.history[-1]["total"] if result.history else float("nan"),
            "explained_variance": scores.explained_variance,
            "mse": scores.mse,
            "cosine_similarity": scores.cosine_similarity,
            "kl_div_score": scores.kl_div_score,
            "l0": scores.l0,
            "dead_fraction": scores.dead_fraction,
            "spearman": index_frequency_spearman(frequency),
            "out_of_order": fraction_out_of_order(frequency),
            "code_path_ev": code_path_explained_variance(sae, context.val),
            "batch_dependence": batch_dependence(sae, context.val).mean_relative_change,
            "absorption_rate": absorption.mean_absorption_rate,
            "n_split": absorption.mean_n_split,
            "tpp_score": tpp.mean_score[TPP_LATENTS],
            "status": result.status,
            "same_weights_as": None if twin == result.name else twin,
            "weight_change_vs_base": weight_change_vs_base(result, by_name),
        })  # fmt: skip
    table = pd.DataFrame(rows)
    present = [column for column in METRICS if column in table]
    table[present] = table[present].astype(float)  # an eval without a value gives None: NaN
    return table


def same_weights(results: list[TrainResult]) -> dict[str, str]:
    """{name: the first SAE (in order) whose weights are bit-identical to it, itself if none}.
    Identical weights give identical language-model evals, so those run once per group (runs 2
    and 3 of the original train exactly as its baseline: the study shows it and saves the work).
    """
    first_with: dict[str, str] = {}
    return {r.name: first_with.setdefault(weights_digest(r.sae), r.name) for r in results}


def base_variant(name: str) -> str | None:
    """The variant that differs from ``name`` only by having no published penalty (run 0 for
    runs 2 and 3, topk_none for topk_published); None for any other variant."""
    variant = VARIANTS[name]
    if variant.ordering not in ("published", "published_ramp"):
        return None
    return ALIASES.get(_first_name(dataclasses.replace(variant, ordering="none")))


def _first_name(variant: Variant) -> str | None:
    return next((name for name, kept in VARIANTS.items() if kept == variant), None)


def weight_change_vs_base(result: TrainResult, by_name: dict[str, TrainResult]) -> float:
    """Largest |weight difference| to the same seed's :func:`base_variant`, relative to the
    largest |weight| (0 when bit-identical); NaN without a base variant or when it diverged."""
    base = base_variant(result.labels["variant"])
    twin = by_name.get(spec_name(base, result.labels["seed"])) if base else None
    if twin is None:
        return float("nan")
    mine, theirs = result.sae.state_dict(), twin.sae.state_dict()
    largest = max(float(tensor.abs().max()) for tensor in theirs.values())
    change = max(float((mine[key] - theirs[key]).abs().max()) for key in theirs)
    return change / max(largest, 1e-30)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, by name, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frequencies(results: list[TrainResult], val: torch.Tensor, seed: int) -> dict[str, Any]:
    """Each variant's latent frequencies on validation vectors (one seed), for the figures."""
    from saelib.evals.ordering import latent_frequency

    return {
        result.labels["variant"]: latent_frequency(result.sae, val).cpu().numpy()
        for result in results
        if result.labels["seed"] == seed and result.status != "diverged"
    }


def summarize(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per variant, in the order of VARIANTS."""
    summary = summarize_seeds(per_seed, "variant", METRICS)
    return summary.loc[[name for name in VARIANTS if name in summary.index]]


def table(summary: pd.DataFrame, runs: dict[str, Variant]) -> pd.DataFrame:
    """The summary rows of one set of runs (cumulative, ablation or ordering), by their names."""
    rows = {name: ALIASES[name] for name in runs if ALIASES[name] in summary.index}
    chosen = summary.loc[list(rows.values())]
    chosen.index = pd.Index(list(rows), name="run")
    return chosen


# ------------------------------------------------------------------------------------ claims


def check_claims(summary: pd.DataFrame) -> list[Claim]:
    """The original's claims, each judged on our seed means against the seed spread."""
    claims = [
        _claim_published_orders(summary),
        _claim_ramp_changes(summary),
        _claim_encoder_gains(summary),
        _claim_code_carries(summary),
        _claim_absorption_same(summary),
        _claim_differentiable_orders(summary),
    ]
    return [claim for claim in claims if claim is not None]


def _has(summary: pd.DataFrame, *names: str) -> bool:
    return all(ALIASES.get(name, name) in summary.index for name in names)


def _row(summary: pd.DataFrame, name: str, metric: str) -> float:
    return float(summary.loc[ALIASES.get(name, name), f"{metric}_mean"])


def _versus(summary, metric, reference, runs):
    indexed = summary.rename(index={ALIASES.get(n, n): n for n in [reference, *runs]})
    return compare_to_reference(indexed, metric, reference, runs)


def _claim_published_orders(summary) -> Claim | None:
    if not _has(summary, "run0", "run2"):
        return None
    [rho] = _versus(summary, "spearman", "run0", ["run2"])
    [ev] = _versus(summary, "explained_variance", "run0", ["run2"])
    holds = rho.difference < -rho.spread
    evidence = (f"Spearman(index, frequency) run2 - run0: {rho.difference:+.4f} (spread "
                f"{rho.spread:.4f}); EV difference {ev.difference:+.5f}; "
                f"{_weight_change(summary, 'run2')}: the published penalty is computed from "
                "no-grad counts")  # fmt: skip
    return Claim("The ordering penalty (run 2) makes low indices fire more", holds, evidence, 1)


def _claim_ramp_changes(summary) -> Claim | None:
    if not _has(summary, "run2", "run3"):
        return None
    comparisons = [c for metric in ("explained_variance", "spearman", "l0")
                   for c in _versus(summary, metric, "run2", ["run3"])]  # fmt: skip
    holds = any(c.beyond_spread for c in comparisons)
    evidence = (
        "run3 - run2: "
        + "; ".join(f"{c.metric} {c.difference:+.2e} (spread {c.spread:.2e})" for c in comparisons)
        + f"; {_weight_change(summary, 'run3')}"
    )
    return Claim("Ramping the ordering penalty (run 3) changes training", holds, evidence, 2)


def _weight_change(summary: pd.DataFrame, name: str) -> str:
    """How far ``name``'s weights are from run 0's (same seed), for the evidence."""
    column = "weight_change_vs_base_mean"
    change = float(summary.loc[name, column]) if column in summary else float("nan")
    if change != change:  # NaN: not measured
        return f"{name}'s weights not compared with run0's"
    if change == 0:
        return f"{name}'s weights are bit-identical to run0's"
    return (
        f"{name}'s weights differ from run0's by {change:.1e} of the largest weight (seed mean "
        "of the largest difference; float rounding of multi-threaded CPU kernels: two trainings "
        "of one SAE differ as much; single-threaded they are bit-identical)"
    )


def _claim_encoder_gains(summary) -> Claim | None:
    steps = [("run6", "run7"), ("run7", "run8"), ("run8", "run9")]
    if not _has(summary, *[name for pair in steps for name in pair]):
        return None
    parts, gains = [], []
    for before, after in steps:
        [c] = _versus(summary, "kl_div_score", before, [after])
        gains.append(c.difference > c.spread)
        parts.append(f"{after} - {before} KL score {c.difference:+.4f} (spread {c.spread:.4f})")
    holds = gains[0] and gains[1]
    statement = "LayerNorm (run 7) and the skip connection (run 8) improve reconstruction"
    return Claim(statement, holds, "; ".join(parts), 3)


def _claim_code_carries(summary) -> Claim | None:
    if not _has(summary, "run8"):
        return None
    full, code = _row(summary, "run8", "explained_variance"), _row(summary, "run8", "code_path_ev")
    holds = code >= full - 0.05
    evidence = (f"run8: EV {full:.4f} with the skip, {code:.4f} through the sparse code alone "
                f"(validation vectors)")  # fmt: skip
    return Claim("The gains of run 8 come from the sparse code", holds, evidence, 4)


def _claim_absorption_same(summary) -> Claim | None:
    runs = [name for name in CUMULATIVE if _has(summary, name)]
    if len(runs) < 2:
        return None
    comparisons = _versus(summary, "absorption_rate", runs[0], runs[1:])
    holds = not any(c.beyond_spread for c in comparisons)
    statement = "Absorption is the same for every run (the original: 0.010 throughout)"
    return Claim(statement, holds, describe(comparisons), 5)


def _claim_differentiable_orders(summary) -> Claim | None:
    pairs = [(base, soft) for base, soft in (("relu_none", "relu_soft"), ("topk_none", "topk_soft"))
             if _has(summary, base, soft)]  # fmt: skip
    if not pairs:
        return None
    holds, parts = True, []
    for base, soft in pairs:
        [rho] = _versus(summary, "spearman", base, [soft])
        [ev] = _versus(summary, "explained_variance", base, [soft])
        holds &= rho.difference < -rho.spread and ev.difference >= -max(0.01, ev.spread)
        l0 = _versus(summary, "l0", base, [soft]) if "l0_mean" in summary else []
        parts.append(
            f"{soft} - {base}: Spearman {rho.difference:+.4f} (spread {rho.spread:.4f}), EV "
            f"{ev.difference:+.4f} (spread {ev.spread:.4f})"
            + "".join(f", L0 {c.difference:+.1f}" for c in l0)
        )
    statement = ("(ours) A differentiable ordering penalty orders latents at no cost to "
                 "reconstruction (EV lower by at most 0.01), on ReLU and TopK SAEs")  # fmt: skip
    return Claim(statement, holds, "; ".join(parts), 6)


# ------------------------------------------------------------------------ results and record


def write_results(
    run_dir: Path,
    params: FrequencyOrderingParams,
    data: SplitData,
    per_seed: pd.DataFrame,
    summary: pd.DataFrame,
    seconds: dict[str, float],
) -> StudyResults:
    """Judge the claims and write ``results.json`` into ``run_dir``."""
    results = StudyResults.from_tables(
        STUDY.name, params, per_seed, summary,
        claims=check_claims(summary),
        seconds=seconds,
        extra={"n_train_vectors": len(data.train), "n_val_vectors": len(data.val),
               "aliases": ALIASES},
    )  # fmt: skip
    results.save(run_dir)
    return results


def headlines(results: dict[str, Any]) -> dict[str, Headline]:
    """The index page's numbers: ordering of the baseline against the best method, claims."""
    rows = {row["variant"]: row for row in results["summary"]}
    numbers = {}
    if rows:
        best = min(rows.values(), key=lambda row: as_float(row["spearman_mean"]))
        numbers["best ordering"] = Headline(
            f"{best['variant']}: ρ {as_float(best['spearman_mean']):.2f}",
            "lowest Spearman(index, frequency): low indices fire most",
        )
    numbers["claims held"] = claims_held(results["claims"])
    return numbers


STUDY = Study(
    name="frequency_ordering",
    params_class=FrequencyOrderingParams,
    description="frequency ordering of latents: the original's runs, an ablation, 4 methods",
    headlines=headlines,
    key_params=("model", "layer", "dataset", "max_tokens", "d_sae", "k", "seeds", "epochs"),
    controls=("run0", "relu_none", "topk_none"),
    data_parallel=False,  # the ordering losses count firing within a batch
)
