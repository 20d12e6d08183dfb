"""Metrics as defined in the study spec, checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelib.evals.metrics import evaluate, pareto_optimal
from saelib.saes.sparse_ops import dense_latents


def test_metrics_match_their_definitions(make_sae, toy_acts):
    sae = make_sae(d_in=16, d_sae=64, k=4)
    metrics = evaluate(sae, toy_acts, batch_size=100)  # several batches, uneven last one
    with torch.no_grad():
        output = sae(toy_acts)
    x, recon = toy_acts, output.recon
    residual = x - recon
    total_variance = x.var(0, unbiased=False).sum()
    expected_ev = 1 - residual.pow(2).sum(1).mean() / total_variance  # SAELens
    expected_centred = 1 - residual.var(0, unbiased=False).sum() / total_variance
    assert metrics.explained_variance == pytest.approx(float(expected_ev), abs=1e-5)
    assert metrics.explained_variance_centred == pytest.approx(float(expected_centred), abs=1e-5)
    assert metrics.mse == pytest.approx(float(residual.pow(2).mean()), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(x, recon, dim=1).mean()
    assert metrics.cosine_similarity == pytest.approx(float(cosine), rel=1e-5)
    dense = dense_latents(output.acts, output.indices, sae.d_sae)
    assert metrics.l0 == pytest.approx(float((dense > 0).sum(1).float().mean()))
    assert metrics.death_rate == pytest.approx(float(((dense > 0).sum(0) == 0).float().mean()))
    assert metrics.mean_activation == pytest.approx(float(dense[dense > 0].mean()), rel=1e-5)
    assert metrics.max_activation == pytest.approx(float(dense.max()))
    assert metrics.n_vectors == len(toy_acts)


def test_perfect_reconstruction_explains_all_variance(make_sae):
    sae = make_sae(d_in=8, d_sae=8, k=8, use_decoder_bias=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(8))
        sae.W_enc.copy_(torch.eye(8))
    x = torch.rand(50, 8) + 0.1  # positive, so ReLU keeps every coordinate
    metrics = evaluate(sae, x)
    assert metrics.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert metrics.mse == pytest.approx(0.0, abs=1e-10)
    assert metrics.death_rate == 0.0


def test_explained_variance_penalises_an_offset_and_the_centred_form_does_not(make_sae):
    sae = make_sae(d_in=8, d_sae=8, k=8, use_decoder_bias=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(8))
        sae.W_enc.copy_(torch.eye(8))
    x = torch.rand(200, 8, generator=torch.Generator().manual_seed(0)) + 1.0
    sae.register_buffer("b_dec", torch.full((8,), 0.5))  # x_hat = x + 0.5 everywhere
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # pre-activations (x - 0.5) + 0.5 = x: x_hat = x + 0.5
    metrics = evaluate(sae, x)
    # by hand: E||x - x_hat||^2 = 8 * 0.25 against the total variance of x
    total_variance = float(x.var(0, unbiased=False).sum())
    assert metrics.explained_variance == pytest.approx(1 - 2.0 / total_variance, rel=1e-5)
    assert metrics.explained_variance_centred == pytest.approx(1.0, abs=1e-6)


def test_pareto_optimal_finds_the_non_dominated_points():
    # columns: quality (maximise), cost (minimise)
    points = np.array([[0.9, 10], [0.8, 5], [0.7, 5], [0.95, 20], [0.85, 20]])
    mask = pareto_optimal(points, maximize=[True, False])
    assert mask.tolist() == [True, True, False, True, False]
