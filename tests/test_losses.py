"""Training losses: each reconstruction convention by hand, the AuxK forms against dense
computations, and where AuxK's gradients go."""

from __future__ import annotations

import pytest
import torch

from saelib.training.losses import (
    AuxKCapable,
    TopKLoss,
    TrainState,
    auxk_loss,
    reconstruction_loss,
    reconstruction_mse,
)

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


def test_reconstruction_conventions_by_hand():
    # a known batch: 2 rows, d_in 3; squared errors [[1, 4, 0], [9, 0, 1]]
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    recon = torch.tensor([[0.0, 4.0, 3.0], [1.0, 5.0, 7.0]])
    # the originals' convention: sum over d_in, mean over the batch
    assert reconstruction_loss(x, recon).item() == pytest.approx((5 + 10) / 2)
    assert reconstruction_loss(x, recon, "l2").item() == pytest.approx(7.5)
    assert reconstruction_loss(x, recon, "mse").item() == pytest.approx(15 / 6)
    # fvu: 15 over the total variance sum_j sum_b (x_bj - mean_j)^2 = 3 * (1.5^2 * 2) = 13.5
    assert reconstruction_loss(x, recon, "fvu").item() == pytest.approx(15 / 13.5)
    with pytest.raises(ValueError, match="reconstruction loss"):
        reconstruction_loss(x, recon, "sum")


def test_l2_is_d_in_times_mse(toy_acts):
    recon = toy_acts.flip(0)
    l2, mse = reconstruction_loss(toy_acts, recon, "l2"), reconstruction_mse(toy_acts, recon)
    torch.testing.assert_close(l2, mse * toy_acts.shape[1])


def test_auxk_is_zero_without_dead_latents(make_sae, toy_acts):
    sae = make_sae(d_sae=D_SAE)
    output = sae(toy_acts[:32])
    no_dead = torch.zeros(D_SAE, dtype=torch.bool)
    loss = auxk_loss(sae, toy_acts[:32], output, no_dead, k_aux=8)
    assert loss.item() == 0.0


def _dense_aux(sae, x, output, dead, k_aux):
    """(e_hat - e) by dense matrices, and e."""
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        values, indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
        latents = torch.zeros_like(pre).scatter(1, indices, torch.relu(values))
        error = x - output.recon
        return latents @ sae.W_dec - error, error


@pytest.mark.parametrize("k_aux", [4, 40])  # 10 dead latents: scale 1, then 10/40
def test_auxk_per_dim_variance_matches_dense_computation(make_sae, toy_acts, dead, k_aux):
    sae = make_sae(d_sae=D_SAE)
    x = toy_acts[:32]
    output = sae(x)
    loss = auxk_loss(sae, x, output, dead, k_aux=k_aux, form="per_dim_variance")
    difference, _ = _dense_aux(sae, x, output, dead, min(k_aux, int(dead.sum())))
    tv = (x - x.mean(dim=0)).pow(2).sum(dim=0)  # per dimension, summed over the batch
    scale = min(int(dead.sum()) / k_aux, 1.0)
    expected = scale * (difference.pow(2) / tv).mean()
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_auxk_error_variance_matches_dense_computation(make_sae, toy_acts, dead):
    sae = make_sae(d_sae=D_SAE)
    x = toy_acts[:32]
    output = sae(x)
    loss = auxk_loss(sae, x, output, dead, k_aux=4, form="error_variance")

    difference, error = _dense_aux(sae, x, output, dead, 4)
    residual = difference.pow(2).sum(dim=1).mean()
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
    torch.testing.assert_close(terms["total"], terms["recon"] + 0.5 * terms["auxk"])
    # the default reconstruction term is the originals': sum over d_in, mean over the batch
    by_hand = (x - output.recon).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(terms["recon"], by_hand)
    torch.testing.assert_close(terms["mse"], by_hand / x.shape[1])

    plain = TopKLoss(auxk_alpha=0.0, reconstruction="mse")(sae, x, output, state)
    assert "auxk" not in plain
    assert torch.equal(plain["total"], plain["recon"])
    torch.testing.assert_close(plain["recon"], reconstruction_mse(x, output.recon))


def test_topk_loss_refuses_a_model_without_an_auxk_encoder(make_sae, toy_acts):
    sae = make_sae(d_sae=D_SAE)
    assert isinstance(sae, AuxKCapable)
    TopKLoss().check(sae)  # a TopK SAE has what AuxK needs

    plain = torch.nn.Linear(16, 16)
    assert not isinstance(plain, AuxKCapable)
    with pytest.raises(TypeError, match="Linear lacks d_in, b_dec, encode_aux, decode"):
        TopKLoss().check(plain)
    TopKLoss(auxk_alpha=0.0).check(plain)  # without AuxK any model with a reconstruction will do

    output = sae(toy_acts[:8])
    with pytest.raises(ValueError, match="dead latents"):  # no dead-latent tracking
        TopKLoss()(sae, toy_acts[:8], output, TrainState(0, 10, dead=None))


@pytest.mark.parametrize("k_aux", [4, 32])  # fewer and more than the 10 dead latents
def test_auxk_dense_path_over_dead_latents_equals_the_sparse_path(make_sae, toy_acts, dead, k_aux):
    results = []
    for dense_factor in (0.0, 100.0):  # the sparse path, then the dense one
        sae = make_sae(d_sae=D_SAE).double()  # float64: the two sum in different orders
        with torch.no_grad():  # non-zero biases, so that each enters the gradients
            sae.b_dec.fill_(0.5)
            sae.b_enc.copy_(torch.linspace(-0.2, 0.2, D_SAE))
        x = toy_acts[:64].double().requires_grad_()
        output = sae(x.detach())
        error_hat = sae.decode_aux(x, output.pre_acts, dead, k_aux, dense_factor=dense_factor)
        error_hat.pow(2).sum().backward()
        grads = (sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad, x.grad)
        results.append((error_hat.detach(), *grads))
    for sparse, dense in zip(*results, strict=True):
        torch.testing.assert_close(dense, sparse, rtol=1e-10, atol=1e-12)
    assert results[0][1].abs().sum() > 0
