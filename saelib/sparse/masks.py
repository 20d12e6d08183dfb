"""Masked Linear layers, their initial densities, and density reports.

Sparsity is emulated: a :class:`MaskedLinear` keeps a dense weight and a boolean ``mask``
buffer and multiplies the two in every forward, so the kernels stay dense and wall-clock does
not fall with sparsity; training FLOPs (:mod:`saelib.sparse.flops`) are the cost measure.

:func:`mask_linears` swaps every ``nn.Linear`` of a model for a masked one. In
:class:`~saelib.sparse.lm.TransformerLM` those are the attention (``qkv``, ``out``) and MLP
(``up``, ``down``) weights; the token and position embeddings, the tied output head (the
embedding matrix) and the LayerNorms stay dense.

Initial per-layer densities follow Erdos-Renyi-Kernel (Evci et al. 2020, RigL): density_l is
proportional to (n_in + n_out) / (n_in * n_out), scaled so the masked layers together hold
exactly ``round(density * total)`` active weights; a layer whose density would exceed 1 is made
dense and the rest rescaled, as RigL's ``sparse_utils.get_sparsities_erdos_renyi`` does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "Distribution",
    "MaskedLinear",
    "apply_masks",
    "erk_densities",
    "global_density",
    "layer_counts",
    "layer_densities",
    "mask_linears",
    "masked_layers",
    "random_masks",
    "track_dense_grads",
]

Distribution = Literal["erk", "uniform"]


class MaskedLinear(nn.Linear):
    """A Linear whose weight is multiplied by a boolean ``mask`` buffer in forward.

    The masked weights are also kept at zero in the parameter (:meth:`set_mask`,
    :meth:`after_optimizer_step`): Adam's moments would otherwise move them while masked, and
    a regrown connection would come back with a stale value. With ``keep_dense_grad`` the
    gradient of the loss with respect to the whole (masked) weight matrix, which autograd
    forms from the layer's input and output gradients anyway, is kept in ``dense_grad``:
    RigL grows connections where it is large.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.keep_dense_grad = False
        self.dense_grad: Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MaskedLinear:
        weight = linear.weight
        masked = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            masked.weight.copy_(weight)
            if linear.bias is not None:
                masked.bias.copy_(linear.bias)
        return masked

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight * self.mask
        if self.keep_dense_grad and weight.requires_grad:
            weight.register_hook(self._keep_dense_grad)
        return F.linear(x, weight, self.bias)

    def _keep_dense_grad(self, grad: Tensor) -> None:
        self.dense_grad = grad.detach()

    def kept_gradients(self) -> list[Tensor]:
        """Gradients held outside ``.grad`` (data-parallel training sums them as gradients)."""
        return [] if self.dense_grad is None else [self.dense_grad]

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Take ``mask`` and zero the weights it leaves out."""
        self.mask.copy_(mask.view_as(self.mask))
        self.weight.masked_fill_(~self.mask, 0.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.weight.masked_fill_(~self.mask, 0.0)


def mask_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`MaskedLinear` with the same
    weights and an all-ones mask (in place; returns ``model``)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, MaskedLinear.from_linear(child))
    return model


def masked_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    """The model's masked Linears by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear)}


def track_dense_grads(model: nn.Module, on: bool = True) -> None:
    """Keep (or stop keeping) each masked layer's dense weight gradient after backward."""
    for layer in masked_layers(model).values():
        layer.keep_dense_grad = on
        if not on:
            layer.dense_grad = None


def erk_densities(shapes: dict[str, tuple[int, int]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel density per layer for a global ``density`` over ``shapes``."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        if not free:
            return dict.fromkeys(shapes, 1.0)
        budget = density * sum(sizes.values()) - sum(sizes[name] for name in dense)
        scale = budget / sum(raw[name] * sizes[name] for name in free)
        highest = max(raw[name] for name in free)
        if highest * scale <= 1:
            return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}
        dense |= {name for name in free if raw[name] == highest}  # RigL caps the largest


def layer_counts(
    shapes: dict[str, tuple[int, int]], density: float, distribution: Distribution = "erk"
) -> dict[str, int]:
    """Active weights per layer: ``distribution``'s densities rounded so that the total is
    exactly ``round(density * total)`` (largest remainders get the spare units)."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    if distribution == "erk":
        densities = erk_densities(shapes, density)
    else:
        densities = dict.fromkeys(shapes, density)
    wanted = {name: min(densities[name] * sizes[name], sizes[name]) for name in shapes}
    counts = {name: math.floor(value) for name, value in wanted.items()}
    spare = round(density * sum(sizes.values())) - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda name: counts[name] - wanted[name])
    open_layers = [name for name in by_remainder if counts[name] < sizes[name]]
    assert 0 <= spare <= len(open_layers), (spare, len(open_layers))  # floors lose < 1 each
    for name in open_layers[:spare]:
        counts[name] += 1
    return counts


def random_masks(
    model: nn.Module, density: float, seed: int = 0, distribution: Distribution = "erk"
) -> dict[str, int]:
    """Give each masked layer a uniformly random mask with exactly its
    :func:`layer_counts` active weights (seeded); returns the counts."""
    layers = masked_layers(model)
    counts = layer_counts(_shapes(layers), density, distribution)
    generator = torch.Generator().manual_seed(seed)
    for name, layer in layers.items():
        chosen = torch.randperm(layer.weight.numel(), generator=generator)[: counts[name]]
        mask = torch.zeros(layer.weight.numel(), dtype=torch.bool)
        mask[chosen] = True
        layer.set_mask(mask.to(layer.mask.device))
    return counts


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Set the masks of the named masked layers (e.g. saved ones)."""
    layers = masked_layers(model)
    for name, mask in masks.items():
        layers[name].set_mask(mask.to(layers[name].mask.device))


def layer_densities(model: nn.Module) -> dict[str, float]:
    return {name: layer.nnz / layer.mask.numel() for name, layer in masked_layers(model).items()}


def global_density(model: nn.Module) -> float:
    """Active fraction over all masked weights together (1.0 for a model with none)."""
    layers = masked_layers(model).values()
    total = sum(layer.mask.numel() for layer in layers)
    return sum(layer.nnz for layer in layers) / total if total else 1.0


def _shapes(layers: dict[str, MaskedLinear]) -> dict[str, tuple[int, int]]:
    return {name: tuple(layer.weight.shape) for name, layer in layers.items()}
