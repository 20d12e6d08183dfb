"""Every eval on a fixed-k code (TopK) and on a variable-k one (a ReLU SAE whose rows have
different numbers of active latents), each checked against the dense view of the code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saelib.evals.absorption import (
    AbsorptionConfig,
    absorption_from_data,
    prepare_absorption,
    sae_latents,
)
from saelib.evals.core import CoreEvalConfig, run_core_eval_many
from saelib.evals.feature_separation import (
    SeparationRecorder,
    coactivation_pairs,
    coactivation_stats,
    decoder_cosine_stats,
)
from saelib.evals.metrics import evaluate
from saelib.evals.sparse_probing import (
    SparseProbingConfig,
    pooled_latents,
    prepare_probing_data,
    run_sparse_probing,
)
from saelib.lm import load_lm
from saelib.saes import SAE, ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saelib.training import SAESpec, TrainConfig, train_saes
from saelib.training.l1 import L1Loss

ARCHITECTURES = ["topk", "relu"]
DEAD = [0, 1]  # latents of the ReLU SAE that never fire
LAYER, CONTEXT = 3, 32
TEXTS = [
    "The cat sat on the warm mat by the fire, and the dog slept in the hall.",
    "Paris is the capital of France.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants.",
]


def make_sae(architecture: str, calibration: torch.Tensor, d_sae: int, seed: int = 0) -> SAE:
    """A seeded TopK SAE (k = 4), or a ReLU SAE whose encoder bias lets each latent fire on
    about a tenth of the ``calibration`` rows (so rows differ in their number of active latents)
    and keeps the latents DEAD silent."""
    d_in = calibration.shape[1]
    generator = torch.Generator().manual_seed(seed)
    if architecture == "topk":
        sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=4), generator)
    else:
        sae = ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae), generator)
        with torch.no_grad():
            sae.b_enc.copy_(-torch.quantile(calibration @ sae.W_enc.T, 0.9, dim=0))
            sae.b_enc[DEAD] = -1e4
    sae.metadata = {"model": "smollm2-135m", "layer": LAYER}
    return sae.requires_grad_(False)


def dense(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The code written out from the architecture's formula, without the SAE's output views."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    if isinstance(sae, ReLUSAE):
        return torch.relu(pre)
    values, indices = pre.topk(sae.k, dim=1)
    return torch.zeros_like(pre).scatter(1, indices, values.relu())


# ------------------------------------------------------------------ on vectors, no language model


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return torch.randn(600, 16, generator=torch.Generator().manual_seed(7)) + 0.3


def test_relu_code_has_varying_l0_equal_to_its_non_zero_entries(vectors):
    sae = make_sae("relu", vectors, d_sae=40)
    output, codes = sae(vectors), dense(sae, vectors)
    l0 = (codes != 0).sum(dim=1)
    assert torch.equal(output.l0(), l0) and len(set(l0.tolist())) > 3
    assert output.acts.shape[1] == l0.max() and (l0 == 0).any()  # padded rows, empty rows
    torch.testing.assert_close(output.dense(), codes)
    assert torch.equal(output.fired(), (codes != 0).any(dim=0)) and not output.fired()[DEAD].any()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_metrics_equal_their_dense_computation(architecture, vectors):
    sae = make_sae(architecture, vectors, d_sae=40)
    metrics = evaluate(sae, vectors, batch_size=77)  # several batches of different widths
    codes = dense(sae, vectors)
    recon = codes @ sae.W_dec + sae.b_dec
    error = vectors - recon
    total_variance = vectors.var(0, unbiased=False).sum()
    assert metrics.explained_variance == pytest.approx(
        float(1 - error.pow(2).sum(1).mean() / total_variance), abs=1e-5
    )
    assert metrics.mse == pytest.approx(float(error.pow(2).mean()), rel=1e-5)
    active = codes != 0
    assert metrics.l0 == pytest.approx(float(active.sum(1).float().mean()))
    assert metrics.death_rate == pytest.approx(float((~active.any(0)).float().mean()))
    assert metrics.mean_activation == pytest.approx(float(codes[active].mean()), rel=1e-5)
    assert metrics.max_activation == pytest.approx(float(codes.max()), rel=1e-6)
    if architecture == "relu":
        assert metrics.death_rate >= len(DEAD) / sae.d_sae and metrics.l0 != round(metrics.l0)


def brute_force_n_ij(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense n_ij and the mask of pairs i != j that are active together at least once."""
    active = (codes != 0).double()
    together = active.T @ active
    n_ij = together / torch.diag(together).clamp_min(1)[None, :]
    return n_ij, (together > 0) & ~torch.eye(len(together), dtype=torch.bool)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_coactivation_and_decoder_cosines_equal_their_dense_computation(architecture, vectors):
    sae = make_sae(architecture, vectors, d_sae=40)
    n_ij, mask = brute_force_n_ij(dense(sae, vectors))
    i, j, values, fired = coactivation_pairs(sae, vectors, batch_size=64, max_pair_entries=200)
    expected_i, expected_j = torch.nonzero(mask, as_tuple=True)
    assert torch.equal(i, expected_i) and torch.equal(j, expected_j)
    torch.testing.assert_close(values, n_ij[expected_i, expected_j])
    assert torch.equal(fired, (dense(sae, vectors) != 0).sum(0))
    stats = coactivation_stats(sae, vectors)
    assert stats.n_pairs == int(mask.sum())
    assert stats.n_active_latents == int((fired > 0).sum())
    cosine = decoder_cosine_stats(sae)
    upper = (sae.W_dec @ sae.W_dec.T).abs().clamp(max=1)[tuple(torch.triu_indices(40, 40, 1))]
    assert cosine.mean_abs_cos == pytest.approx(float(upper.mean()), rel=1e-5)


