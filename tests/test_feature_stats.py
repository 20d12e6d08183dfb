"""Feature statistics against brute force on a hand-made activation set (for a TopK SAE and a
ReLU SAE, whose number of active latents varies by row), caching, real model."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saelib.activations import ActivationSet, HarvestConfig
from saelib.features import store
from saelib.features.stats import FeatureStats, FeatureStatsConfig, compute_feature_stats
from saelib.features.store import (
    checkpoint_harvest_config,
    feature_stats_for_checkpoint,
    load_feature_stats,
)
from saelib.features.sweeps import group_boundaries, random_keys
from saelib.features.text import latent_activations_for_text
from saelib.saes import SAE, ReLUConfig, ReLUSAE, SAEOutput

WORDS = [f"w{index}" for index in range(40)]
CONTEXT_LENGTH = 18  # shorter than some documents: windows must respect the truncation
CONFIG = FeatureStatsConfig(
    n_top=5, n_quantile_groups=3, n_per_group=2, context_left=4, context_right=2, n_logits=4,
    n_neighbours=5, histogram_bins=7, batch_size=37, seed=3,
)  # fmt: skip
DEAD = 5  # a latent that never fires


class WordTokenizer:
    """Whitespace tokenizer over WORDS, called like a Hugging Face tokenizer."""

    def __call__(self, texts, truncation=False, max_length=None, **kwargs):
        ids = [[WORDS.index(word) for word in text.split()] for text in texts]
        return {"input_ids": [row[:max_length] if truncation else row for row in ids]}

    def decode(self, ids):
        return " ".join(WORDS[token] for token in ids)


def fake_lm(unembedding: torch.Tensor) -> SimpleNamespace:
    head = SimpleNamespace(weight=unembedding)
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    return SimpleNamespace(tokenizer=WordTokenizer(), hf_model=model, name="fake")


@pytest.fixture
def documents(tmp_path) -> list[list[int]]:
    """Token ids of 14 documents (as harvested: truncated), also written as a .txt dataset."""
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 26, (14,), generator=generator).tolist()
    docs = [torch.randint(0, len(WORDS), (n,), generator=generator).tolist() for n in lengths]
    text = "\n\n".join(" ".join(WORDS[token] for token in doc) for doc in docs)
    (tmp_path / "docs.txt").write_text(text)
    return [doc[:CONTEXT_LENGTH] for doc in docs]


@pytest.fixture
def activation_set(tmp_path, documents) -> ActivationSet:
    """Rows for most tokens: never position 0, some positions dropped, the last doc cut short."""
    generator = torch.Generator().manual_seed(11)
    doc_index, position, token_id = [], [], []
    for index, doc in enumerate(documents):
        kept = torch.rand(len(doc), generator=generator) > 0.15
        stop = len(doc) // 2 if index == len(documents) - 1 else len(doc)
        for place in range(1, stop):
            if kept[place]:
                doc_index.append(index), position.append(place), token_id.append(doc[place])
    n = len(doc_index)
    config = HarvestConfig(
        model="toy", layer=0, dataset=str(tmp_path / "docs.txt"), context_length=CONTEXT_LENGTH
    )
    return ActivationSet(
        acts=torch.randn(n, 16, generator=generator) + 0.3,
        doc_index=torch.tensor(doc_index),
        position=torch.tensor(position),
        token_id=torch.tensor(token_id),
        config=config,
    )


def with_dead_latent(sae: SAE) -> SAE:
    with torch.no_grad():
        sae.b_enc[DEAD] = -100.0
    sae.metadata = {"model": "toy", "layer": 0}
    return sae


@pytest.fixture
def topk_sae(make_sae) -> SAE:
    return with_dead_latent(make_sae(d_in=16, d_sae=32, k=4, seed=1))


@pytest.fixture
def relu_sae() -> SAE:
    sae = ReLUSAE(ReLUConfig(d_in=16, d_sae=32), torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # a handful of active latents per row, a varying number
    return with_dead_latent(sae)


@pytest.fixture(params=["topk", "relu"])
def sae(request) -> SAE:
    return request.getfixturevalue(f"{request.param}_sae")


@pytest.fixture
def unembedding() -> torch.Tensor:
    return torch.randn(len(WORDS), 16, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def stats(sae, activation_set, unembedding) -> FeatureStats:
    return compute_feature_stats(sae, activation_set, fake_lm(unembedding), CONFIG, progress=False)


def dense(sae, activation_set) -> torch.Tensor:
    with torch.no_grad():
        return sae(activation_set.acts).dense()


def test_relu_code_varies_in_width(relu_sae, activation_set):
    """The second SAE is what it is meant to be: rows differ in their number of latents."""
    with torch.no_grad():
        l0 = relu_sae(activation_set.acts).l0()
    assert l0.min() < 2 and l0.max() > 4


def test_density_mean_max_and_histograms_equal_brute_force(stats, sae, activation_set):
    latents = dense(sae, activation_set)
    fired = latents > 0
    assert fired[:, DEAD].sum() == 0 and stats.n_vectors == len(activation_set)
    torch.testing.assert_close(stats.density, fired.float().mean(0))
    torch.testing.assert_close(stats.max_activation, latents.max(0).values)
    mean = latents.sum(0) / fired.sum(0).clamp_min(1)
    torch.testing.assert_close(stats.mean_activation, mean)
    bins = CONFIG.histogram_bins
    assert stats.histogram_edges.shape == (sae.d_sae, bins + 1)
    for latent in range(sae.d_sae):
        edges = stats.histogram_edges[latent]
        torch.testing.assert_close(edges, torch.linspace(0, float(edges[-1]), bins + 1))
        values = latents[fired[:, latent], latent].numpy()
        expected = np.histogram(values, bins=edges.numpy())[0] if len(values) else np.zeros(bins)
        assert stats.histogram_counts[latent].tolist() == expected.tolist(), latent


def test_top_examples_equal_brute_force(stats, sae, activation_set):
    latents = dense(sae, activation_set)
    for latent in range(sae.d_sae):
        values, rows = latents[:, latent].sort(descending=True)
        n = min(CONFIG.n_top, int((values > 0).sum()))
        assert stats.top_rows[latent, :n].tolist() == rows[:n].tolist()
        assert stats.top_values[latent, :n].tolist() == values[:n].tolist()
        assert (stats.top_values[latent, n:] == 0).all() and (
            stats.top_rows[latent, n:] == -1
        ).all()
        centre = stats.top_token_acts[latent, :n, CONFIG.context_left]
        assert centre.tolist() == values[:n].tolist()


def test_quantile_samples_are_the_smallest_keys_of_each_group(stats, sae, activation_set):
    latents = dense(sae, activation_set)
    G, per = CONFIG.n_quantile_groups, CONFIG.n_per_group
    boundaries = group_boundaries(stats.max_activation, G)
    for latent in range(sae.d_sae):
        rows = torch.nonzero(latents[:, latent] > 0).flatten()
        values = latents[rows, latent]
        group = (values.unsqueeze(1) >= boundaries[latent]).sum(1)
        keys = random_keys(rows, torch.full_like(rows, latent), sae.d_sae, CONFIG.seed)
        for g in range(G):
            slots = slice(g * per, (g + 1) * per)
            members = group == g
            chosen = rows[members][keys[members].argsort()[:per]]
            chosen = chosen[latents[chosen, latent].argsort(descending=True)]  # shown largest first
            n = len(chosen)
            assert stats.quantile_rows[latent, slots][:n].tolist() == chosen.tolist()
            assert (stats.quantile_group[latent, slots][:n] == g).all()
            assert (stats.quantile_group[latent, slots][n:] == -1).all()
            assert (
                stats.quantile_values[latent, slots][:n].tolist()
                == latents[chosen, latent].tolist()
            )
    assert (stats.quantile_group >= 0).sum() > sae.d_sae  # the groups are not all empty


def expected_window(activation_set, latents, documents, latent, row, with_tokenizer):
    """Brute force: (token ids, activations) around ``row`` for ``latent``."""
    lookup = {
        (d, p): index
        for index, (d, p) in enumerate(
            zip(activation_set.doc_index.tolist(), activation_set.position.tolist(), strict=True)
        )
    }
    doc, place = int(activation_set.doc_index[row]), int(activation_set.position[row])
    tokens, acts = [], []
    for position in range(place - CONFIG.context_left, place + CONFIG.context_right + 1):
        found = lookup.get((doc, position))
        if found is not None:
            tokens.append(int(activation_set.token_id[found]))
            acts.append(float(latents[found, latent]))
        else:
            inside = with_tokenizer and 0 <= position < len(documents[doc])
            tokens.append(documents[doc][position] if inside else -1)
            acts.append(math.nan)
    return tokens, acts


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_context_windows_equal_brute_force(
    with_tokenizer, sae, activation_set, documents, unembedding
):
    lm = fake_lm(unembedding) if with_tokenizer else None
    stats = compute_feature_stats(sae, activation_set, lm, CONFIG, progress=False)
    latents = dense(sae, activation_set)
    n_checked = n_outside = 0
    for kind in ("top", "quantile"):
        rows = getattr(stats, f"{kind}_rows")
        tokens, acts = getattr(stats, f"{kind}_tokens"), getattr(stats, f"{kind}_token_acts")
        for latent, slot in torch.nonzero(rows >= 0).tolist():
            row = int(rows[latent, slot])
            expected = expected_window(
                activation_set, latents, documents, latent, row, lm is not None
            )
            assert tokens[latent, slot].tolist() == expected[0]
            torch.testing.assert_close(
                acts[latent, slot], torch.tensor(expected[1]), equal_nan=True
            )
            n_checked += 1
            n_outside += sum(t >= 0 and math.isnan(a) for t, a in zip(*expected, strict=True))
        empty = rows < 0
        assert (tokens[empty] == -1).all() and acts[empty].isnan().all()
    assert n_checked > 100 and (n_outside > 10) == with_tokenizer


def test_neighbours_and_logits_equal_brute_force(stats, sae, activation_set, unembedding):
    active = (dense(sae, activation_set) > 0).double()
    together = active.T @ active  # [i, j]: vectors where both fire
    n_ij = together / together.diagonal().clamp_min(1)
    directions = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = directions @ directions.T
    n = CONFIG.n_neighbours
    for j in range(sae.d_sae):
        partners = [i for i in range(sae.d_sae) if i != j and together[i, j] > 0]
        ranked = sorted(partners, key=lambda i: (-n_ij[i, j], i))[:n]
        assert stats.coactive_latents[j, : len(ranked)].tolist() == ranked
        assert (stats.coactive_latents[j, len(ranked) :] == -1).all()
        torch.testing.assert_close(stats.coactive_scores[j, : len(ranked)], n_ij[ranked, j].float())
        magnitude = cos[j].abs()
        magnitude[j] = -1
        similar = magnitude.argsort(descending=True)[:n]
        assert stats.similar_latents[j].tolist() == similar.tolist()
        torch.testing.assert_close(stats.similar_scores[j], cos[j, similar])
    logits = sae.W_dec.detach() @ unembedding.T
    top, bottom = logits.topk(CONFIG.n_logits), logits.topk(CONFIG.n_logits, largest=False)
    assert torch.equal(stats.promoted_tokens, top.indices)
    assert torch.equal(stats.suppressed_tokens, bottom.indices)
    torch.testing.assert_close(stats.promoted_logits, top.values)
    torch.testing.assert_close(stats.suppressed_logits, bottom.values)


def test_vocab_covers_every_token_used(stats):
    used = torch.cat(
        [
            stats.top_tokens.flatten(),
            stats.quantile_tokens.flatten(),
            stats.promoted_tokens.flatten(),
        ]
        + [stats.suppressed_tokens.flatten()]
    )
    assert set(stats.vocab) == set(used[used >= 0].tolist())
    assert all(stats.vocab[token] == WORDS[token] for token in stats.vocab)


def test_without_lm_logits_are_empty_and_batching_changes_nothing(sae, activation_set, stats):
    bare = compute_feature_stats(sae, activation_set, None, CONFIG, progress=False)
    assert (bare.promoted_tokens == -1).all() and bare.suppressed_logits.isnan().all()
    assert bare.vocab == {}
    one_batch = replace(CONFIG, batch_size=10_000)
    other = compute_feature_stats(
        sae, activation_set, fake_lm(torch.zeros(1, 16)), one_batch, False
    )
    for name in ("top_rows", "quantile_rows", "histogram_counts", "coactive_latents"):
        assert torch.equal(getattr(other, name), getattr(stats, name)), name


def test_unreadable_dataset_leaves_outside_tokens_out(sae, activation_set, unembedding):
    activation_set.config = replace(activation_set.config, dataset="/nonexistent/docs.txt")
    with pytest.warns(UserWarning, match="left out"):
        stats = compute_feature_stats(sae, activation_set, fake_lm(unembedding), CONFIG, False)
    unknown = stats.top_token_acts.isnan()
    assert (stats.top_tokens[unknown] == -1).all() and (stats.top_tokens[~unknown] >= 0).all()


def assert_same_stats(first: FeatureStats, second: FeatureStats) -> None:
    for item in fields(FeatureStats):
        a, b = getattr(first, item.name), getattr(second, item.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype, item.name
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            assert a == b, item.name


def test_save_load_round_trip(stats, tmp_path):
    stats.save(tmp_path / "stats")
    stats.save(tmp_path / "stats")  # replaces the previous save
    assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.txt", "stats"]
    assert_same_stats(load_feature_stats(tmp_path / "stats"), stats)


def test_checkpoint_stats_are_cached(sae, activation_set, unembedding, tmp_path, monkeypatch):
    checkpoint = sae.save(tmp_path / "checkpoint", extra=sae.metadata)
    lm = fake_lm(unembedding)
    first = feature_stats_for_checkpoint(checkpoint, activation_set, lm, CONFIG, progress=False)
    saved = checkpoint / "feature_stats" / "stats.safetensors"
    modified = saved.stat().st_mtime_ns

    def no_computing(*args, **kwargs):
        raise AssertionError("the cached stats were recomputed")

    monkeypatch.setattr(store, "compute_feature_stats", no_computing)
    second = feature_stats_for_checkpoint(checkpoint, activation_set, lm, CONFIG, progress=False)
    assert saved.stat().st_mtime_ns == modified
    assert_same_stats(first, second)
    monkeypatch.undo()
    other_config = replace(CONFIG, n_top=3)
    third = feature_stats_for_checkpoint(checkpoint, activation_set, lm, other_config, False)
    assert third.top_rows.shape[1] == 3 and saved.stat().st_mtime_ns != modified


@pytest.mark.slow
def test_real_model_end_to_end(tmp_path):
    from saelib.activations import harvest
    from saelib.data import load_documents
    from saelib.lm import load_lm
    from saelib.saes import TopKConfig, TopKSAE

    lm = load_lm("smollm2-135m")
    harvest_config = HarvestConfig(layer=2, dataset="gsm8k", max_tokens=300, context_length=64)
    activations = harvest(harvest_config, progress=False, cache_dir=tmp_path)
    sae = TopKSAE(TopKConfig(d_in=576, d_sae=48, k=6), torch.Generator().manual_seed(0))
    sae.metadata = {"model": "smollm2-135m", "layer": 2, "dataset": "gsm8k"}
    config = FeatureStatsConfig(batch_size=128)
    stats = compute_feature_stats(sae, activations, lm, config, progress=False)

    vocab_size = lm.hf_model.lm_head.weight.shape[0]
    assert ((stats.promoted_tokens >= 0) & (stats.promoted_tokens < vocab_size)).all()
    logits = sae.W_dec.detach() @ lm.hf_model.lm_head.weight.detach().T
    torch.testing.assert_close(stats.promoted_logits, logits.topk(config.n_logits).values)
    texts = list(stats.vocab.values())
    assert all(isinstance(text, str) and "Ġ" not in text for text in texts)
    assert sum(text.startswith(" ") and text[1:].isalpha() for text in texts) > 20  # " word"
    documents = load_documents("gsm8k", limit=int(activations.doc_index.max()) + 1)
    first_tokens = {}
    for latent, slot in torch.nonzero(stats.top_rows >= 0).tolist():
        row = int(stats.top_rows[latent, slot])
        window = stats.top_tokens[latent, slot]
        assert window[config.context_left] == activations.token_id[row]
        doc = int(activations.doc_index[row])
        text = "".join(stats.vocab[token] for token in window.tolist() if token >= 0)
        assert text in documents[doc].text
        start = config.context_left - int(activations.position[row])  # window slot of position 0
        if start >= 0:  # the harvest left position 0 out: re-tokenized, activation unknown
            first_tokens[int(window[start])] = float(stats.top_token_acts[latent, slot, start])
    first = lm.tokenizer(documents[0].text)["input_ids"][0]
    assert first in first_tokens and all(math.isnan(act) for act in first_tokens.values())

    text = "Natalia sold clips to 48 of her friends."
    tokens, acts = latent_activations_for_text(sae, lm, text, layer=2)
    assert "".join(tokens) == text and acts.shape == (len(tokens), sae.d_sae)
    assert ((acts > 0).sum(1) <= sae.k).all() and (acts > 0).any()


def test_harvest_config_comes_from_the_checkpoint_record(tmp_path):
    recorded = HarvestConfig(layer=3, dataset="gsm8k", positions="last", max_tokens=700)
    metadata = {"model": recorded.model, "layer": 3, "dataset": "gsm8k"}
    assert checkpoint_harvest_config({**metadata, "harvest": recorded.to_dict()}) == recorded
    (tmp_path / "params.yaml").write_text("positions: answer\nmax_tokens: 50\n")
    overridden = checkpoint_harvest_config(
        {**metadata, "harvest": recorded.to_dict()}, run_dir=tmp_path, max_tokens=20
    )
    assert overridden == replace(recorded, max_tokens=20)  # the run's params play no part


def test_harvest_config_of_older_checkpoints_is_guessed(tmp_path):
    metadata = {"model": "smollm2-135m", "layer": 4, "dataset": "gsm8k"}
    assert checkpoint_harvest_config(metadata) == HarvestConfig(layer=4)
    (tmp_path / "params.yaml").write_text("positions: last\nmax_tokens: 50\nepochs: 3\n")
    guessed = checkpoint_harvest_config(metadata, run_dir=tmp_path, positions="answer")
    assert guessed == HarvestConfig(layer=4, positions="answer", max_tokens=50)
    with pytest.raises(ValueError, match="lacks"):
        checkpoint_harvest_config({"model": "smollm2-135m"})


class SignedSAE(ReLUSAE):
    """A ReLU SAE without the ReLU: its code has negative values."""

    def forward(self, x: torch.Tensor) -> SAEOutput:
        codes = self.pre_acts(x)
        return SAEOutput.from_dense(self.decode(codes), codes)


def test_codes_with_negative_values_are_refused(activation_set):
    sae = SignedSAE(ReLUConfig(d_in=16, d_sae=32), torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="non-negative"):
        compute_feature_stats(sae, activation_set, None, CONFIG, progress=False)
