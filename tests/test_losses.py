"""Training losses: the MSE by hand, and the AuxK loss's value and where its gradients go."""

from __future__ import annotations

import pytest
import torch

from saelib.losses import TopKLoss, TrainState, auxk_loss, reconstruction_mse

D_SAE = 64


@pytest.fixture
def dead() -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[[1, 5, 9, 20, 33, 40, 47, 50, 58, 63]] = True
    return mask


def test_reconstruction_mse_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    recon = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    mse = reconstruction_mse(x, recon)
    assert mse.dtype == torch.float32
    assert mse.item() == pytest.approx((0 + 4 + 9 + 0) / 4)


def test_auxk_is_zero_without_dead_latents(make_sae, toy_acts):
    sae = make_sae(d_sae=D_SAE)
    output = sae(toy_acts[:32])
    no_dead = torch.zeros(D_SAE, dtype=torch.bool)
    loss = auxk_loss(sae, toy_acts[:32], output, no_dead, k_aux=8)
    assert loss.item() == 0.0


def test_auxk_value_matches_dense_computation(make_sae, toy_acts, dead):
    sae = make_sae(d_sae=D_SAE)
    x = toy_acts[:32]
    output = sae(x)
    loss = auxk_loss(sae, x, output, dead, k_aux=4)

    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        values, indices = pre.masked_fill(~dead, float("-inf")).topk(4, dim=1)
        latents = torch.zeros_like(pre).scatter(1, indices, torch.relu(values))
        error = x - output.recon
        residual = (latents @ sae.W_dec - error).pow(2).sum(dim=1).mean()
        expected = residual / (error - error.mean(dim=0)).pow(2).sum(dim=1).mean()
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("k_aux", [4, 32])  # fewer and more than the 10 dead latents
def test_auxk_gradients_reach_only_dead_latents(make_sae, toy_acts, dead, k_aux):
    sae = make_sae(d_sae=D_SAE)
    x = toy_acts[:64]
    loss = auxk_loss(sae, x, sae(x), dead, k_aux=k_aux)
    loss.backward()

    for grad in (sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad):
        per_latent = grad.reshape(D_SAE, -1).abs().sum(dim=1)
        assert torch.all(per_latent[~dead] == 0), "an alive latent received an AuxK gradient"
        if k_aux >= int(dead.sum()):  # every dead latent is among the top-k_aux of every row
            assert torch.all(per_latent[dead] > 0)
        else:
            assert per_latent[dead].gt(0).sum() >= k_aux


def test_topk_loss_combines_terms(make_sae, toy_acts, dead):
    sae = make_sae(d_sae=D_SAE)
    x = toy_acts[:32]
    output = sae(x)
    state = TrainState(step=3, total_steps=12, dead=dead)
    assert state.progress == 0.25

    terms = TopKLoss(auxk_alpha=0.5, k_aux=4)(sae, x, output, state)
    assert terms["auxk"] > 0
    torch.testing.assert_close(terms["total"], terms["mse"] + 0.5 * terms["auxk"])
    torch.testing.assert_close(terms["mse"], reconstruction_mse(x, output.recon))

    plain = TopKLoss(auxk_alpha=0.0)(sae, x, output, state)
    assert "auxk" not in plain
    assert torch.equal(plain["total"], plain["mse"])
