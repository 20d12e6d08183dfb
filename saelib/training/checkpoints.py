"""Training checkpoints: what a model was trained on, written so a crash never tears one.

A checkpoint is a folder ``<checkpoint_dir>/<name>`` with the model's weights, ``config.json``
(metadata, labels, training status and the identity below), ``trainer_state.pt`` (optimizer,
scheduler, loss state, ...) and ``history.json``. An SAE is saved by ``SAE.save``
(``sae.safetensors``, readable by :func:`saelib.saes.load_sae`); any other model as its
``state_dict`` in ``model.safetensors``.

The identity records what the weights depend on (the model's configuration, a fingerprint of
the data, the training config, the loss); resuming with anything else is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from saelib.io import atomic_folder, recover_folder, write_json, write_with
from saelib.saes import SAE, load_sae

MODEL_WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume from was trained on something else."""


def checkpoint_identity(model: nn.Module, loss: Any, train_config: dict, data_key: str) -> dict:
    """What a checkpoint was trained on, as plain JSON values (compared when resuming)."""
    identity = model_identity(model) | {
        "data_key": data_key,
        "train_config": train_config,
        "loss": describe(loss),
    }
    return json.loads(json.dumps(identity))


def model_identity(model: nn.Module) -> dict:
    """An SAE by its architecture and config; another model by its class, its config when it
    has a dataclass one, and the shapes of its state."""
    if isinstance(model, SAE):
        return {"sae": {"architecture": model.architecture, **dataclasses.asdict(model.config)}}
    described: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        described["config"] = dataclasses.asdict(config)
    described["shapes"] = {name: list(value.shape) for name, value in model.state_dict().items()}
    return {"model": described}


def describe(value: Any) -> Any:
    """A loss (or part of one) as its type and settings; functions and private state left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        settings = {
            item.name: describe(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if not item.name.startswith("_")
        }
        return {"type": type(value).__name__} | {
            key: described for key, described in settings.items() if described is not None
        }
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [describe(item) for item in value]
    return None if callable(value) else type(value).__name__


def save_checkpoint(
    target: Path, model: nn.Module, config: dict, trainer_state: dict, history: list[dict]
) -> None:
    """Write into a staging folder, then swap it in: a crash never leaves a torn checkpoint."""
    with atomic_folder(target) as staging:
        _save_model(model, staging, config)
        torch.save(trainer_state, staging / TRAINER_STATE)
        write_json(staging / "history.json", history, indent=None)


def load_checkpoint(
    target: Path, model: nn.Module, identity: dict, device: torch.device
) -> tuple[dict, list[dict]] | None:
    """Load the weights into ``model``; return (trainer state, history), or None when there is
    no checkpoint. Refuses one trained on something else."""
    if not (target / TRAINER_STATE).exists():
        return None
    check_identity(target, identity)
    _load_weights(target, model, device)
    state = torch.load(target / TRAINER_STATE, map_location=device, weights_only=True)
    return state, json.loads((target / "history.json").read_text())


def recover_interrupted_save(folder: Path, name: str) -> None:
    """Clean up after a crash mid-save: drop partial copies, restore a swapped-out checkpoint."""
    recover_folder(folder / name)


def check_identity(target: Path, identity: dict) -> None:
    stored = json.loads((target / "config.json").read_text()).get("identity")
    if stored is None:
        raise CheckpointMismatchError(
            f"checkpoint {target} does not record what it was trained on; "
            "resume from it is unsafe: use another checkpoint_dir or resume=False"
        )
    differences = _differences(stored, identity)
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {target} was trained on something else ({'; '.join(differences[:4])}): "
            "use another checkpoint_dir or resume=False"
        )


def _save_model(model: nn.Module, folder: Path, config: dict) -> None:
    if isinstance(model, SAE):
        model.save(folder, extra=config)
        return
    folder.mkdir(parents=True, exist_ok=True)
    # copies: tied weights share storage, which safetensors refuses
    tensors = {
        name: value.detach().to("cpu", copy=True).contiguous()
        for name, value in model.state_dict().items()
    }
    write_with(folder / MODEL_WEIGHTS, lambda path: save_file(tensors, str(path)))
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    write_json(folder / "config.json", {"model_class": model_class} | config)


def _load_weights(target: Path, model: nn.Module, device: torch.device) -> None:
    if isinstance(model, SAE):
        model.load_state_dict(load_sae(target, device).state_dict())
    else:
        model.load_state_dict(load_file(target / MODEL_WEIGHTS, device=str(device)))


def _differences(stored: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        keys = sorted(set(stored) | set(current))
        nested = [_differences(stored.get(k), current.get(k), f"{path}{k}.") for k in keys]
        return [difference for group in nested for difference in group]
    if stored != current:
        return [f"{path.rstrip('.')}: {stored!r} then, {current!r} now"]
    return []
