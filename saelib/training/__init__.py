"""Training: one loop for every model, its losses and penalties, checkpoints and resume."""

from saelib.training.checkpoints import CheckpointMismatchError
from saelib.training.l1 import L1Loss
from saelib.training.loop import (
    SAESpec,
    StepInfo,
    TrainConfig,
    TrainResult,
    TrainSpec,
    for_models,
    make_optimizer,
    pick_device,
    tensor_fingerprint,
    train_saes,
)
from saelib.training.losses import AuxKCapable, Loss, TopKLoss, TrainState

__all__ = [
    "AuxKCapable",
    "CheckpointMismatchError",
    "L1Loss",
    "Loss",
    "SAESpec",
    "StepInfo",
    "TopKLoss",
    "TrainConfig",
    "TrainResult",
    "TrainSpec",
    "TrainState",
    "for_models",
    "make_optimizer",
    "pick_device",
    "tensor_fingerprint",
    "train_saes",
]
