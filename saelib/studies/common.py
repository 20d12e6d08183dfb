"""What the SAE studies have in common: where the SAEs read, how they train, the train/validation
data, and the checks every study runs before any compute (seeds, device, dataset, layer, memory)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelib.activations import ActivationSet, HarvestConfig, harvest
from saelib.data import DATASET_SUFFIXES, EMBEDDED_DATASETS
from saelib.params import ParamsError, require_layer_in_model, require_unique
from saelib.training import TrainConfig

# A value ending in one of these names a file, never a Hugging Face dataset.
FILE_SUFFIXES = (*DATASET_SUFFIXES, ".gz", ".csv", ".tsv", ".parquet", ".arrow", ".zip")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # name or owner/name
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
DENSE_COPIES = 4  # copies of one batch's dense (batch, d_sae) latents alive in a training step
GIB = 2**30


class SAEStudyParams:
    """Mixin for a study's params dataclass with the usual model, data and training fields.

    Studies without a ``positions`` field harvest at every token.
    """

    def check_shared(self, d_saes: Sequence[int], size_name: str) -> None:
        """The checks every study shares, cheapest first; the model's config is read, not its
        weights. ``d_saes`` holds the latent size of every SAE the study trains, and
        ``size_name`` the parameter that sets them (named when they cannot fit in memory).

        A relative path to a local dataset file is made absolute, since the notebook runs in
        another working directory.
        """
        require_unique(self, "seeds")  # a repeated seed trains the same SAE twice
        check_seed_range(self.seeds)
        check_device(self.device)
        self.dataset = check_dataset(self.dataset)
        require_layer_in_model(self.model, self.layer)
        check_memory(self, d_saes, size_name)

    def sae_metadata(self) -> dict:
        """Where the SAEs read their input, with the full harvest; stored in every checkpoint."""
        harvest = self.harvest_config().to_dict()
        return {"model": self.model, "layer": self.layer, "dataset": self.dataset,
                "harvest": harvest}  # fmt: skip

    def harvest_config(self) -> HarvestConfig:
        return HarvestConfig(
            model=self.model,
            layer=self.layer,
            dataset=self.dataset,
            positions=getattr(self, "positions", "all"),
            max_tokens=self.max_tokens,
            context_length=self.context_length,
            batch_size=self.harvest_batch_size,
        )

    def train_config(self, **overrides) -> TrainConfig:
        common = dict(
            lr=self.lr,
            batch_size=self.batch_size,
            epochs=self.epochs,
            device=self.device,
            dead_after_tokens=self.dead_after_tokens,
            checkpoint_every=self.checkpoint_every,
        )
        return TrainConfig(**(common | overrides))


@dataclass
class SplitData:
    """The harvested activations, split by document into training and validation vectors."""

    activations: ActivationSet
    train: torch.Tensor
    val: torch.Tensor
    n_dropped: int = 0  # training vectors left out as norm outliers (see load_split)


def load_split(
    params: SAEStudyParams, progress: bool = True, max_norm_ratio: float | None = None
) -> SplitData:
    """Harvest (or read from the cache) and split by document into train and validation.

    With ``max_norm_ratio``, training vectors whose norm exceeds that many times the median
    training norm are left out of ``train`` (validation keeps every vector). A few tokens carry
    "massive activations" (Sun et al. 2024): on SmolLM2-135M one vector in ~18,000 has a
    residual norm ~19x the median, and one such row in a batch can blow up an unclipped step.
    """
    activations = harvest(params.harvest_config(), progress=progress)
    train_rows, val_rows = activations.split_by_document(params.val_fraction, seed=0)
    train, n_dropped = activations.acts[train_rows], 0
    if max_norm_ratio:
        train, n_dropped = drop_norm_outliers(train, max_norm_ratio)
    return SplitData(activations, train, activations.acts[val_rows], n_dropped)


def drop_norm_outliers(vectors: torch.Tensor, max_ratio: float) -> tuple[torch.Tensor, int]:
    """(the rows whose norm is at most ``max_ratio`` times the median norm, how many were not)."""
    norms = vectors.float().norm(dim=1)
    kept = norms <= max_ratio * norms.median()
    return vectors[kept], int((~kept).sum())


@dataclass
class EvalContext:
    """Language-model work shared by every SAE of a study (same model and layer): the model,
    validation vectors, the absorption eval's words and the probing eval's pooled texts."""

    lm: Any
    val: torch.Tensor
    absorption: Any  # saelib.evals.absorption.AbsorptionData
    probing: Any  # saelib.evals.sparse_probing.ProbingData


def core_eval_config(params: SAEStudyParams):
    from saelib.evals.core import CoreEvalConfig

    return CoreEvalConfig(n_texts=params.core_eval_texts, context_length=params.context_length)


def absorption_config(params: SAEStudyParams):
    """First-letter absorption on up to ``absorption_words_per_letter`` words per letter; letters
    with fewer than 20 (or all of them, when fewer are asked for) are dropped."""
    from saelib.evals.absorption import AbsorptionConfig

    return AbsorptionConfig(
        letters=params.absorption_letters,
        max_words_per_letter=params.absorption_words_per_letter,
        min_words_per_letter=min(20, params.absorption_words_per_letter),
    )


def prepare_lm_evals(params: SAEStudyParams, val: torch.Tensor, probing_config) -> EvalContext:
    """Load the model and do the absorption and probing evals' language-model work once."""
    from saelib.evals.absorption import prepare_absorption
    from saelib.evals.sparse_probing import prepare_probing_data
    from saelib.lm import load_lm

    lm = load_lm(params.model)
    absorption = prepare_absorption(lm, params.layer, absorption_config(params))
    probing = prepare_probing_data(lm, params.layer, probing_config)
    return EvalContext(lm, val, absorption, probing)


