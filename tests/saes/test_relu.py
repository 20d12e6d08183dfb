"""ReLU SAE and L1 loss: the dense formulas, the code's views, checkpoints and a short training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from saelib.saes import ReLUConfig, ReLUSAE, geometric_median, load_sae
from saelib.training import SAESpec, TrainConfig, TrainState, train_saes
from saelib.training.l1 import L1Loss


def make_relu(d_in: int = 16, d_sae: int = 48, seed: int = 0, b_enc: float = -0.5) -> ReLUSAE:
    """A ReLU SAE whose negative encoder bias leaves each row a different number of latents."""
    sae = ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae), torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
        sae.b_dec.copy_(0.2 * torch.randn(d_in, generator=generator))
    return sae


def inputs(n: int = 200, d: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 0.5


def test_forward_is_the_dense_formula_and_the_views_agree():
    sae, x = make_relu(), inputs()
    output = sae(x)
    codes = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(output.dense(), codes)
    torch.testing.assert_close(output.recon, codes @ sae.W_dec + sae.b_dec)
    l0 = (codes != 0).sum(dim=1)
    assert torch.equal(output.l0(), l0)
    assert l0.min() < l0.max() and l0.min() >= 0 and output.acts.shape[1] == l0.max()
    assert torch.equal(output.fired(), (codes != 0).any(dim=0))
    rows, latents, values = output.active()
    rebuilt = torch.zeros_like(codes).index_put_((rows, latents), values)
    torch.testing.assert_close(rebuilt, codes.detach(), rtol=0, atol=0)
    assert output.pre_acts is not None and not output.pre_acts.requires_grad


def test_decoder_starts_at_unit_norm_with_the_encoder_as_its_transpose():
    sae = ReLUSAE(ReLUConfig(d_in=8, d_sae=32), torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec)
    again = ReLUSAE(ReLUConfig(d_in=8, d_sae=32), torch.Generator().manual_seed(0))
    assert torch.equal(again.W_dec, sae.W_dec)


def test_checkpoint_round_trip(tmp_path):
    sae = make_relu()
    loaded = load_sae(sae.save(tmp_path / "relu", extra={"layer": 3}))
    assert isinstance(loaded, ReLUSAE) and loaded.config == sae.config
    assert loaded.metadata == {"layer": 3}
    x = inputs(20)
    torch.testing.assert_close(loaded(x).recon, sae(x).recon)


def test_l1_loss_terms_and_gradients_match_the_dense_formula():
    sae, x = make_relu(), inputs()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, sae.d_sae)[:, None])  # norms must count
    loss = L1Loss(l1_coefficient=0.3)
    state = TrainState(step=0, total_steps=10)
    terms = loss(sae, x, sae(x), state)
    terms["total"].backward()
    sparse_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()

    codes = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    recon = codes @ sae.W_dec + sae.b_dec
    squared_error = (recon - x).pow(2).sum(dim=1).mean()
    l1 = (codes * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    (squared_error + 0.3 * l1).backward()
    assert set(terms) == {"recon", "mse", "l1", "total"} and not terms["mse"].requires_grad
    torch.testing.assert_close(terms["recon"], squared_error)
    torch.testing.assert_close(terms["l1"], l1)
    torch.testing.assert_close(terms["mse"], (recon - x).pow(2).mean().detach())
    for sparse_grad, param in zip(sparse_grads, sae.parameters(), strict=True):
        torch.testing.assert_close(sparse_grad, param.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="W_dec"):
        loss.check(nn.Linear(4, 4))


def test_short_training_keeps_unit_decoder_rows_and_the_l1_makes_codes_sparser():
    data = inputs(1024, seed=4)
    config = TrainConfig(lr=1e-2, batch_size=64, epochs=3, device="cpu", log_every=1)
    saes = {coefficient: make_relu(b_enc=0.0) for coefficient in (0.0, 3.0)}
    specs = [SAESpec(f"l1_{c}", sae, loss=L1Loss(l1_coefficient=c)) for c, sae in saes.items()]
    results = train_saes(specs, data, config, progress=False)
    l0 = {}
    for (coefficient, sae), result in zip(saes.items(), results, strict=True):
        assert result.status == "complete" and result.steps == 48
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))
        assert result.history[-1]["recon"] < 0.5 * result.history[0]["recon"]
        with torch.no_grad():
            l0[coefficient] = float(sae(data).l0().float().mean())
    assert 0 < l0[3.0] < 0.5 * l0[0.0]


def test_the_decoder_bias_starts_at_the_geometric_median_of_the_first_batch():
    sae, batch = make_relu(), inputs(64)
    sae.on_first_batch(batch)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(batch))


# Encoder options: LayerNorm, skip connection (encoder or output), attention across the batch.

OPTIONS = [
    {"layer_norm": layer_norm, "skip": skip, "attention": attention}
    for layer_norm in (False, True)
    for skip in ("none", "encoder", "output")
    for attention in (False, True)
]


def option_name(options: dict) -> str:
    return f"ln{int(options['layer_norm'])}-skip_{options['skip']}-att{int(options['attention'])}"


def make_with(options: dict, d_in: int = 6, d_sae: int = 10, seed: int = 0) -> ReLUSAE:
    """A tiny ReLU SAE with the given options and every parameter moved off its init (a
    LayerNorm at scale 1 and shift 0 would hide a missing affine step)."""
    sae = ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae, skip_scale=0.3, **options),
                  torch.Generator().manual_seed(seed))  # fmt: skip
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        sae.normalize_decoder()
    return sae


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def hand_forward(sae: ReLUSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, recon) from the formulas written out, for any combination of options."""
    config = sae.config
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    if config.layer_norm:
        mean = pre.mean(dim=1, keepdim=True)
        variance = ((pre - mean) ** 2).mean(dim=1, keepdim=True)
        normed = (pre - mean) / torch.sqrt(variance + 1e-5)
        pre = normed * sae.layer_norm.weight + sae.layer_norm.bias
    if config.skip == "encoder":
        pre = pre + config.skip_scale * linear(sae.skip, x)
    if config.attention:
        q, k, v = (linear(getattr(sae.attention, name), x) for name in "qkv")
        weights = torch.exp(q @ k.T / x.shape[1] ** 0.5)
        pre = pre + (weights / weights.sum(dim=1, keepdim=True)) @ v
    codes = torch.relu(pre)
    recon = codes @ sae.W_dec + sae.b_dec
    if config.skip == "output":
        recon = recon + config.skip_scale * linear(sae.skip, x)
    return codes, recon


