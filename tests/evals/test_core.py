"""Core eval on the real embedded model: score end points, a hand computation, brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from saelib.evals.core import CoreEvalConfig, CoreEvalOutput, run_core_eval, run_core_eval_many
from saelib.evals.metrics import evaluate
from saelib.lm import load_lm
from saelib.saes import TopKConfig, TopKSAE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tiny tensors

LAYER = 3
CONTEXT = 32
TEXTS = [
    "The cat sat on the warm mat by the fire, and the dog slept in the hall.",
    "Paris is the capital of France.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants, "
    "which is why forests matter so much for the air we breathe every single day of the year.",
]  # different lengths, so batches are padded; the last is longer than CONTEXT tokens


@pytest.fixture(scope="module")
def lm():
    return load_lm("smollm2-135m")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> CoreEvalConfig:
    path = tmp_path_factory.mktemp("core") / "texts.txt"
    path.write_text("\n\n".join(TEXTS))
    return CoreEvalConfig(
        dataset=str(path), n_texts=len(TEXTS), first_text=0, context_length=CONTEXT,
        batch_size=2, histogram_bins=8, progress=False,
    )  # fmt: skip


def identity_sae(d: int) -> TopKSAE:
    """A TopK SAE that reconstructs exactly: latents +e_i and -e_i, k = d.

    Of each pair (x_i, -x_i) one pre-activation is >= 0, so the top d are those and the decoder
    adds back x_i * e_i for every i.
    """
    sae = TopKSAE(TopKConfig(d_in=d, d_sae=2 * d, k=d, use_decoder_bias=False))
    signed_basis = torch.cat([torch.eye(d), -torch.eye(d)])
    with torch.no_grad():
        sae.W_enc.copy_(signed_basis)
        sae.W_dec.copy_(signed_basis)
    return sae


def random_sae(d: int) -> TopKSAE:
    """Tiny untrained SAE with a non-zero decoder bias; reads layer LAYER per its metadata."""
    generator = torch.Generator().manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=d, d_sae=64, k=4), generator=generator)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=generator))
    sae.metadata = {"model": "smollm2-135m", "layer": LAYER}
    return sae


@pytest.fixture(scope="module")
def random_result(lm, config) -> tuple[TopKSAE, CoreEvalOutput]:
    sae = random_sae(lm.d_model)
    return sae, run_core_eval(sae, lm, config=config)  # layer from the metadata


def test_perfect_reconstruction_scores_one(lm, config):
    result = run_core_eval(identity_sae(lm.d_model), lm, LAYER, config)
    assert result.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert result.shrinkage == pytest.approx(1.0, abs=1e-6)
    assert result.kl_div_with_sae == pytest.approx(0.0, abs=1e-6)
    assert result.ce_loss_with_sae == pytest.approx(result.ce_loss_clean, abs=1e-5)
    assert result.kl_div_with_ablation > 1.0  # zeroing the residual matters
    assert result.kl_div_score == pytest.approx(1.0, abs=1e-5)
    assert result.ce_loss_score == pytest.approx(1.0, abs=1e-5)


def test_zero_reconstruction_scores_zero(lm, config):
    sae = TopKSAE(TopKConfig(d_in=lm.d_model, d_sae=64, k=4, use_decoder_bias=False))
    with torch.no_grad():
        sae.W_dec.zero_()
    result = run_core_eval(sae, lm, LAYER, config)
    assert result.kl_div_with_sae == pytest.approx(result.kl_div_with_ablation, rel=1e-5)
    assert result.ce_loss_with_sae == pytest.approx(result.ce_loss_with_ablation, rel=1e-5)
    assert result.kl_div_score == pytest.approx(0.0, abs=1e-5)
    assert result.ce_loss_score == pytest.approx(0.0, abs=1e-5)


def hand_losses(lm, sae: TopKSAE) -> dict[str, float]:
    """KL and CE, one unpadded text at a time, with hf_model and a forward hook (no nnsight)."""
    block = lm.hf_model.model.layers[LAYER]
    sums = dict(kl_sae=0.0, kl_ablation=0.0, ce_clean=0.0, ce_sae=0.0, ce_ablation=0.0)
    n_tokens = n_ce_tokens = 0
    for text in TEXTS:
        ids = lm.tokenizer(text, truncation=True, max_length=CONTEXT, return_tensors="pt")
        ids = ids["input_ids"]
        logits = {
            "clean": _logits(lm, ids),
            "sae": _logits(lm, ids, block, lambda h: after_first(h, sae(h[0, 1:]).recon)),
            "ablation": _logits(lm, ids, block, lambda h: after_first(h, 0 * h[0, 1:])),
        }
        clean_probs = logits["clean"].softmax(-1)
        for name, values in logits.items():
            sums[f"ce_{name}"] += float(F.cross_entropy(values[:-1], ids[0, 1:], reduction="sum"))
            if name != "clean":
                log_ratio = logits["clean"].log_softmax(-1) - values.log_softmax(-1)
                sums[f"kl_{name}"] += float((clean_probs * log_ratio).sum())
        n_tokens += ids.shape[1]
        n_ce_tokens += ids.shape[1] - 1
    means = {
        key: value / (n_tokens if key.startswith("kl") else n_ce_tokens)
        for key, value in sums.items()
    }
    return {**means, "n_kl_tokens": n_tokens, "n_ce_tokens": n_ce_tokens}


def after_first(hidden: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``hidden`` (1, seq, d) with every position but the first replaced by ``values``."""
    return torch.cat([hidden[:, :1], values[None]], dim=1)


@torch.no_grad()
def _logits(lm, ids, block=None, replace=None) -> torch.Tensor:
    handle = None
    if block is not None:

        def hook(module, inputs, output):
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            return replace(output)

        handle = block.register_forward_hook(hook)
    try:
        return lm.hf_model(input_ids=ids).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()


