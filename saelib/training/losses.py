"""Training losses. A loss maps (model, batch, output, state) to named terms with a "total".

``state`` carries what the trainer knows: training progress p = step / total_steps in [0, 1]
and which latents are currently dead (``None`` for a model whose output does not say which
latents fired). Studies add a loss (or wrap one), never a new loop. A loss may define
``check(model)``, which the trainer calls before training to refuse a model it cannot train,
and ``state_dict``/``load_state_dict`` for state that a resumed run needs.

Loss scale matters: a constant ported from another codebase (an AuxK alpha, a penalty weight,
an L1 coefficient) only means the same thing under that codebase's reconstruction convention.

- ``"l2"`` (default): squared error summed over d_in, averaged over the batch. dictionary_learning's
  trainers and SAELens use it, and so do the originals of the studies ported here.
- ``"mse"``: squared error averaged over every element (``F.mse_loss``); d_in times smaller.
- ``"fvu"``: fraction of variance unexplained on the batch, sum ||x - x_hat||^2 divided by
  sum ||x - mean(x)||^2 (sparsify's training loss): scale-free across layers and models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from saelib.saes import SAEOutput
from saelib.training.distributed import batch_rows, batch_sum

ReconstructionLoss = Literal["l2", "mse", "fvu"]
AuxKForm = Literal["per_dim_variance", "error_variance"]
RECONSTRUCTION_LOSSES: tuple[str, ...] = ReconstructionLoss.__args__
AUXK_FORMS: tuple[str, ...] = AuxKForm.__args__


@dataclass
class TrainState:
    step: int
    total_steps: int
    # (d_sae,) bool: latents that have not fired for dead_after_tokens tokens; None when the
    # model's output does not say which latents fired
    dead: Tensor | None = None

    @property
    def progress(self) -> float:
        return self.step / max(self.total_steps, 1)


class Loss(Protocol):
    """Named terms of one step; ``terms["total"]`` is minimised."""

    def __call__(
        self, model: nn.Module, x: Tensor, output: Any, state: TrainState
    ) -> dict[str, Tensor]: ...


@runtime_checkable
class AuxKCapable(Protocol):
    """What the AuxK loss needs of a model: an encoder restricted to given latents, a sparse
    decoder and the decoder bias (``TopKSAE`` has them)."""

    d_in: int
    b_dec: Tensor

    def encode_aux(
        self, x: Tensor, pre_acts: Tensor, dead: Tensor, k_aux: int
    ) -> tuple[Tensor, Tensor]: ...

    def decode(self, acts: Tensor, indices: Tensor) -> Tensor: ...


AUXK_NEEDS = ("d_in", "b_dec", "encode_aux", "decode")


def check_auxk_capable(model: nn.Module) -> None:
    """Refuse, in one line naming the model, a model that cannot train with AuxK."""
    missing = [name for name in AUXK_NEEDS if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"AuxK needs a model with {', '.join(AUXK_NEEDS)}; {type(model).__name__} lacks "
            f"{', '.join(missing)} (turn AuxK off with auxk_alpha=0)"
        )


def reconstruction_loss(x: Tensor, recon: Tensor, kind: ReconstructionLoss = "l2") -> Tensor:
    """The reconstruction term under convention ``kind`` (see the module docstring), in float32."""
    squared = (recon.float() - x.float()).pow(2)
    if kind == "l2":
        return squared.sum(dim=-1).mean()
    if kind == "mse":
        return squared.mean()
    if kind == "fvu":  # rows' mean times the batch's row count: exact when a batch is split
        return squared.sum(dim=-1).mean() * batch_rows(x) / total_variance(x).sum().clamp_min(1e-12)
    raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION_LOSSES}, got {kind!r}")


def reconstruction_mse(x: Tensor, recon: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    return reconstruction_loss(x, recon, "mse")


def total_variance(x: Tensor) -> Tensor:
    """(d,) per-dimension sum over the batch of (x_j - mean_j)^2, in float32, without gradient
    (over the whole batch when data-parallel processes each hold a slice of it)."""
    return batch_sum(_centred(x.detach().float()).pow(2).sum(dim=0))


def _centred(x: Tensor) -> Tensor:
    """``x`` minus the batch's mean row (the whole batch's, when it is split over processes)."""
    return x - batch_sum(x.sum(dim=0)) / batch_rows(x)


def auxk_loss(
    sae: AuxKCapable,
    x: Tensor,
    output: SAEOutput,
    dead: Tensor | None,
    k_aux: int,
    form: AuxKForm = "per_dim_variance",
) -> Tensor:
    """AuxK (Gao et al. 2024): the top dead latents should explain the main reconstruction's error.

    e = x - x_hat (no gradient); e_hat decodes the ``min(k_aux, n_dead)`` largest pre-activations
    among the dead latents, without the decoder bias (it belongs to the main path).

    - ``"per_dim_variance"`` (the orthogonality-penalty original, after sparsify):
      scale * mean over batch and dims of (e_hat - e)^2 / tv_j, with tv_j the input's per-dimension
      total variance on the batch and scale = min(n_dead / k_aux, 1), which weakens the loss while
      few latents are dead.
    - ``"error_variance"`` (dictionary_learning): sum over d_in, mean over the batch of
      (e_hat - e)^2, divided by the error's own variance; no scale.
    """
    if dead is None:
        raise ValueError(
            f"AuxK needs to know the dead latents, but {type(sae).__name__}'s output does not say "
            "which latents fired (no fired())"
        )
    n_dead = int(dead.sum())
    if n_dead == 0 or output.pre_acts is None:
        return x.new_zeros((), dtype=x.float().dtype)
    error = (x - output.recon).detach().float()
    decode_aux = getattr(sae, "decode_aux", None)  # a faster path, where the model has one
    if decode_aux is not None:
        error_hat = decode_aux(x, output.pre_acts, dead, k_aux)
    else:
        acts, indices = sae.encode_aux(x, output.pre_acts, dead, k_aux)
        error_hat = sae.decode(acts, indices) - sae.b_dec
    squared = (error_hat.float() - error).pow(2)
    if form == "per_dim_variance":
        scale = min(n_dead / k_aux, 1.0)
        return scale * (squared / total_variance(x).clamp_min(1e-12)).mean()
    if form == "error_variance":
        spread = batch_sum(_centred(error).pow(2).sum())
        denominator = (spread / batch_rows(error)).clamp_min(1e-12)
        return squared.sum(dim=-1).mean() / denominator
    raise ValueError(f"AuxK form must be one of {AUXK_FORMS}, got {form!r}")


@dataclass
class TopKLoss:
    """Reconstruction (convention ``reconstruction``) plus ``auxk_alpha`` times the AuxK loss.

    ``auxk_alpha = 0`` disables AuxK; with AuxK on, the model must be :class:`AuxKCapable`.
    The terms logged are the reconstruction term (``recon``), the per-element MSE for display
    (``mse``, no gradient), ``auxk`` and ``total``.
    """

    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # default d_in // 2
    reconstruction: ReconstructionLoss = "l2"
    auxk_form: AuxKForm = "per_dim_variance"

    def check(self, model: nn.Module) -> None:
        """Refuse a model this loss cannot train (AuxK on a model without an AuxK encoder)."""
        if self.auxk_alpha > 0:
            check_auxk_capable(model)

    def __call__(self, sae: nn.Module, x: Tensor, output: SAEOutput, state: TrainState):
        recon = reconstruction_loss(x, output.recon, self.reconstruction)
        terms = {"recon": recon, "mse": reconstruction_mse(x, output.recon.detach())}
        total = recon
        if self.auxk_alpha > 0:
            self.check(sae)
            k_aux = self.k_aux or sae.d_in // 2
            aux = auxk_loss(sae, x, output, state.dead, k_aux, self.auxk_form)
            terms["auxk"] = aux
            total = total + self.auxk_alpha * aux
        terms["total"] = total
        return terms