def check_seed_range(seeds: Sequence[int]) -> None:
    """Seeds that torch.Generator.manual_seed accepts."""
    bad = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad:
        raise ParamsError(f"seeds must lie in 0..2**64-1, got {bad[0]}")


def check_device(device: str) -> None:
    """One of auto, cpu, cuda, cuda:N, mps; a GPU that is not there is refused now."""
    if not DEVICE.fullmatch(device):
        raise ParamsError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ParamsError(
                f"device={device!r} is not available: torch sees {count} CUDA device(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ParamsError("device='mps' is not available: torch sees no MPS device")


def check_dataset(dataset: str) -> str:
    """The dataset as ``saelib.data.load_documents`` will find it (a local file's path made
    absolute), or a params error naming ``dataset`` when it cannot be found."""
    if dataset in EMBEDDED_DATASETS:
        return dataset
    path = Path(dataset).expanduser()
    if path.exists():
        if not (path.is_file() and path.name.endswith(DATASET_SUFFIXES)):
            kinds = ", ".join(DATASET_SUFFIXES)
            raise ParamsError(f"dataset: {dataset} is not a {kinds} file")
        return str(path.absolute())
    if _looks_like_path(dataset):
        raise ParamsError(f"dataset: file {dataset} does not exist")
    embedded = ", ".join(EMBEDDED_DATASETS)
    if not HUB_NAME.fullmatch(dataset):
        raise ParamsError(
            f"dataset={dataset!r} is neither embedded ({embedded}), an existing file, "
            "nor a Hugging Face dataset name"
        )
    if not _datasets_installed():
        raise ParamsError(
            f"dataset={dataset!r} is neither embedded ({embedded}) nor a local file; loading "
            "it from the Hugging Face hub needs `pip install datasets`"
        )
    return dataset


def _looks_like_path(value: str) -> bool:
    first = Path(value).parts[0] if Path(value).parts else ""
    return (
        value.startswith((".", "/", "~"))
        or value.lower().endswith(FILE_SUFFIXES)
        or (os.sep in value and Path(first).is_dir())
    )


def _datasets_installed() -> bool:
    return importlib.util.find_spec("datasets") is not None


def training_bytes(d_in: int, d_saes: Sequence[int], batch_size: int, max_tokens: int) -> int:
    """float32 bytes that training needs at its peak, all SAEs training at once.

    Per SAE: encoder and decoder weights (2 * d_in * d_sae values), their gradients and two
    Adam moments, so four times that. The SAEs step one after another, so only one batch of
    dense latents is alive at a time. The harvested activations (max_tokens, d_in) stay in memory.
    """
    weights = sum(2 * d_in * d_sae for d_sae in d_saes)
    latents = DENSE_COPIES * min(batch_size, max_tokens) * max(d_saes, default=0)
    return 4 * (4 * weights + latents + max_tokens * d_in)


def available_bytes(device: str) -> tuple[int | None, str]:
    """(free bytes, where) on the device training will use; None when it cannot be read."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free on {device}"
    return _available_ram(), "of available memory"


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


def check_memory(params, d_saes: Sequence[int], size_name: str) -> None:
    """Refuse, before harvesting, SAEs whose training cannot fit in the device's free memory."""
    from saelib.lm import hidden_size

    available, where = available_bytes(params.device)
    if available is None:
        return
    d_in = hidden_size(params.model)
    needed = training_bytes(d_in, d_saes, params.batch_size, params.max_tokens)
    if needed <= available:
        return
    activations = 4 * params.max_tokens * d_in
    name = "max_tokens" if activations > available else size_name
    raise ParamsError(
        f"{name}={getattr(params, name)}: training {len(d_saes)} SAE(s) on d_in={d_in} needs "
        f"about {needed / GIB:,.1f} GiB, but only {available / GIB:,.1f} GiB {where}"
    )
