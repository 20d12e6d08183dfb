"""ReLU SAE and L1 loss: the dense formulas, the code's views, checkpoints and a short training."""

from __future__ import annotations

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
