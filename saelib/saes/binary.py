"""Binary Sparsity Alignment (BSA) autoencoder: a code of {0, 1} bits, trained toward TopK.

encode: s = sigmoid(W_e x + b_e), one probability per bit; bits b from s by a gradient
estimator (below). decode: x_hat = W_d b + b_d. The loss (:class:`saelib.training.BSALoss`)
aligns s with the binary TopK target t = one-hot(topk(s, K)) (:func:`topk_target`, no
gradient), so the number of active bits per sample may differ from K.

Gradient estimators (``BinaryConfig.estimator``), the study's second ablation:

- ``"passthrough"`` (the original): b = round(s) forward, identity backward w.r.t. s. Through
  the sigmoid that is db/dz = s(1 - s) for the logit z.
- ``"ste_sigmoid"``: b = step(z) forward, backward multiplies by the sigmoid derivative
  s(1 - s) at the logit. Written as its own autograd function; its gradient equals the
  passthrough's (a test checks it), so the two cells differ only in how they are written.
- ``"ste_identity"``: b = step(z) forward, identity backward w.r.t. the logit (db/dz = 1),
  the classic straight-through estimator and the one that differs from the passthrough.
- ``"gumbel"``: binary concrete (Gumbel-sigmoid): y = sigmoid((z + logistic noise) / tau),
  tau annealed from ``tau_start`` to ``tau_end``. ``hard=True``: b = step(y - 1/2) forward,
  y's gradient backward; ``hard=False``: b = y in training, hard bits at evaluation.
- ``"soft_quant"``: b = sigmoid(slope * z) in training, slope rising from ``slope_start`` to
  ``slope_end``; hard bits only at evaluation.
- ``"topk"``: the hard binary TopK control: b = t (exactly K bits per sample), identity
  backward w.r.t. s.

In evaluation mode (``model.eval()``) the code is always hard: step(z), or t for ``"topk"``.
Annealing follows the training progress p in [0, 1] the model is told through
:meth:`BinarySAE.set_progress`; :func:`saelib.training.bsa.anneal_progress` is the training
hook that tells it. Schedules are geometric (tau = tau_start (tau_end / tau_start)^p), so the
temperature spends as long between 1 and 0.5 as between 0.2 and 0.1.

The decoder rows are not renormalised: with {0, 1} codes the decoder norms are the only place
the reconstruction's scale can live. The Gumbel noise is drawn from a generator seeded by
(``noise_seed``, updates done), so a resumed run sees the noise an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from saelib.saes.base import SAE, SAEConfig, SAEOutput, register
from saelib.saes.topk import geometric_median

Estimator = Literal["passthrough", "ste_sigmoid", "ste_identity", "gumbel", "soft_quant", "topk"]
ESTIMATORS: tuple[str, ...] = Estimator.__args__
ANNEALED = ("gumbel", "soft_quant")  # estimators whose forward pass depends on the progress


@dataclass
class BinaryConfig(SAEConfig):
    k: int = 32  # K of the TopK target (and the number of bits of the "topk" control)
    estimator: Estimator = "passthrough"
    tau_start: float = 1.0  # Gumbel temperature at the start of training
    tau_end: float = 0.1  # ... and at the end
    hard: bool = True  # Gumbel: hard bits forward (True) or soft samples in training (False)
    slope_start: float = 1.0  # soft quantisation: sigmoid slope at the start of training
    slope_end: float = 50.0  # ... and at the end
    noise_seed: int = 0  # Gumbel noise

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must lie in 1..d_sae={self.d_sae}, got k={self.k}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("tau_start", "tau_end", "slope_start", "slope_end"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass
class BinaryOutput(SAEOutput):
    """An :class:`SAEOutput` whose code is bits, with what the BSA loss needs besides them:
    the logits z and probabilities s = sigmoid(z), both carrying gradients."""

    logits: Tensor | None = None  # (batch, d_sae)
    probs: Tensor | None = None  # (batch, d_sae)

    @classmethod
    def build(cls, recon: Tensor, bits: Tensor, logits: Tensor, probs: Tensor) -> BinaryOutput:
        output = cls.from_dense(recon, bits, logits.detach())
        output.logits, output.probs = logits, probs
        return output


def topk_target(scores: Tensor, k: int) -> Tensor:
    """One-hot mask of the ``k`` largest ``scores`` per row: the binary TopK target t. It
    carries no gradient (the target is a fixed point to align to, not a path to train)."""
    indices = scores.detach().topk(k, dim=-1).indices
    return torch.zeros_like(scores, requires_grad=False).scatter_(-1, indices, 1.0)


def hard_threshold(logits: Tensor) -> Tensor:
    """round(sigmoid(z)) as step(z): exact {0, 1} bits, no gradient."""
    return (logits.detach() > 0).to(logits.dtype)


def straight_through(hard: Tensor, surrogate: Tensor) -> Tensor:
    """``hard`` forward (exactly: ``surrogate - surrogate.detach()`` is zero), ``surrogate``'s
    gradient backward."""
    return hard + (surrogate - surrogate.detach())


class SigmoidSTE(torch.autograd.Function):
    """step(z) forward; backward multiplies the incoming gradient by sigmoid'(z) = s(1 - s)."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        ctx.save_for_backward(logits)
        return hard_threshold(logits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (logits,) = ctx.saved_tensors
        probs = torch.sigmoid(logits)
        return grad * probs * (1 - probs)


def logistic_noise(shape: torch.Size, generator: torch.Generator, device, dtype) -> Tensor:
    """log u - log(1 - u), u ~ U(0, 1): the difference of two Gumbel variables, the noise of
    the binary concrete distribution."""
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    uniform = uniform.clamp(1e-6, 1 - 1e-6)
    return (uniform.log() - torch.log1p(-uniform)).to(dtype)


def geometric_anneal(start: float, end: float, progress: float) -> float:
    """start (end / start)^p: a schedule that moves by equal ratios per unit of progress."""
    return start * (end / start) ** min(max(progress, 0.0), 1.0)


@register
class BinarySAE(SAE):
    architecture = "binary"
    config_class = BinaryConfig
    config: BinaryConfig

    def __init__(self, config: BinaryConfig, generator: torch.Generator | None = None):
        super().__init__(config)
        self.init_tied_weights(generator)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        # saved with the weights, so that a resumed run anneals and draws noise as before
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def anneals(self) -> bool:
        """Whether the training forward pass depends on the progress (Gumbel, soft quant)."""
        return self.config.estimator in ANNEALED

    def set_progress(self, progress: float) -> None:
        """Tell the model how far training is (p in [0, 1]); annealed estimators read it."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        self.progress.fill_(progress)

    def temperature(self) -> float:
        """The Gumbel temperature at the current progress."""
        config = self.config
        return geometric_anneal(config.tau_start, config.tau_end, float(self.progress))

    def slope(self) -> float:
        """The soft-quantisation slope at the current progress."""
        config = self.config
        return geometric_anneal(config.slope_start, config.slope_end, float(self.progress))

    def forward(self, x: Tensor) -> BinaryOutput:
        logits = self.logits(x)
        probs = torch.sigmoid(logits)
        bits = self.binarize(logits, probs) if self.training else self.hard_bits(logits)
        return BinaryOutput.build(self.decode(bits), bits, logits, probs)

    def logits(self, x: Tensor) -> Tensor:
        """z = W_e x + b_e, (batch, d_sae)."""
        return torch.addmm(self.b_enc, x, self.W_enc.T)

    def probabilities(self, x: Tensor) -> Tensor:
        """s = sigmoid(z), (batch, d_sae)."""
        return torch.sigmoid(self.logits(x))

    def encode(self, x: Tensor) -> Tensor:
        """(batch, d_sae) hard bits, as in evaluation mode."""
        return self.hard_bits(self.logits(x))

    def decode(self, bits: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, bits, self.W_dec)

    def topk_recon(self, x: Tensor, k: int | None = None) -> Tensor:
        """The fixed-TopK reconstruction: decode the TopK target t instead of the bits."""
        return self.decode(topk_target(self.logits(x), k or self.k))

    def hard_bits(self, logits: Tensor) -> Tensor:
        """The evaluation code: step(z), or exactly K bits for the ``"topk"`` control."""
        if self.config.estimator == "topk":
            return topk_target(logits, self.k)
        return hard_threshold(logits)

    def binarize(self, logits: Tensor, probs: Tensor) -> Tensor:
        """The training code under the configured gradient estimator (module docstring)."""
        estimator = self.config.estimator
        if estimator == "passthrough":
            return straight_through(hard_threshold(logits), probs)
        if estimator == "ste_sigmoid":
            return SigmoidSTE.apply(logits)
        if estimator == "ste_identity":
            return straight_through(hard_threshold(logits), logits)
        if estimator == "gumbel":
            return self.gumbel_bits(logits)
        if estimator == "soft_quant":
            return torch.sigmoid(self.slope() * logits)
        return straight_through(topk_target(logits, self.k), probs)  # "topk"

    def gumbel_bits(self, logits: Tensor) -> Tensor:
        """A binary concrete sample at the current temperature (hard or soft, per config)."""
        seed = (self.config.noise_seed << 32) + int(self.updates)
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        noisy = logits + logistic_noise(logits.shape, generator, logits.device, logits.dtype)
        sample = torch.sigmoid(noisy / self.temperature())
        return straight_through(hard_threshold(noisy), sample) if self.config.hard else sample

    def before_optimizer_step(self) -> None:
        """Nothing: the decoder norms are free (the module docstring says why)."""

    def after_optimizer_step(self) -> None:
        self.updates += 1

    @torch.no_grad()
    def on_first_batch(self, batch: Tensor) -> None:
        """Before the first step: b_dec at the batch's geometric median, and decoder rows of
        norm median ||x - b_dec|| / sqrt(K), so that K near-orthogonal bits start at the
        data's scale (an MSE reconstruction would otherwise start far off)."""
        self.b_dec.copy_(geometric_median(batch.float()))
        scale = (batch.float() - self.b_dec).norm(dim=1).median() / self.k**0.5
        self.W_dec.mul_(scale / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
