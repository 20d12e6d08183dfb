"""TPP: a planted class latent is found and its ablation hits only its class; nothing ablated,
no drop; the pooled ablation equals the per-token one; a real run with TopK and ReLU SAEs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from saelib.evals.sparse_probing import mean_pool, pooled_latents, prepare_probing_data
from saelib.evals.tpp import TPPConfig, ablated_features, code_decoder, run_tpp, tpp_from_arrays
from saelib.saes import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE

D_IN, D_SAE, N_CLASSES = 16, 32, 4
MARKERS = [3, 9, 17, 26]  # latent MARKERS[c] fires on class c only; its direction is e_c


def planted_sae(seed: int = 0) -> ReLUSAE:
    """A ReLU SAE whose marker latents decode to e_0..e_3 and every other latent to a unit
    direction in the span of e_4..e_15, so the class signal lives only in the markers."""
    generator = torch.Generator().manual_seed(seed)
    sae = ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=D_SAE), generator)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    directions[:, :N_CLASSES] = 0.0
    directions /= directions.norm(dim=1, keepdim=True)
    directions[MARKERS] = torch.eye(D_IN)[:N_CLASSES]
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator))
    return sae


def planted(sae: ReLUSAE, n_per_class: int = 40, seed: int = 0):
    """(pooled latents, pooled residual = decode(latents) + error, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    n = len(labels)
    latents = rng.exponential(0.3, (n, D_SAE)) * (rng.random((n, D_SAE)) < 0.3)
    latents[:, MARKERS] = 0.0
    latents[np.arange(n), np.array(MARKERS)[labels]] = 1.0 + rng.random(n)
    latents = latents.astype(np.float32)
    with torch.no_grad():
        residual = sae.decode(torch.from_numpy(latents)).double().numpy()
    residual += rng.normal(0.0, 0.1, residual.shape)
    return latents, residual, labels


CONFIG = TPPConfig(n_train_per_class=25, n_test_per_class=15, n_latents=(0, 1, 3))


@pytest.mark.parametrize("probe_input", ["residual", "reconstruction"])
def test_ablating_the_planted_latent_drops_only_its_class(probe_input):
    sae = planted_sae()
    latents, residual, labels = planted(sae)
    config = replace(CONFIG, probe_input=probe_input)
    output = tpp_from_arrays(latents, residual, labels, code_decoder(sae), config)
    assert output.classes == ["0", "1", "2", "3"] and output.n_latents == [0, 1, 3]
    assert output.ablated_latents[1] == {str(c): [m] for c, m in enumerate(MARKERS)}
    assert min(output.clean_accuracy.values()) >= 0.95
    for name in output.classes:
        # t's positives lose their only signal: half the balanced test set turns wrong
        assert output.targeted_drop[1][name] >= 0.4
        assert abs(output.off_target_drop[1][name]) <= 0.05
        assert output.score[1][name] >= 0.35
    assert output.mean_score[1] == pytest.approx(
        output.mean_targeted_drop[1] - output.mean_off_target_drop[1]
    )
    assert output.n_train == 4 * 25 and output.n_test == 4 * 15


def test_ablating_no_latent_changes_nothing():
    sae = planted_sae()
    latents, residual, labels = planted(sae)
    output = tpp_from_arrays(latents, residual, labels, code_decoder(sae), CONFIG)
    assert output.ablated_latents[0] == {name: [] for name in output.classes}
    for values in (output.targeted_drop[0], output.off_target_drop[0], output.score[0]):
        assert all(value == 0.0 for value in values.values())
    assert output.mean_score[0] == 0.0
    assert ablated_features(latents, residual, code_decoder(sae), []) is residual


def per_token_reference(sae, acts, doc_index, n_docs, ablate) -> np.ndarray:
    """Zero the latents in every token's dense code, decode, keep the SAE error, mean-pool."""
    with torch.no_grad():
        codes = sae(acts).dense()
        masked = codes.clone()
        masked[:, ablate] = 0.0
        ablated = acts - codes @ sae.W_dec + masked @ sae.W_dec  # the bias cancels
    return mean_pool(ablated, doc_index, n_docs)


@pytest.mark.parametrize("kind", ["topk", "relu_output_skip"])
def test_pooled_ablation_equals_the_per_token_one(kind):
    generator = torch.Generator().manual_seed(1)
    if kind == "topk":
        sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=4), generator)
    else:
        sae = ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=D_SAE, skip="output"), generator)
    with torch.no_grad():
        sae.b_dec.add_(0.3)
    acts = torch.randn(60, D_IN, generator=generator) + 0.5
    doc_index = torch.tensor([0] * 20 + [1] * 25 + [2] * 15)
    latents = pooled_latents(sae, acts, doc_index, 3, progress=False)
    residual = mean_pool(acts, doc_index, 3)
    ablate = [0, 5, 11, 30]
    pooled = ablated_features(latents, residual.astype(np.float64), code_decoder(sae), ablate)
    expected = per_token_reference(sae, acts, doc_index, 3, ablate)
    np.testing.assert_allclose(pooled, expected, atol=1e-5)
    assert not np.allclose(pooled, residual, atol=1e-3)  # the ablation did remove something


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        TPPConfig(n_latents=(1, -1)).validate()


@pytest.mark.slow
def test_end_to_end_on_the_real_model(tmp_path):
    from saelib.lm import load_lm

    lm = load_lm("smollm2-135m")
    config = TPPConfig(
        classes=("Mathematics", "People", "Geography"),
        n_train_per_class=8,
        n_test_per_class=4,
        n_latents=(0, 1, 5),
        context_length=48,
    )
    data = prepare_probing_data(lm, 3, config.probing_config(), progress=False)
    generator = torch.Generator().manual_seed(0)
    saes = {
        "topk": TopKSAE(TopKConfig(d_in=576, d_sae=256, k=16), generator),
        "relu": ReLUSAE(ReLUConfig(d_in=576, d_sae=256), generator),
    }
    for name, sae in saes.items():
        sae.metadata = {"model": "smollm2-135m", "layer": 3}
        output = run_tpp(sae, lm, config=config, data=data, progress=False)
        assert output.classes == list(config.classes) and output.n_latents == [0, 1, 5]
        assert all(0.5 <= a <= 1.0 for a in output.clean_accuracy.values()), name
        assert output.mean_score[0] == 0.0
        for n in output.n_latents:
            assert all(len(v) == n for v in output.ablated_latents[n].values())
            assert all(-1.0 <= s <= 1.0 for s in output.score[n].values())
        saved = json.loads(output.save(tmp_path / f"{name}.json").read_text())
        assert saved["metadata"]["layer"] == 3 and saved["metadata"]["d_sae"] == 256
        assert set(saved["mean_score"]) == {"0", "1", "5"}
    with pytest.raises(ValueError, match="layer 3"):
        run_tpp(saes["topk"], lm, layer=4, config=config, data=data, progress=False)
