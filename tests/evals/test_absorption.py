"""First-letter feature absorption: word list, a planted absorption case, and an end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from saelib.evals.absorption import (
    AbsorptionConfig,
    evaluate_letters,
    find_main_latents,
    first_letter_words,
    run_absorption_eval,
    train_letter_probes,
    word_absorption,
    word_arrays,
)
from saelib.lm import load_lm
from saelib.saes import TopKConfig, TopKSAE

# The planted world: letters a, b, c, s each own a residual direction. A fifth of the "s" words
# fall into 8 small token groups (like " short", " shortly", ...), each with its own direction.
LETTERS = "abcs"
D_IN, D_SAE, N_GROUPS, GROUP_SIZE, WORDS_PER_LETTER = 24, 32, 8, 5, 200
PLANTED_FRACTION = N_GROUPS * GROUP_SIZE / WORDS_PER_LETTER  # 0.2
MAIN_S = 0  # latent index of the main "s" latent; 1..3 are a, b, c; 4..11 the group latents


@pytest.fixture(scope="module")
def basis() -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=generator))
    return q.T.numpy()  # rows: s, a, b, c, then the 8 group directions, then noise directions


def planted_words(basis: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residuals, first letters, group id or -1) for WORDS_PER_LETTER words of each letter."""
    rng = np.random.default_rng(seed)
    letter_dirs = {"s": basis[0], "a": basis[1], "b": basis[2], "c": basis[3]}
    rows, letters, groups = [], [], []
    for letter in LETTERS:
        for i in range(WORDS_PER_LETTER):
            group = i % N_GROUPS if letter == "s" and i < N_GROUPS * GROUP_SIZE else -1
            x = letter_dirs[letter] + (basis[4 + group] if group >= 0 else 0.0)
            rows.append(x + 0.02 * rng.standard_normal(D_IN))
            letters.append(letter)
            groups.append(group)
    return np.array(rows, dtype=np.float32), np.array(letters), np.array(groups)


def planted_sae(basis: np.ndarray, absorbing: bool) -> TopKSAE:
    """Latent 0 reads "s"; latents 4..11 fire on one token group each.

    absorbing=True: a group latent's decoder is ("s" + group direction) / sqrt(2), and its
    direction suppresses latent 0, so for group words it takes over the "s" information.
    absorbing=False (control): latent 0 fires on every "s" word; group latents are pure tokens.
    """
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=4, use_decoder_bias=False))
    enc, dec = np.zeros((D_SAE, D_IN)), np.zeros((D_SAE, D_IN))
    enc[:4] = dec[:4] = basis[:4]
    groups = basis[4 : 4 + N_GROUPS]
    if absorbing:
        dec[4:12] = (basis[0] + groups) / np.sqrt(2)
        enc[4:12] = np.sqrt(2) * groups
        enc[MAIN_S] = basis[0] - 2 * groups.sum(axis=0)
    else:
        enc[4:12] = dec[4:12] = groups
    noise = np.random.default_rng(1).standard_normal((D_SAE - 12, D_IN - 12)) @ basis[12:]
    enc[12:] = dec[12:] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(enc))
        sae.W_dec.copy_(torch.from_numpy(dec))
        sae.b_enc.zero_()
    return sae


@pytest.fixture(scope="module")
def planted(basis):
    train = planted_words(basis, seed=1)
    test = planted_words(basis, seed=2)
    return train, test


@pytest.mark.parametrize("absorbing", [True, False])
def test_planted_absorption_is_found(basis, planted, absorbing):
    (x_train, letters_train, _), (x_test, letters_test, groups_test) = planted
    sae = planted_sae(basis, absorbing)
    arrays = word_arrays(sae, x_train, letters_train, x_test, letters_test)
    config = AbsorptionConfig()

    main, f1s = find_main_latents(
        arrays.latents_train, letters_train == "s", arrays.latents_test, letters_test == "s"
    )
    assert main == [MAIN_S]  # the group latents each add < 0.03 F1: absorbers, not splits
    recall = 1 - PLANTED_FRACTION if absorbing else 1.0
    assert f1s[0] == pytest.approx(2 * recall / (1 + recall), abs=0.02)

    probes = train_letter_probes(x_train, letters_train, LETTERS)
    is_s = letters_test == "s"
    fraction, full = word_absorption(
        x_test[is_s], arrays.latents_test[is_s], sae.W_dec.detach().numpy(),
        probes.direction("s"), main, config,
    )  # fmt: skip
    in_group = groups_test[is_s] >= 0
    assert np.array_equal(full, in_group & absorbing)
    assert np.allclose(fraction, np.where(in_group & absorbing, 1.0, 0.0), atol=0.05)

    rows = {row.letter: row for row in evaluate_letters(arrays, sae.W_dec, LETTERS, config)}
    s = rows["s"]
    assert s.main_latents == [MAIN_S] and s.n_split == 1
    assert s.probe_f1 == pytest.approx(1.0) and s.n_probe_true_positives == WORDS_PER_LETTER
    expected = PLANTED_FRACTION if absorbing else 0.0
    assert s.absorption_rate == pytest.approx(expected, abs=0.01)
    assert s.absorption_fraction == pytest.approx(expected, abs=0.02)
    assert s.n_absorbed == round(expected * WORDS_PER_LETTER)
    for latent, letter in enumerate("abc", start=1):  # nothing was planted for these
        assert rows[letter].main_latents == [latent] and rows[letter].absorption_rate == 0.0


@pytest.fixture(scope="module")
def lm():
    return load_lm("smollm2-135m")


@pytest.mark.slow
def test_word_list_is_single_token_alphabetic_words(lm):
    config = AbsorptionConfig(
        n_top_words=5000, letters="abqxz", max_words_per_letter=15, min_words_per_letter=10
    )
    words = first_letter_words(lm.tokenizer, config)
    assert sorted(words) == ["a", "b", "q"]  # x and z have too few single-token words
    for letter, letter_words in words.items():
        assert len(letter_words) == 15 and len(set(letter_words)) == 15
        for word in letter_words:
            assert word[0] == letter and len(word) >= 2
            assert word.isascii() and word.isalpha() and word.islower()
            assert len(lm.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.slow
def test_end_to_end_on_the_real_model(lm, tmp_path):
    config = AbsorptionConfig(
        n_top_words=5000, letters="abst", max_words_per_letter=30, min_words_per_letter=10,
        n_icl_examples=2, queries_per_sequence=8, max_k=3,
    )  # fmt: skip
    sae = TopKSAE(
        TopKConfig(d_in=lm.d_model, d_sae=256, k=8), generator=torch.Generator().manual_seed(0)
    )
    sae.metadata["layer"] = 3
    output = run_absorption_eval(sae, lm, config=config, progress=False)
    assert output.layer == 3 and [row.letter for row in output.letters] == list("abst")
    for row in output.letters:
        assert row.n_words == 30 and 1 <= row.n_split <= 3
        assert len(row.k_sparse_f1) == min(row.n_split + 1, 3)  # stops at the first k rejected
        assert row.probe_f1 > 0.25  # a linear probe reads first letters well above chance
        assert 0 <= row.n_absorbed <= row.n_probe_true_positives
    for value in (output.mean_absorption_rate, output.mean_absorption_fraction):
        assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0
    assert math.isfinite(output.mean_n_split) and output.mean_n_split >= 1
    saved = json.loads(output.save(tmp_path / "absorption.json").read_text())
    assert saved["config"]["line_template"] == config.line_template
    assert len(saved["letters"]) == 4