def test_separation_recorder_follows_a_relu_sae_during_training(vectors):
    sae = make_sae("relu", vectors, d_sae=40).requires_grad_(True)
    config = TrainConfig(lr=1e-2, batch_size=64, epochs=1, device="cpu")
    eval_acts = vectors[-128:]
    recorder = SeparationRecorder(eval_acts, (0.5, 1.0), total_steps=config.total_steps(512))
    specs = [SAESpec("relu", sae, loss=L1Loss(l1_coefficient=1.0))]
    train_saes(specs, vectors[:512], config, hooks=[recorder], progress=False)
    snapshots = recorder.snapshots["relu"]
    assert [s.step for s in snapshots] == [4, 8]
    assert snapshots[-1].coactivation == coactivation_stats(sae, eval_acts)
    assert snapshots[-1].decoder_cosine == decoder_cosine_stats(sae)
    assert snapshots[-1].coactivation.n_active_latents <= sae.d_sae - len(DEAD)


# ------------------------------------------------------------------ on the real language model


@pytest.fixture(scope="module")
def lm(one_thread):
    return load_lm("smollm2-135m")


@pytest.fixture(scope="module")
def probing(lm):
    config = SparseProbingConfig(
        classes=("Mathematics", "People", "Geography"), n_train_per_class=8,
        n_test_per_class=4, ks=(1, 5), context_length=48,
    )  # fmt: skip
    return config, prepare_probing_data(lm, LAYER, config, progress=False)


