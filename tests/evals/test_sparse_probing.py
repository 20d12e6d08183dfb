"""Sparse probing: planted latents are found, shuffled labels give chance, splits, a real run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from saelib.evals.sparse_probing import (
    SparseProbingConfig,
    balanced_split,
    choose_classes,
    mean_pool,
    pooled_latents,
    run_sparse_probing,
    sparse_probing_from_arrays,
)
from saelib.saes import TopKConfig, TopKSAE
from saelib.saes.sparse_ops import dense_latents

MARKERS = [7, 13, 21, 40, 55]  # latent j_c that fires on class c


def planted(n_per_class: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latents, residual, labels): sparse noise latents plus latent MARKERS[c] on class c."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(MARKERS)), n_per_class)
    n = len(labels)
    latents = rng.exponential(0.1, (n, 64)) * (rng.random((n, 64)) < 0.2)
    latents[np.arange(n), np.array(MARKERS)[labels]] += 1.0 + rng.random(n)
    residual = rng.normal(size=(n, 16))
    residual[np.arange(n), labels] += 3.0  # the residual knows the class too
    return latents, residual, labels


def test_top1_probe_finds_the_planted_latent():
    latents, residual, labels = planted()
    config = SparseProbingConfig(n_train_per_class=25, n_test_per_class=15, ks=(1, 5))
    output = sparse_probing_from_arrays(latents, residual, labels, config)
    assert output.classes == ["0", "1", "2", "3", "4"]
    assert output.sae_top_latents[1] == {str(c): [j] for c, j in enumerate(MARKERS)}
    assert min(output.sae_accuracy_per_class[1].values()) >= 0.95
    assert output.sae_multiclass_accuracy[1] >= 0.95
    assert output.residual_accuracy > 0.8 and output.residual_multiclass_accuracy > 0.6
    assert output.n_train == 5 * 25 and output.n_test == 5 * 15


def test_shuffled_labels_give_chance_accuracy():
    latents, residual, labels = planted(n_per_class=100)
    shuffled = np.random.default_rng(1).permutation(labels)
    config = SparseProbingConfig(n_train_per_class=50, n_test_per_class=50)
    output = sparse_probing_from_arrays(latents, residual, shuffled, config)
    assert output.ks == [1, 2, 5, 10, 20, 50]
    for k in output.ks:
        assert abs(output.sae_accuracy[k] - 0.5) < 0.1, k
        assert abs(output.sae_multiclass_accuracy[k] - 0.2) < 0.1, k
    assert abs(output.residual_accuracy - 0.5) < 0.1


def test_split_is_balanced_disjoint_and_seeded():
    labels = np.array(["a"] * 30 + ["b"] * 12 + ["c"] * 50)
    train, test = balanced_split(labels, ["a", "b", "c"], n_train=7, n_test=5, seed=0)
    assert sorted(labels[train].tolist()) == ["a"] * 7 + ["b"] * 7 + ["c"] * 7
    assert sorted(labels[test].tolist()) == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert not set(train) & set(test)
    again = balanced_split(labels, ["a", "b", "c"], n_train=7, n_test=5, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = balanced_split(labels, ["a", "b", "c"], n_train=7, n_test=5, seed=1)
    assert not np.array_equal(other[0], train)
    with pytest.raises(ValueError, match="'b' has 12 texts"):
        balanced_split(labels, ["a", "b"], n_train=8, n_test=5, seed=0)


def test_classes_too_small_are_dropped_or_refused():
    labels = np.array(["a"] * 30 + ["b"] * 12 + ["c"] * 50)
    config = SparseProbingConfig(n_train_per_class=8, n_test_per_class=5)
    with pytest.warns(UserWarning, match="dropped classes"):
        assert choose_classes(labels, config) == ["a", "c"]
    with pytest.raises(ValueError, match="fewer than 13"):
        choose_classes(labels, replace(config, classes=("a", "b")))


def test_pooling_is_the_mean_of_dense_latents_per_text(make_sae):
    sae = make_sae(d_in=16, d_sae=64, k=4)
    acts = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    doc_index = torch.tensor([0] * 10 + [1] * 25 + [3] * 15)  # text 2 has no tokens
    config = SparseProbingConfig(sae_batch_size=7)
    pooled = pooled_latents(sae, acts, doc_index, 4, config, progress=False)
    with torch.no_grad():
        output = sae(acts)
    dense = dense_latents(output.acts, output.indices, 64)
    for text, rows in {0: slice(0, 10), 1: slice(10, 35), 3: slice(35, 50)}.items():
        np.testing.assert_allclose(pooled[text], dense[rows].mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(mean_pool(acts, doc_index, 4)[text], acts[rows].mean(0), 1e-5)
    assert not pooled[2].any()


@pytest.mark.slow
def test_end_to_end_on_the_real_model(tmp_path):
    from saelib.lm import load_lm

    lm = load_lm("smollm2-135m")
    sae = TopKSAE(TopKConfig(d_in=576, d_sae=512, k=16), torch.Generator().manual_seed(0))
    sae.metadata = {"model": "smollm2-135m", "layer": 3}
    config = SparseProbingConfig(
        classes=("Mathematics", "People", "Geography"),
        n_train_per_class=8,
        n_test_per_class=4,
        ks=(1, 5),
        context_length=48,
    )
    output = run_sparse_probing(sae, lm, config=config, progress=False)
    accuracies = [*output.sae_accuracy.values(), *output.sae_multiclass_accuracy.values()]
    for per_class in output.sae_accuracy_per_class.values():
        accuracies += per_class.values()
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert output.residual_accuracy > 0.5 and output.residual_multiclass_accuracy > 1 / 3
    assert output.metadata["layer"] == 3 and output.n_train == 24 and output.n_test == 12
    saved = json.loads(output.save(tmp_path / "probing.json").read_text())
    assert saved["sae_accuracy"].keys() == {"1", "5"}
    assert saved["config"]["classes"] == ["Mathematics", "People", "Geography"]