@pytest.mark.parametrize("options", OPTIONS, ids=option_name)
def test_every_combination_of_options_matches_the_hand_formula_trains_and_round_trips(
    options, tmp_path
):
    sae, x = make_with(options), inputs(12, d=6)
    output = sae(x)
    codes, recon = hand_forward(sae, x)
    torch.testing.assert_close(output.dense(), codes)
    torch.testing.assert_close(output.recon, recon)
    torch.testing.assert_close(sae.code_path(output.dense()), codes @ sae.W_dec + sae.b_dec)
    assert 0 < int((codes > 0).sum()) < codes.numel()  # the hand check covers both ReLU sides

    output.recon.pow(2).sum().backward()
    grads = {name: p.grad for name, p in sae.named_parameters()}
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    assert grads["W_enc"].abs().sum() > 0

    loaded = load_sae(sae.save(tmp_path / option_name(options)))
    assert isinstance(loaded, ReLUSAE) and loaded.config == sae.config
    torch.testing.assert_close(loaded(x).recon, output.recon, rtol=0, atol=0)


def test_each_option_adds_exactly_its_own_parameters():
    base = {"W_dec", "W_enc", "b_enc", "b_dec"}
    expected = {
        "layer_norm": {"layer_norm.weight", "layer_norm.bias"},
        "skip": {"skip.weight", "skip.bias"},
        "attention": {f"attention.{p}.{w}" for p in "qkv" for w in ("weight", "bias")},
    }
    for options in OPTIONS:
        names = set(make_with(options).state_dict())
        wanted = set(base)
        wanted |= expected["layer_norm"] if options["layer_norm"] else set()
        wanted |= expected["skip"] if options["skip"] != "none" else set()
        wanted |= expected["attention"] if options["attention"] else set()
        assert names == wanted, option_name(options)
    shapes = {
        skip: make_with({"layer_norm": False, "skip": skip, "attention": False}).skip.weight.shape
        for skip in ("encoder", "output")
    }
    assert shapes == {"encoder": (10, 6), "output": (6, 6)}