@pytest.fixture(scope="module")
def lm_saes(lm, probing) -> dict[str, SAE]:
    """Both SAEs at the model's width, the ReLU one calibrated on the probing residuals."""
    calibration = probing[1].token_acts
    return {name: make_sae(name, calibration, d_sae=64) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def core_results(lm, lm_saes, tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "texts.txt"
    path.write_text("\n\n".join(TEXTS))
    config = CoreEvalConfig(
        dataset=str(path), n_texts=len(TEXTS), first_text=0, context_length=CONTEXT,
        batch_size=2, histogram_bins=8, progress=False,
    )  # fmt: skip
    return run_core_eval_many(lm_saes, lm, LAYER, config)


def core_residuals(lm) -> torch.Tensor:
    """Residuals after block LAYER at every token of TEXTS but the first, without padding."""
    rows = []
    for text in TEXTS:
        ids = lm.tokenizer(text, truncation=True, max_length=CONTEXT, return_tensors="pt")
        with torch.no_grad():
            out = lm.hf_model(input_ids=ids["input_ids"], output_hidden_states=True)
        rows.append(out.hidden_states[LAYER + 1][0, 1:])
    return torch.cat(rows).float()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_core_eval_sparsity_equals_the_dense_code(architecture, lm, lm_saes, core_results):
    sae, result = lm_saes[architecture], core_results[architecture]
    x = core_residuals(lm)
    codes = dense(sae, x)
    active = codes != 0
    assert result.n_tokens == len(x)
    assert result.l1 == pytest.approx(float(codes.abs().sum(1).mean()), rel=1e-4)
    assert result.l0 == pytest.approx(float(active.sum(1).float().mean()), abs=0.05)
    n_dead = int((~active.any(0)).sum())
    assert result.density.n_dead == n_dead and sum(result.density.counts) == sae.d_sae - n_dead
    assert result.dead_fraction == pytest.approx(n_dead / sae.d_sae)
    recon = codes @ sae.W_dec + sae.b_dec
    shrinkage = float((recon.norm(dim=1) / x.norm(dim=1)).mean())
    assert result.shrinkage == pytest.approx(shrinkage, rel=1e-4)
    assert math.isfinite(result.kl_div_score) and math.isfinite(result.ce_loss_score)
    if architecture == "relu":
        assert n_dead >= len(DEAD) and len(set(active.sum(1).tolist())) > 3


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sparse_probing_pools_the_dense_code(architecture, lm, lm_saes, probing):
    sae, (config, data) = lm_saes[architecture], probing
    pooled = pooled_latents(sae, data.token_acts, data.doc_index, data.n_texts, config, False)
    codes = dense(sae, data.token_acts)
    counts = torch.bincount(data.doc_index, minlength=data.n_texts)
    expected = torch.zeros(data.n_texts, sae.d_sae).index_add_(0, data.doc_index, codes)
    np.testing.assert_allclose(pooled, (expected / counts[:, None]).numpy(), atol=1e-5)

    output = run_sparse_probing(sae, lm, config=config, data=data, progress=False)
    accuracies = [*output.sae_accuracy.values(), *output.sae_multiclass_accuracy.values()]
    assert all(0.0 <= a <= 1.0 for a in accuracies) and output.n_train == 24
    for chosen in output.sae_top_latents[1].values():  # a latent that never fires ranks last
        assert pooled[:, chosen[0]].any()
    assert output.metadata["k"] == (4 if architecture == "topk" else None)


@pytest.fixture(scope="module")
def absorption_data(lm):
    config = AbsorptionConfig(
        n_top_words=5000, letters="abst", max_words_per_letter=30, min_words_per_letter=10,
        n_icl_examples=2, queries_per_sequence=8, max_k=3,
    )  # fmt: skip
    return config, prepare_absorption(lm, LAYER, config, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_absorption_reads_the_dense_code(architecture, lm_saes, absorption_data):
    sae, (config, data) = lm_saes[architecture], absorption_data
    output = absorption_from_data(sae, data, config, progress=False)
    assert [row.letter for row in output.letters] == list("abst")
    for row in output.letters:
        assert 1 <= row.n_split <= 3 and 0 <= row.n_absorbed <= row.n_probe_true_positives
        for rate in (row.absorption_rate, row.absorption_fraction):
            assert rate is None or 0.0 <= rate <= 1.0
    assert output.mean_n_split >= 1 and output.meta["d_sae"] == 64
    x = data.residuals
    np.testing.assert_allclose(sae_latents(sae, x), dense(sae, torch.from_numpy(x)), atol=1e-5)
