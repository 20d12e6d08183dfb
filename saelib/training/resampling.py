"""Dead-latent resampling (Anthropic, "Towards Monosemanticity", April 2023), as a training hook.

Every ``every`` steps, :class:`ResampleDead` finds the latents that fire on fewer than
``threshold`` of the ``inputs`` rows and re-initialises each from an input the SAE reconstructs
badly:

1. each input's reconstruction loss ||x - x_hat||^2 is computed on ``inputs``;
2. inputs are drawn with probability proportional to loss^2 (without replacement while enough
   inputs have a non-zero loss), one per resampled latent;
3. the latent's decoder row becomes the unit vector along (x - b_dec), its encoder row that unit
   vector times 0.2 times the mean norm of the alive latents' encoder rows, its encoder bias 0;
4. Adam's moments (exp_avg, exp_avg_sq) of exactly those rows of W_enc, b_enc and W_dec are
   zeroed, so that the optimizer's memory of the dead latent does not push the new one back;
   the loop's dead-latent counter restarts for them.

Firing is measured by encoding ``inputs`` with the weights at resampling time. A hook does not
see the training batches, and the loop's ``tokens_since_fired`` only says whether a latent fired
at all lately, not on what fraction of samples, so a fraction since the last resample cannot be
counted exactly from it; on a fixed, seeded sample of inputs the fraction is exact and the same
on every run and resume. A larger ``inputs`` sample resolves smaller thresholds (a latent must
fire on at least ``threshold * len(inputs)`` rows to be kept).

Works for any SAE with ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` whose output has ``fired``
information (``ReLUSAE``, ``TopKSAE``); other per-latent parameters (a ReLU SAE's encoder skip
or attention value rows) are left as they are. The draws are seeded by (``seed``, step), so
training with resampling is deterministic, and a resumed run resamples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.training.loop import StepInfo, TrainResult

__all__ = ["ResampleDead", "Resampled", "firing_fraction", "input_losses", "step_generator"]

ENCODER_SCALE = 0.2  # new encoder rows: 0.2 x the mean norm of the alive encoder rows


@dataclass(frozen=True)
class Resampled:
    """One resampling of one model: after step ``step``, ``n_resampled`` latents (``latents``)."""

    step: int
    name: str
    n_resampled: int
    latents: tuple[int, ...]


class ResampleDead:
    """Training hook: after every ``every`` steps (steps every-1, 2*every-1, ...), re-initialise
    the latents firing on fewer than ``threshold`` of ``inputs`` (see the module docstring).
    ``records`` lists every resampling done, including those that found nothing to resample.
    """

    def __init__(
        self,
        inputs: Tensor,
        every: int,
        threshold: float = 0.01,
        seed: int = 0,
        batch_size: int = 4096,
    ):
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if len(inputs) == 0:
            raise ValueError("ResampleDead needs some inputs to measure firing and losses on")
        self.inputs = inputs
        self.every = every
        self.threshold = threshold
        self.seed = seed
        self.batch_size = batch_size
        self.records: list[Resampled] = []

    def __call__(self, info: StepInfo) -> None:
        if (info.step + 1) % self.every != 0:
            return
        for result in info.results:
            if result.status != "diverged":
                latents = self.resample(result, info.step)
                self.records.append(
                    Resampled(info.step, result.name, len(latents), tuple(latents.tolist()))
                )

    @torch.no_grad()
    def resample(self, result: TrainResult, step: int) -> Tensor:
        """Resample ``result``'s model in place (weights, Adam moments, dead counter); returns
        the (sorted) indices of the latents resampled."""
        sae = result.model
        x = self.inputs.to(sae.W_dec.device, sae.W_dec.dtype)
        dead = firing_fraction(sae, x, self.batch_size) < self.threshold
        latents = dead.nonzero().flatten()
        if len(latents) == 0:
            return latents
        generator = step_generator(self.seed, step)
        chosen = sample_by_loss(input_losses(sae, x, self.batch_size), len(latents), generator)
        reinitialise(sae, latents, x[chosen.to(x.device)] - sae.b_dec, dead)
        if result.optimizer is not None:
            reset_adam_rows(result.optimizer, sae, latents)
        if result.tokens_since_fired is not None:
            result.tokens_since_fired[latents] = 0
        return latents


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, step), for draws a resumed run must repeat. The pair is
    hashed: the CPU generator keeps only 32 bits of its seed, so arithmetic mixing would
    collide."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


@torch.no_grad()
def firing_fraction(sae: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """(d_sae,) fraction of the rows of ``x`` on which each latent is active (non-zero)."""
    counts = torch.zeros(sae.W_dec.shape[0], device=x.device)
    for chunk in x.split(batch_size):
        _, latents, _ = sae(chunk).active()
        counts += torch.bincount(latents, minlength=len(counts)).to(counts.dtype)
    return counts / len(x)


@torch.no_grad()
def input_losses(sae: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """(n,) squared reconstruction error ||x - x_hat||^2 of each row, in float32."""
    errors = [
        (sae(chunk).recon.float() - chunk.float()).pow(2).sum(dim=-1)
        for chunk in x.split(batch_size)
    ]
    return torch.cat(errors)


def sample_by_loss(losses: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` row indices drawn with probability proportional to loss^2 (on the CPU, from
    ``generator``): distinct rows while enough rows have a non-zero loss; uniform when none has."""
    weights = losses.detach().double().cpu().pow(2)
    if not bool(weights.sum() > 0):
        weights = torch.ones_like(weights)
    distinct = n <= int((weights > 0).sum())
    return torch.multinomial(weights, n, replacement=not distinct, generator=generator)


@torch.no_grad()
def reinitialise(sae: nn.Module, latents: Tensor, directions: Tensor, dead: Tensor) -> None:
    """Point ``latents``' decoder rows along ``directions`` (unit norm), their encoder rows
    along the same unit vectors scaled to 0.2 x the mean alive encoder norm, encoder bias 0."""
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    mean_norm = sae.W_enc[alive].norm(dim=-1).mean() if bool(alive.any()) else unit.new_ones(())
    sae.W_dec[latents] = unit.to(sae.W_dec.dtype)
    sae.W_enc[latents] = (unit * ENCODER_SCALE * mean_norm).to(sae.W_enc.dtype)
    sae.b_enc[latents] = 0


@torch.no_grad()
def reset_adam_rows(optimizer: torch.optim.Optimizer, sae: nn.Module, latents: Tensor) -> None:
    """Zero Adam's exp_avg and exp_avg_sq at ``latents``' rows of W_enc, b_enc and W_dec (the
    step counts and every other entry are left as they are)."""
    for parameter in (sae.W_enc, sae.b_enc, sae.W_dec):
        state = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][latents] = 0
