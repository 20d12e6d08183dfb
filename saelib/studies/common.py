"""What the study params have in common: where the SAEs read and how they train."""

from __future__ import annotations

from saelib.activations import HarvestConfig
from saelib.train import TrainConfig


class SAEStudyParams:
    """Mixin for a study's params dataclass with the usual model, data and training fields.

    Studies without a ``positions`` field harvest at every token.
    """

    def sae_metadata(self) -> dict:
        """Where the SAEs read their input; stored in every checkpoint."""
        return {"model": self.model, "layer": self.layer, "dataset": self.dataset}

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
