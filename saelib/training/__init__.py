"""Training: one loop for every model, its losses and penalties, checkpoints and resume."""

from saelib.training import distributed
from saelib.training.bsa import BSALoss, anneal_progress
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
from saelib.training.matryoshka import MatryoshkaLoss
from saelib.training.ordering import FrequencyTracker, OrderingLoss, ResortByFrequency
from saelib.training.resampling import ResampleDead

__all__ = [
    "AuxKCapable",
    "BSALoss",
    "CheckpointMismatchError",
    "FrequencyTracker",
    "L1Loss",
    "Loss",
    "MatryoshkaLoss",
    "OrderingLoss",
    "ResampleDead",
    "ResortByFrequency",
    "SAESpec",
    "StepInfo",
    "TopKLoss",
    "TrainConfig",
    "TrainResult",
    "TrainSpec",
    "TrainState",
    "anneal_progress",
    "distributed",
    "for_models",
    "make_optimizer",
    "pick_device",
    "tensor_fingerprint",
    "train_saes",
]
