"""L1 loss: the adaptive coefficient against a hand computation; the default is unchanged."""

from __future__ import annotations

import pytest
import torch

from saelib.saes import ReLUConfig, ReLUSAE
from saelib.training import TrainState
from saelib.training.l1 import L1Loss


def make_relu(d_in: int = 8, d_sae: int = 24, seed: int = 0) -> ReLUSAE:
    sae = ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, d_sae)[:, None])  # decoder norms must count
    return sae


def inputs(n: int = 64, d: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 0.3


def hand_terms(sae: ReLUSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    recon = codes @ sae.W_dec + sae.b_dec
    squared_error = (recon - x).pow(2).sum(dim=1).mean()
    l1 = (codes * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    cosine = (x * recon).sum(dim=1) / (x.norm(dim=1) * recon.norm(dim=1))
    return squared_error, l1, cosine.mean().detach()


@pytest.mark.parametrize("floor", [0.1, 0.9])
def test_adaptive_coefficient_is_the_base_over_the_clamped_mean_cosine(floor):
    sae, x = make_relu(), inputs()
    state = TrainState(step=0, total_steps=1)
    terms = L1Loss(0.04, adaptive=True, cosine_floor=floor)(sae, x, sae(x), state)
    terms["total"].backward()
    grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()

    squared_error, l1, cosine = hand_terms(sae, x)
    assert 0.1 < float(cosine) < 0.9  # the floor 0.9 binds, the floor 0.1 does not
    coefficient = 0.04 / cosine.clamp(floor, 1.0)
    (squared_error + coefficient * l1).backward()  # the coefficient carries no gradient
    assert set(terms) == {"recon", "mse", "l1", "l1_coefficient", "total"}
    assert not terms["l1_coefficient"].requires_grad
    torch.testing.assert_close(terms["l1_coefficient"], coefficient)
    torch.testing.assert_close(terms["total"], squared_error + coefficient * l1)
    for grad, parameter in zip(grads, sae.parameters(), strict=True):
        torch.testing.assert_close(grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_the_coefficient_falls_to_the_base_as_reconstructions_become_exact():
    sae, x = make_relu(), inputs()
    output = sae(x)
    output.recon = x.clone()  # a perfect reconstruction: cosine 1
    terms = L1Loss(0.04, adaptive=True)(sae, x, output, TrainState(0, 1))
    torch.testing.assert_close(terms["l1_coefficient"], torch.tensor(0.04))


def test_the_default_is_bit_identical_to_the_plain_l1_loss():
    sae, x = make_relu(), inputs()
    terms = L1Loss(0.3)(sae, x, sae(x), TrainState(0, 1))
    codes = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    output = sae(x)
    recon = (output.recon.float() - x.float()).pow(2).sum(dim=-1).mean()
    l1 = (output.acts.abs() * sae.W_dec.norm(dim=1)[output.indices]).sum(dim=-1).mean()
    assert set(terms) == {"recon", "mse", "l1", "total"}
    assert torch.equal(terms["total"], recon + 0.3 * l1)
    torch.testing.assert_close(terms["l1"], (codes * sae.W_dec.norm(dim=1)).sum(dim=1).mean())


def test_a_floor_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="cosine_floor"):
        L1Loss(0.04, adaptive=True, cosine_floor=0.0)