def test_options_leave_the_base_init_unchanged_and_draw_only_from_the_generator():
    def build(**options) -> ReLUSAE:
        return ReLUSAE(ReLUConfig(d_in=8, d_sae=32, **options), torch.Generator().manual_seed(5))

    plain = build()
    global_state = torch.get_rng_state()
    full = build(layer_norm=True, skip="encoder", attention=True)
    assert torch.equal(torch.get_rng_state(), global_state)
    again = build(layer_norm=True, skip="encoder", attention=True)
    for name, value in plain.state_dict().items():
        assert torch.equal(full.state_dict()[name], value)
    for name, value in full.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)
    bound = 1 / 8**0.5
    for layer in (full.skip, full.attention.q, full.attention.k, full.attention.v):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.3 * bound
    assert not torch.equal(full.attention.q.weight, full.attention.k.weight)


def test_the_default_is_the_plain_relu_sae_and_old_checkpoints_load(tmp_path):
    sae, x = make_relu(), inputs()
    assert sae.config == ReLUConfig(16, 48, False, "none", 0.1, False)
    assert set(sae.state_dict()) == {"W_dec", "W_enc", "b_enc", "b_dec"}
    plain = torch.relu(torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc.T))
    torch.testing.assert_close(sae(x).dense(), plain, rtol=0, atol=0)
    torch.testing.assert_close(sae(x).recon, plain @ sae.W_dec + sae.b_dec, rtol=0, atol=0)

    folder = sae.save(tmp_path / "old")
    config_path = folder / "config.json"
    stored = json.loads(config_path.read_text())
    for key in ("layer_norm", "skip", "skip_scale", "attention"):
        del stored[key]  # a checkpoint written before the options existed
    config_path.write_text(json.dumps(stored))
    loaded = load_sae(folder)
    assert loaded.config == sae.config
    torch.testing.assert_close(loaded(x).recon, sae(x).recon, rtol=0, atol=0)


def test_an_unknown_skip_position_is_refused():
    with pytest.raises(ValueError, match="skip must be one of"):
        ReLUSAE(ReLUConfig(d_in=4, d_sae=8, skip="decoder"))


def test_attention_mixes_the_rows_of_a_batch_and_nothing_else_does():
    x = inputs(8, d=6)
    for options in OPTIONS:
        sae = make_with(options)
        with torch.no_grad():
            together = sae(x).recon[:4]
            apart = sae(x[:4]).recon
        if options["attention"]:
            assert not torch.allclose(together, apart, rtol=1e-3, atol=1e-4)
        else:
            torch.testing.assert_close(together, apart)


@pytest.mark.parametrize("options", OPTIONS, ids=option_name)
def test_short_training_with_each_combination_of_options(options):
    data = inputs(256, d=6, seed=4)
    config = TrainConfig(lr=1e-2, batch_size=32, epochs=3, device="cpu", log_every=1)
    sae = make_with(options)
    spec = SAESpec(option_name(options), sae, loss=L1Loss(l1_coefficient=0.1))
    (result,) = train_saes([spec], data, config, progress=False)
    assert result.status == "complete" and result.steps == 24
    assert result.history[-1]["recon"] < 0.5 * result.history[0]["recon"]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))
