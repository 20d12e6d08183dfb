"""Masked Linears: ERK densities by hand, exact global density, exact random masks, and the
dense gradient RigL reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saelib.sparse import (
    LMConfig,
    MaskedLinear,
    TransformerLM,
    erk_densities,
    global_density,
    layer_counts,
    layer_densities,
    mask_linears,
    masked_layers,
    random_masks,
    track_dense_grads,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LMConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_mlp=64, context=16)


def test_erk_densities_match_a_hand_computation():
    # raw (n_in + n_out) / (n_in n_out): a 12/32, b 16/64; budget 0.5 * 96 = 48 active weights
    # scale = 48 / (12/32 * 32 + 16/64 * 64) = 48 / 28
    densities = erk_densities({"a": (4, 8), "b": (8, 8)}, 0.5)
    assert densities["a"] == pytest.approx(12 / 32 * 48 / 28)
    assert densities["b"] == pytest.approx(16 / 64 * 48 / 28)


def test_a_layer_over_density_one_is_made_dense_and_the_rest_rescaled():
    # a (2x2) would get 1.0 * 130 / 36 > 1: dense; b takes the remaining 130 - 4 of 256
    densities = erk_densities({"a": (2, 2), "b": (16, 16)}, 0.5)
    assert densities == {"a": 1.0, "b": pytest.approx(126 / 256)}


@pytest.mark.parametrize("density", [0.1, 0.2, 0.3, 0.5, 0.77])
def test_layer_counts_meet_the_global_density_exactly(density):
    model = mask_linears(TransformerLM(TINY))
    shapes = {name: tuple(layer.weight.shape) for name, layer in masked_layers(model).items()}
    total = sum(h * w for h, w in shapes.values())
    for distribution in ("erk", "uniform"):
        counts = layer_counts(shapes, density, distribution)
        assert sum(counts.values()) == round(density * total)
        assert all(0 < counts[name] <= h * w for name, (h, w) in shapes.items())
    erk = erk_densities(shapes, density)
    counts = layer_counts(shapes, density)
    for name, (h, w) in shapes.items():
        assert abs(counts[name] - erk[name] * h * w) <= 1  # rounding only


def test_mask_linears_masks_attention_and_mlp_only_and_changes_nothing_at_density_one():
    model = TransformerLM(TINY, seed=3)
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    dense_logits = model(tokens)
    mask_linears(model)
    names = set(masked_layers(model))
    assert names == {f"blocks.{i}.{part}" for i in (0, 1)
                     for part in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")}  # fmt: skip
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.norm_out, nn.LayerNorm)
    assert torch.equal(model(tokens), dense_logits)


def test_random_masks_have_exact_counts_zero_weights_and_depend_on_the_seed():
    model = mask_linears(TransformerLM(TINY))
    counts = random_masks(model, 0.2, seed=0)
    layers = masked_layers(model)
    for name, layer in layers.items():
        assert layer.nnz == counts[name]
        assert not layer.weight[~layer.mask].any()
        assert layer.weight[layer.mask].ne(0).all()
    total = sum(layer.mask.numel() for layer in layers.values())
    assert global_density(model) == round(0.2 * total) / total
    assert layer_densities(model)["blocks.0.mlp.up"] == counts["blocks.0.mlp.up"] / (64 * 32)
    other = mask_linears(TransformerLM(TINY))
    random_masks(other, 0.2, seed=1)
    assert not torch.equal(
        masked_layers(other)["blocks.0.mlp.up"].mask, layers["blocks.0.mlp.up"].mask
    )


def test_the_kept_dense_gradient_is_the_gradient_of_the_whole_weight_matrix():
    generator = torch.Generator().manual_seed(0)
    layer = MaskedLinear(6, 5)
    layer.set_mask(torch.rand(5, 6, generator=generator) < 0.4)
    track_dense_grads(layer)
    x = torch.randn(7, 6, generator=generator)
    upstream = torch.randn(7, 5, generator=generator)
    (layer(x) * upstream).sum().backward()
    expected = upstream.T @ x  # dL/dW from the output and input gradients
    torch.testing.assert_close(layer.dense_grad, expected)
    torch.testing.assert_close(layer.weight.grad, expected * layer.mask)
    assert layer.dense_grad[~layer.mask].abs().sum() > 0


def test_masked_weights_stay_zero_after_optimizer_steps():
    model = mask_linears(TransformerLM(TINY))
    random_masks(model, 0.3, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    layer = masked_layers(model)["blocks.1.mlp.down"]
    layer.weight.data[~layer.mask] = 0.5  # stale values: the step must clear them
    for _ in range(3):
        optimizer.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
        model.after_optimizer_step()
    for layer in masked_layers(model).values():
        assert not layer.weight[~layer.mask].any()
