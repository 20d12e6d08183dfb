"""Feature statistics on disk, beside the checkpoint they describe.

``save_feature_stats`` writes ``stats.safetensors`` (the tensors) and ``stats.json`` (config,
vocabulary, metadata) into one folder, replaced as a whole so a reader never pairs the tensors
of one computation with the JSON of another. ``feature_stats_for_checkpoint`` reuses
``<checkpoint>/feature_stats/`` while it matches the SAE weights, the activations and the
config, and otherwise computes and saves them. ``checkpoint_harvest_config`` names the
activations a checkpoint was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelib.activations import ActivationSet, HarvestConfig, harvest
from saelib.assets import sha256_of
from saelib.features.stats import (
    STATS_FORMAT,
    FeatureStats,
    FeatureStatsConfig,
    compute_feature_stats,
    rows_digest,
)
from saelib.io import atomic_folder
from saelib.saes.formats import load_any, weights_file

STATS_FOLDER = "feature_stats"  # inside a checkpoint folder


def save_feature_stats(stats: FeatureStats, folder: str | Path) -> Path:
    """Write ``stats.safetensors`` + ``stats.json`` into ``folder``, replacing it atomically."""
    info = {
        "format": STATS_FORMAT,
        "config": asdict(stats.config),
        "n_vectors": stats.n_vectors,
        "vocab": {str(token): text for token, text in stats.vocab.items()},
        "metadata": stats.metadata,
    }
    with atomic_folder(folder) as staging:
        save_file(_tensors(stats), str(staging / "stats.safetensors"))
        (staging / "stats.json").write_text(json.dumps(info, indent=1, default=str))
    return Path(folder)


def _tensors(stats: FeatureStats) -> dict[str, Tensor]:
    return {
        item.name: value.detach().cpu().contiguous()
        for item in fields(stats)
        if isinstance(value := getattr(stats, item.name), Tensor)
    }


def load_feature_stats(folder: str | Path) -> FeatureStats:
    """Read what :func:`save_feature_stats` wrote."""
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


def checkpoint_harvest_config(
    metadata: dict,
    *,
    run_dir: str | Path | None = None,
    max_tokens: int | None = None,
    positions: str | None = None,
) -> HarvestConfig:
    """The activations to compute an SAE's statistics on: by default those it was trained on.

    ``metadata`` is the checkpoint's (``sae.metadata``); checkpoints record their harvest under
    ``"harvest"`` (:meth:`HarvestConfig.to_dict`). Older checkpoints do not, so for them it is
    guessed: see :func:`_guessed_harvest_config`. ``max_tokens`` and ``positions`` override
    either (e.g. statistics on fewer vectors than the SAE was trained on).
    """
    if "harvest" in metadata:
        config = HarvestConfig.from_dict(metadata["harvest"])
    else:
        config = _guessed_harvest_config(metadata, run_dir)
    changes = {"max_tokens": max_tokens, "positions": positions}
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def _guessed_harvest_config(metadata: dict, run_dir: str | Path | None) -> HarvestConfig:
    """For checkpoints that predate the recorded harvest: model, layer and dataset from the
    metadata; positions, max_tokens and context_length from the run's ``params.yaml`` when
    ``run_dir`` has one; :class:`HarvestConfig` defaults for the rest."""
    missing = [key for key in ("model", "layer", "dataset") if key not in metadata]
    if missing:
        raise ValueError(f"SAE metadata lacks {missing}: pass the activations explicitly")
    params = {}
    if run_dir is not None and (Path(run_dir) / "params.yaml").exists():
        params = yaml.safe_load((Path(run_dir) / "params.yaml").read_text()) or {}
    keys = ("positions", "max_tokens", "context_length")
    return HarvestConfig(
        model=metadata["model"],
        layer=int(metadata["layer"]),
        dataset=metadata["dataset"],
        **{key: params[key] for key in keys if key in params},
    )


def feature_stats_for_checkpoint(
    checkpoint_folder: str | Path,
    activations: ActivationSet | None = None,
    lm=None,
    config: FeatureStatsConfig = FeatureStatsConfig(),  # noqa: B008 (frozen: safe default)
    progress: bool = True,
    device: str = "cpu",
) -> FeatureStats:
    """Stats of the SAE in ``checkpoint_folder`` (saelib's checkpoint or another library's
    format: :func:`saelib.saes.formats.load_any`), cached in ``<checkpoint>/feature_stats/``.

    The cache is used when it was made with the same ``config``, the same SAE weights (sha256 of
    its weights file), the same activation cache key and, when ``activations`` are passed, the
    same rows. Otherwise the stats are computed and saved. Without ``activations`` they are
    harvested with :func:`checkpoint_harvest_config` (only if the cache misses); without ``lm``
    the activations' model is loaded (:func:`saelib.lm.load_lm`, cached per process). The SAE
    is loaded on ``device`` for the encoder pass.
    """
    folder = Path(checkpoint_folder)
    sae = load_any(folder, device=device)
    harvest_config = activations.config if activations is not None else None
    harvest_config = harvest_config or checkpoint_harvest_config(sae.metadata)
    expected = {
        "stats_format": STATS_FORMAT,
        "sae_sha256": sha256_of(weights_file(folder)),
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
    stats.metadata.update(expected, checkpoint=str(folder.resolve()))
    save_feature_stats(stats, folder / STATS_FOLDER)
    return stats


def _cached_stats(folder: Path, config: FeatureStatsConfig, expected: dict) -> FeatureStats | None:
    """The stats in ``folder`` if they were made with ``config`` and match ``expected``."""
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
