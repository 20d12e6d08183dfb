"""Training: one loop for every model, its losses and penalties, checkpoints and resume."""

from saelib.training.loop import (
    CheckpointMismatchError,
    SAESpec,
    TrainConfig,
    TrainResult,
    pick_device,
    tensor_fingerprint,
    train_saes,
)

__all__ = [
    "CheckpointMismatchError",
    "SAESpec",
    "TrainConfig",
    "TrainResult",
    "pick_device",
    "tensor_fingerprint",
    "train_saes",
]
