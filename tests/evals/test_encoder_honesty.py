"""Encoder honesty: the code path's explained variance and the batch dependence of the output."""

from __future__ import annotations

import pytest
import torch

from saelib.evals.encoder_honesty import batch_dependence, code_path_explained_variance
from saelib.evals.metrics import evaluate
from saelib.saes import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saelib.training import SAESpec, TrainConfig, train_saes
from saelib.training.l1 import L1Loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


def relu_sae(seed: int = 0, **options) -> ReLUSAE:
    config = ReLUConfig(d_in=8, d_sae=24, **options)
    return ReLUSAE(config, torch.Generator().manual_seed(seed))


def inputs(n: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def test_code_path_ev_is_the_saes_ev_without_an_output_skip():
    x = inputs()
    for options in ({}, {"layer_norm": True}, {"skip": "encoder"}, {"attention": True}):
        sae = relu_sae(**options)
        with torch.no_grad():
            sae.b_dec.copy_(x.mean(0))
        expected = evaluate(sae, x, batch_size=100).explained_variance
        got = code_path_explained_variance(sae, x, batch_size=100)
        assert got == pytest.approx(expected, abs=1e-9), options


def test_code_path_ev_against_a_hand_computation_when_the_skip_does_all_the_work():
    """Every latent off and the skip set to (x - b_dec) / skip_scale: the SAE reconstructs x
    exactly, its code path is the constant b_dec."""
    x, sae = inputs(), relu_sae(skip="output", skip_scale=0.1)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
        sae.b_dec.copy_(x.mean(0) + 0.5)
        sae.skip.weight.copy_(torch.eye(8) / 0.1)
        sae.skip.bias.copy_(-sae.b_dec / 0.1)
    assert evaluate(sae, x, batch_size=64).explained_variance == pytest.approx(1.0, abs=1e-6)
    x64 = x.double()
    total = (x64 - x64.mean(0)).pow(2).sum()
    hand = 1 - (x64 - sae.b_dec.detach().double()).pow(2).sum() / total
    assert code_path_explained_variance(sae, x, batch_size=64) == pytest.approx(float(hand))
    assert float(hand) < 0


def test_after_training_an_output_skip_carries_reconstruction_the_code_path_lacks():
    """The L1 prices only the latents, so training moves the reconstruction onto the skip."""
    data = inputs(512, seed=2)
    config = TrainConfig(lr=3e-2, batch_size=64, epochs=16, device="cpu", log_every=8)
    sae = relu_sae(skip="output", skip_scale=0.1)
    (result,) = train_saes([SAESpec("skip", sae, loss=L1Loss(3.0))], data, config, progress=False)
    assert result.status == "complete"
    with torch.no_grad():
        full = evaluate(sae, data).explained_variance
    code_only = code_path_explained_variance(sae, data)
    assert full > 0.6 and code_only < full - 0.3  # measured: 0.81 against 0.23


def test_batch_dependence_is_zero_for_per_sample_encoders_and_positive_with_attention():
    x = inputs(300)
    per_sample = [
        relu_sae(),
        relu_sae(layer_norm=True, skip="encoder"),
        relu_sae(skip="output"),
        TopKSAE(TopKConfig(d_in=8, d_sae=24, k=3), torch.Generator().manual_seed(0)),
    ]
    for sae in per_sample:
        result = batch_dependence(sae, x, batch_size=64)
        assert result.mean_relative_change == 0.0 and result.max_relative_change == 0.0
        assert result.batch_size == 64 and result.n_vectors == 300

    attention = batch_dependence(relu_sae(attention=True), x, batch_size=64)
    assert 0 < attention.mean_relative_change <= attention.max_relative_change
    assert attention.to_dict()["max_relative_change"] == attention.max_relative_change


def test_batch_dependence_changes_the_company_even_when_one_batch_would_hold_everything():
    """With batch_size >= n the batch size is capped at n // 2: one batch of all of x, shuffled,
    would give an attention SAE the same company and hide its dependence."""
    x, sae = inputs(40), relu_sae(attention=True)
    result = batch_dependence(sae, x, batch_size=4096)
    assert result.batch_size == 20 and result.mean_relative_change > 0
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # all of x in one batch, reordered: the same output per sample
        reordered = sae(x[permutation]).recon[torch.argsort(permutation)]
        torch.testing.assert_close(reordered, sae(x).recon)
    with pytest.raises(ValueError, match="at least 2"):
        batch_dependence(sae, x[:1])


def test_batch_dependence_equals_the_hand_computation_for_two_batches():
    x, sae = inputs(4), relu_sae(attention=True)
    permutation = torch.randperm(4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        alone = torch.cat([sae(x[:2]).recon, sae(x[2:]).recon]).double()
        moved = x[permutation]
        shuffled = torch.cat([sae(moved[:2]).recon, sae(moved[2:]).recon]).double()
    shuffled = shuffled[torch.argsort(permutation)]
    change = (alone - shuffled).norm(dim=1) / alone.norm(dim=1)
    result = batch_dependence(sae, x, batch_size=2, seed=7)
    assert result.mean_relative_change == pytest.approx(float(change.mean()))
    assert result.max_relative_change == pytest.approx(float(change.max()))