def test_kl_and_ce_match_a_hand_computation(lm, random_result):
    sae, result = random_result
    hand = hand_losses(lm, sae)
    assert (result.n_kl_tokens, result.n_ce_tokens) == (hand["n_kl_tokens"], hand["n_ce_tokens"])
    assert result.n_tokens == hand["n_kl_tokens"] - len(TEXTS)  # the first tokens stay clean
    assert result.ce_loss_clean == pytest.approx(hand["ce_clean"], rel=1e-4)
    assert result.ce_loss_with_sae == pytest.approx(hand["ce_sae"], rel=1e-4)
    assert result.ce_loss_with_ablation == pytest.approx(hand["ce_ablation"], rel=1e-4)
    assert result.kl_div_with_sae == pytest.approx(hand["kl_sae"], rel=1e-4)
    assert result.kl_div_with_ablation == pytest.approx(hand["kl_ablation"], rel=1e-4)
    kl_score = (hand["kl_ablation"] - hand["kl_sae"]) / hand["kl_ablation"]
    ce_score = (hand["ce_ablation"] - hand["ce_sae"]) / (hand["ce_ablation"] - hand["ce_clean"])
    assert result.kl_div_score == pytest.approx(kl_score, abs=1e-4)
    assert result.ce_loss_score == pytest.approx(ce_score, abs=1e-4)


def residuals(lm) -> torch.Tensor:
    """Residual stream after block LAYER at every token of TEXTS, without padding."""
    rows = []
    for text in TEXTS:
        ids = lm.tokenizer(text, truncation=True, max_length=CONTEXT, return_tensors="pt")
        with torch.no_grad():
            out = lm.hf_model(input_ids=ids["input_ids"], output_hidden_states=True)
        rows.append(out.hidden_states[LAYER + 1][0, 1:])  # [0]: embeddings; the first token stays
    return torch.cat(rows).float()


def test_sparsity_shrinkage_and_density_match_brute_force(lm, random_result):
    sae, result = random_result
    x = residuals(lm)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    values, indices = pre.topk(sae.k, dim=1)
    dense = torch.zeros_like(pre).scatter(1, indices, values.relu()).detach()
    recon = dense @ sae.W_dec.detach() + sae.b_dec.detach()
    assert result.l1 == pytest.approx(float(dense.sum(1).mean()), rel=1e-5)
    assert result.shrinkage == pytest.approx(
        float((recon.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-5
    )

    reference = evaluate(sae, x)
    assert result.explained_variance == pytest.approx(reference.explained_variance, rel=1e-4)
    assert result.l0 == pytest.approx(reference.l0)

    fired = (dense > 0).sum(0).numpy()
    n, d_sae = len(x), sae.d_sae
    assert result.n_tokens == n
    density = result.density
    assert density.n_dead == int((fired == 0).sum()) > 0  # 64 latents, few tokens: some dead
    assert result.dead_fraction == pytest.approx(density.n_dead / d_sae)
    assert result.alive_fraction == pytest.approx(1 - density.n_dead / d_sae)
    assert result.dead_fraction == pytest.approx(reference.death_rate)
    edges = np.array(density.bin_edges)
    assert len(edges) == 9 and edges[0] == pytest.approx(np.log10(1 / n)) and edges[-1] == 0.0
    expected = [0] * 8
    for count in fired[fired > 0]:  # find each live latent's bin by walking the edges
        log_frequency = np.log10(count / n)
        bin_index = next(i for i in range(8) if log_frequency < edges[i + 1] or i == 7)
        expected[bin_index] += 1
    assert density.counts == expected
    assert sum(density.counts) + density.n_dead == d_sae


def test_output_json_round_trip(random_result, tmp_path):
    _, result = random_result
    path = result.save(tmp_path / "core" / "result.json")
    stored = json.loads(path.read_text())
    assert {"kl_div_score", "ce_loss_score", "l1", "shrinkage", "density"} <= set(stored)
    assert set(stored["density"]) == {"bin_edges", "counts", "n_dead"}
    assert stored["config"]["n_texts"] == len(TEXTS)
    assert stored["sae_metadata"] == {"model": "smollm2-135m", "layer": LAYER}
    assert CoreEvalOutput.load(path) == result


def test_many_saes_share_passes_and_match_single_runs(lm, config, random_result):
    sae, single = random_result
    identity = identity_sae(lm.d_model)
    together = run_core_eval_many({"random": sae, "identity": identity}, lm, LAYER, config)
    assert together["random"].kl_div_score == pytest.approx(single.kl_div_score, rel=1e-5)
    assert together["random"].ce_loss_with_sae == pytest.approx(single.ce_loss_with_sae, rel=1e-5)
    assert together["random"].explained_variance == pytest.approx(single.explained_variance)
    assert together["identity"].kl_div_score == pytest.approx(1.0, abs=1e-4)


def test_an_sae_loaded_from_saelens_format_scores_as_the_original(lm, config, tmp_path):
    """A published SAE's layer comes from its hook name; its scores are the saelib SAE's."""
    from saelib.saes.formats import load_any, save_saelens

    sae = random_sae(lm.d_model)
    save_saelens(sae, tmp_path, model_name="smollm2-135m", layer=LAYER)
    loaded = load_any(tmp_path)
    assert loaded.metadata["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    single = run_core_eval(sae, lm, config=config)
    again = run_core_eval(loaded, lm, config=config)  # layer from the hook name
    assert again.kl_div_score == pytest.approx(single.kl_div_score, rel=1e-5)
    assert again.explained_variance == pytest.approx(single.explained_variance, rel=1e-5)
