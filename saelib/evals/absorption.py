"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption").

Follows SAEBench's ``absorption_first_letter`` eval, on a budget that fits a CPU.

Words. ``wordfreq.top_n_list("en", n_top_words)``, kept when the word is lower-case a-z only, at
least ``min_word_length`` long, and the tokenizer encodes ``" " + word`` as ONE token. Each
letter keeps its ``max_words_per_letter`` most frequent such words; letters with fewer than
``min_words_per_letter`` are left out. The words of each letter are split at random into train
and test (``test_fraction``).

Prompts and read position. Every word is read in the ICL prompt SAEBench uses, lines of
``line_template`` (default ``" {word} has the first letter: {LETTER}"``) joined by ``"\\n"``, and
the residual is taken after decoder block ``layer`` AT THE WORD'S OWN TOKEN (SAEBench's
``prompt_token_pos=-6`` on ``"{word} has the first letter:"``). To save forward passes, one
sequence holds ``n_icl_examples`` solved example lines (train words, never the sequence's own
queries) followed by ``queries_per_sequence`` query lines, each also written with its answer.
The model is causal, so the residual at a query's word token sees only the lines before it
(at least ``n_icl_examples`` solved examples) and the word itself: it is exactly the residual
at the word token of an ICL prompt ``"<examples>\\n {word} has the first letter:"``. The text
after the word (including its own answer) cannot reach it.

Residual probe. Per letter, a one-vs-rest logistic regression (sklearn, balanced classes,
``probe_c``) on the train residuals. Its weight vector ``w`` (in residual coordinates) is the
letter's probe; ``p = w / |w|`` its direction. Probe-positive ("probe true positive") words of a
letter are its TEST words with probe score ``w.x + b > 0``.

Main (split) latents, k-sparse probing. Latents are ranked by mean activation on the letter's
train words minus mean activation on the other train words. For k = 1..max_k a logistic
regression on the top-k latents is fit on train and its F1 measured on test. Going up from
k = 1 (previous best F1 = -inf), k is accepted while F1_k > best + f1_jump_threshold and the
search stops at the first k that is not (no probe is fit beyond it); the latents of the last
accepted k are the main latents, ``n_split`` their count (SAEBench's ``num_split_features``).

Absorption, per probe-positive word with residual ``x`` and dense SAE latents ``a``. With
``cos_l = cos(W_dec[l], p)``, the latent's probe projection ``q_l = a_l * cos_l`` (decoder rows
have unit norm, so ``a_l * W_dec[l] . p``), the residual's probe projection ``P = x . p`` and
``M = sum of q_l over the main latents``:

* Full absorption (SAEBench ``is_full_absorption``): every main latent has ``|a_l| < fire_eps``,
  the latent ``t = argmax_l q_l`` has ``cos_t >= full_absorption_cos_threshold`` (0.025),
  ``P > 0`` and ``q_t >= projection_proportion_threshold * P`` (0.4).
  ``absorption_rate = n_absorbed / n_probe_true_positives``.
* Absorption fraction (SAEBench ``absorption_fraction``): the absorbers are the non-main latents
  with ``cos_l >= fraction_cos_threshold`` (0.1) and ``q_l > 0``; ``A`` = the sum of the largest
  ``max_absorbing_latents`` (3) of their ``q_l``. The fraction is 0 when ``P <= 0`` or ``M >= P``
  or ``A < projection_proportion_threshold * P``; else 1 when ``M <= 0``; else
  ``a / (a + M)`` with ``a = min(A, P - M)``, clipped to [0, 1].
  ``absorption_fraction`` of a letter = the mean over its probe-positive words.

The means over letters skip letters with no probe-positive word (their rates are None).
``mean_n_split`` averages ``n_split`` over all evaluated letters.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from saelib.io import write_json

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class AbsorptionConfig:
    # words
    n_top_words: int = 20_000  # wordfreq list size
    letters: str = LETTERS  # candidate letters; those with too few words are dropped
    min_word_length: int = 2
    max_words_per_letter: int = 80  # the most frequent single-token words of each letter
    min_words_per_letter: int = 20
    test_fraction: float = 0.4
    # prompts
    line_template: str = " {word} has the first letter: {LETTER}"  # {LETTER}: upper-case answer
    separator: str = "\n"
    n_icl_examples: int = 4  # solved train-word lines before a sequence's first query
    queries_per_sequence: int = 16
    context_length: int = 256
    batch_size: int = 16  # sequences per forward pass
    # residual probe and k-sparse probing
    probe_c: float = 1.0  # inverse L2 strength, on residuals centred and scaled to unit variance
    max_k: int = 10
    f1_jump_threshold: float = 0.03
    # absorption (SAEBench thresholds)
    full_absorption_cos_threshold: float = 0.025
    fraction_cos_threshold: float = 0.1
    projection_proportion_threshold: float = 0.4
    max_absorbing_latents: int = 3
    fire_eps: float = 1e-8
    seed: int = 0

    def validate(self) -> None:
        if " {word}" not in self.line_template or "{" in self.line_template[: self.word_start()]:
            raise ValueError("line_template needs ' {word}' with no other field before it")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if self.max_k < 1 or self.min_words_per_letter < 2 or self.queries_per_sequence < 1:
            raise ValueError(
                "need max_k >= 1, min_words_per_letter >= 2, queries_per_sequence >= 1"
            )

    def word_start(self) -> int:
        """Characters of a line before its word (the word's leading space included)."""
        return self.line_template.index("{word}")

    def line(self, word: str) -> str:
        return self.line_template.format(word=word, LETTER=word[0].upper())


@dataclass
class LetterAbsorption:
    letter: str
    n_words: int  # train + test
    n_test_words: int
    probe_f1: float  # residual probe, test words, one-vs-rest
    n_probe_true_positives: int
    main_latents: list[int]
    n_split: int
    k_sparse_f1: list[float]  # test F1 of the k-sparse probe, k = 1 .. the first k rejected
    n_absorbed: int  # full absorptions among the probe true positives
    absorption_rate: float | None  # n_absorbed / n_probe_true_positives
    absorption_fraction: float | None  # mean absorption fraction over the probe true positives


@dataclass
class AbsorptionOutput:
    letters: list[LetterAbsorption]
    mean_absorption_rate: float | None
    mean_absorption_fraction: float | None
    mean_n_split: float
    layer: int | None
    config: AbsorptionConfig
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self)


@dataclass
class WordArrays:
    """Residuals (n, d_in), dense SAE latents (n, d_sae) and first letters (n,) of each split."""

    x_train: np.ndarray
    latents_train: np.ndarray
    letters_train: np.ndarray
    x_test: np.ndarray
    latents_test: np.ndarray
    letters_test: np.ndarray


@dataclass
class LetterProbes:
    """One-vs-rest linear probes in residual coordinates: score = x @ weights[i] + biases[i]."""

    letters: list[str]
    weights: np.ndarray  # (n_letters, d_in)
    biases: np.ndarray  # (n_letters,)

    def scores(self, x: np.ndarray, letter: str) -> np.ndarray:
        i = self.letters.index(letter)
        return x @ self.weights[i] + self.biases[i]

    def direction(self, letter: str) -> np.ndarray:
        weight = self.weights[self.letters.index(letter)]
        return weight / np.linalg.norm(weight)


# ---------------------------------------------------------------------------------------------
# words and residuals


def first_letter_words(tokenizer, config: AbsorptionConfig) -> dict[str, list[str]]:
    """Letter -> its most frequent single-token alphabetic words (see the module docstring)."""
    from wordfreq import top_n_list

    pattern = re.compile(rf"[a-z]{{{config.min_word_length},}}")
    candidates = [
        word
        for word in top_n_list("en", config.n_top_words)
        if pattern.fullmatch(word) and word[0] in config.letters
    ]
    encoded = tokenizer([" " + word for word in candidates], add_special_tokens=False)
    by_letter: dict[str, list[str]] = {letter: [] for letter in config.letters}
    for word, ids in zip(candidates, encoded["input_ids"], strict=True):
        bucket = by_letter[word[0]]
        if len(ids) == 1 and len(bucket) < config.max_words_per_letter:
            bucket.append(word)
    return {
        letter: words
        for letter, words in by_letter.items()
        if len(words) >= config.min_words_per_letter
    }


def split_words(
    words_by_letter: dict[str, list[str]], test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(train words, test words), split per letter so each letter keeps both sides."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for words in words_by_letter.values():
        shuffled = [words[i] for i in rng.permutation(len(words))]
        n_test = min(max(1, round(test_fraction * len(words))), len(words) - 1)
        test += shuffled[:n_test]
        train += shuffled[n_test:]
    return train, test


def build_sequences(
    queries: Sequence[str], examples: Sequence[str], config: AbsorptionConfig, seed: int
) -> tuple[list[str], list[list[int]]]:
    """ICL texts and, per text, the character END of each query word (see the docstring)."""
    rng = np.random.default_rng(seed)
    prefix = config.word_start()
    texts, ends = [], []
    for start in range(0, len(queries), config.queries_per_sequence):
        chunk = list(queries[start : start + config.queries_per_sequence])
        pool = sorted(set(examples) - set(chunk))
        shown = rng.choice(pool, min(config.n_icl_examples, len(pool)), replace=False)
        text, chunk_ends = config.separator.join(config.line(str(w)) for w in shown), []
        for word in chunk:
            text += config.separator if text else ""
            chunk_ends.append(len(text) + prefix + len(word))
            text += config.line(word)
        texts.append(text)
        ends.append(chunk_ends)
    return texts, ends


def word_residuals(
    lm,
    layer: int,
    words: Sequence[str],
    examples: Sequence[str],
    config: AbsorptionConfig,
    progress: bool = True,
) -> np.ndarray:
    """(len(words), d_model) residuals after ``layer`` at each word's token, in ICL prompts.

    The solved example lines are drawn from ``examples`` (the train words).
    """
    from saelib.activations import residuals_for_texts

    order = np.random.default_rng(config.seed + 1).permutation(len(words))
    queries = [words[i] for i in order]
    texts, ends = build_sequences(queries, examples, config, config.seed + 2)
    docs, positions = _word_token_positions(lm.tokenizer, texts, ends, config.context_length)
    columns = residuals_for_texts(
        lm, texts, layer, "all", config.context_length, config.batch_size, progress
    )
    rows = _rows_of(columns, docs, positions)
    expected = lm.tokenizer([" " + w for w in queries], add_special_tokens=False)["input_ids"]
    if not torch.equal(columns["token_id"][rows], torch.tensor([ids[0] for ids in expected])):
        raise RuntimeError("the residual rows read are not the query words' tokens")
    residuals = np.empty((len(words), lm.d_model), dtype=np.float32)
    residuals[order] = columns["acts"][rows].numpy()
    return residuals


def _word_token_positions(tokenizer, texts, ends, context_length: int):
    """(text index, token position) of the token ending at each query word's last character."""
    encoded = tokenizer(texts, return_offsets_mapping=True)
    docs, positions = [], []
    for doc, (offsets, word_ends) in enumerate(zip(encoded["offset_mapping"], ends, strict=True)):
        if len(offsets) > context_length:
            raise ValueError(f"a prompt has {len(offsets)} tokens > context_length")
        token_ends = {end: position for position, (_, end) in enumerate(offsets)}
        if not set(word_ends) <= set(token_ends):
            raise ValueError("a query word does not end on a token boundary")
        docs += [doc] * len(word_ends)
        positions += [token_ends[end] for end in word_ends]
    return torch.tensor(docs), torch.tensor(positions)


def _rows_of(columns: dict, docs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``residuals_for_texts`` output (sorted by document, then position) to read."""
    width = int(columns["position"].max()) + 1
    keys = columns["doc_index"] * width + columns["position"]
    wanted = docs * width + positions
    rows = torch.searchsorted(keys, wanted)
    if not torch.equal(keys[rows.clamp_max(len(keys) - 1)], wanted):
        raise RuntimeError("a query word's token is missing from the harvested residuals")
    return rows


@torch.no_grad()
def sae_latents(sae, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Dense (n, d_sae) latent activations of ``sae`` on the rows of ``x``."""
    reference = sae.W_dec
    parts = []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[start : start + batch_size])
        output = sae(batch.to(reference.device, reference.dtype))
        parts.append(output.dense().float().cpu())
    return torch.cat(parts).numpy()


def word_arrays(
    sae, x_train: np.ndarray, letters_train, x_test: np.ndarray, letters_test
) -> WordArrays:
    return WordArrays(
        x_train=x_train,
        latents_train=sae_latents(sae, x_train),
        letters_train=np.asarray(letters_train),
        x_test=x_test,
        latents_test=sae_latents(sae, x_test),
        letters_test=np.asarray(letters_test),
    )


# ---------------------------------------------------------------------------------------------
# the core steps, on arrays


def train_letter_probes(
    x: np.ndarray, word_letters: np.ndarray, letters: Sequence[str], c: float = 1.0
) -> LetterProbes:
    """One-vs-rest logistic regressions, fit on centred residuals scaled to unit variance.

    The scaling is one scalar for all dimensions, so the probe directions are those of the raw
    residual space; weights and biases are returned in raw coordinates.
    """
    mean = x.mean(axis=0)
    scale = float(np.sqrt(((x - mean) ** 2).mean())) or 1.0
    z = (x - mean) / scale
    weights, biases = [], []
    for letter in letters:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
        with threadpool_limits(limits=1):  # lbfgs on a busy thread pool is 10-30x slower
            model.fit(z, word_letters == letter)
        weight = model.coef_[0] / scale
        weights.append(weight)
        biases.append(model.intercept_[0] - weight @ mean)
    return LetterProbes(list(letters), np.stack(weights), np.array(biases))


def rank_latents(latents: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Latent indices by decreasing mean activation on positives minus mean on negatives."""
    difference = latents[positive].mean(axis=0) - latents[~positive].mean(axis=0)
    return np.argsort(-difference, kind="stable")


def k_sparse_f1(
    latents_train: np.ndarray,
    positive_train: np.ndarray,
    latents_test: np.ndarray,
    positive_test: np.ndarray,
) -> float:
    """Test F1 of a logistic regression fit on the given latent columns."""
    model = LogisticRegression(class_weight="balanced", max_iter=500)
    with threadpool_limits(limits=1):
        model.fit(latents_train, positive_train)
    predicted = model.decision_function(latents_test) > 0
    return float(f1_score(positive_test, predicted, zero_division=0.0))


def find_main_latents(
    latents_train: np.ndarray,
    positive_train: np.ndarray,
    latents_test: np.ndarray,
    positive_test: np.ndarray,
    max_k: int = 10,
    f1_jump_threshold: float = 0.03,
) -> tuple[list[int], list[float]]:
    """(main latents, test F1 for k = 1 .. the first k rejected, or max_k) by k-sparse probing
    (see the module docstring)."""
    ranked = rank_latents(latents_train, positive_train)[:max_k]
    best, main, f1s = -np.inf, [], []
    for k in range(1, len(ranked) + 1):
        columns = ranked[:k]
        f1s.append(k_sparse_f1(latents_train[:, columns], positive_train,
                               latents_test[:, columns], positive_test))  # fmt: skip
        if f1s[-1] <= best + f1_jump_threshold:
            break
        best, main = f1s[-1], [int(latent) for latent in columns]
    return main, f1s


def word_absorption(
    x: np.ndarray,
    latents: np.ndarray,
    decoder: np.ndarray,
    probe_direction: np.ndarray,
    main_latents: Sequence[int],
    config: AbsorptionConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(absorption fraction, is full absorption) for each row (see the module docstring)."""
    direction = probe_direction / np.linalg.norm(probe_direction)
    cos = decoder @ direction / np.linalg.norm(decoder, axis=1).clip(min=1e-12)
    probe_projection = x @ direction  # P
    latent_projection = latents * cos  # q
    main = list(main_latents)
    fraction = _absorption_fraction(probe_projection, latent_projection, cos, main, config)
    full = _full_absorption(probe_projection, latent_projection, latents, cos, main, config)
    return fraction, full


def _absorption_fraction(probe_projection, latent_projection, cos, main, config) -> np.ndarray:
    absorber = (cos >= config.fraction_cos_threshold) & (latent_projection > 0)
    absorber[:, main] = False
    candidates = np.where(absorber, latent_projection, 0.0)
    n_top = min(config.max_absorbing_latents, candidates.shape[1])
    top = -np.partition(-candidates, n_top - 1, axis=1)[:, :n_top]
    absorbed_total = top.sum(axis=1)  # A
    main_projection = latent_projection[:, main].sum(axis=1)  # M
    absorbed = np.minimum(absorbed_total, probe_projection - main_projection)
    with np.errstate(divide="ignore", invalid="ignore"):
        partial = np.clip(absorbed / (absorbed + main_projection), 0.0, 1.0)
    fraction = np.where(main_projection <= 0, 1.0, partial)
    no_absorption = (
        (probe_projection <= 0)
        | (main_projection >= probe_projection)
        | (absorbed_total < config.projection_proportion_threshold * probe_projection)
    )
    return np.where(no_absorption, 0.0, fraction)


def _full_absorption(probe_projection, latent_projection, latents, cos, main, config):
    main_silent = (np.abs(latents[:, main]) < config.fire_eps).all(axis=1)
    top = latent_projection.argmax(axis=1)
    top_projection = latent_projection[np.arange(len(top)), top]
    return (
        main_silent
        & (cos[top] >= config.full_absorption_cos_threshold)
        & (probe_projection > 0)
        & (top_projection >= config.projection_proportion_threshold * probe_projection)
    )


def evaluate_letter(
    letter: str,
    arrays: WordArrays,
    probes: LetterProbes,
    decoder: np.ndarray,
    config: AbsorptionConfig,
) -> LetterAbsorption:
    """Probe F1, main latents and absorption of one letter."""
    positive_train = arrays.letters_train == letter
    positive_test = arrays.letters_test == letter
    probe_positive = probes.scores(arrays.x_test, letter) > 0
    main, f1s = find_main_latents(
        arrays.latents_train, positive_train, arrays.latents_test, positive_test,
        config.max_k, config.f1_jump_threshold,
    )  # fmt: skip
    true_positive = positive_test & probe_positive
    fraction, full = word_absorption(
        arrays.x_test[true_positive], arrays.latents_test[true_positive], decoder,
        probes.direction(letter), main, config,
    )  # fmt: skip
    n_tp = int(true_positive.sum())
    return LetterAbsorption(
        letter=letter,
        n_words=int(positive_train.sum() + positive_test.sum()),
        n_test_words=int(positive_test.sum()),
        probe_f1=float(f1_score(positive_test, probe_positive, zero_division=0.0)),
        n_probe_true_positives=n_tp,
        main_latents=main,
        n_split=len(main),
        k_sparse_f1=f1s,
        n_absorbed=int(full.sum()),
        absorption_rate=float(full.mean()) if n_tp else None,
        absorption_fraction=float(fraction.mean()) if n_tp else None,
    )


def evaluate_letters(
    arrays: WordArrays,
    decoder: np.ndarray | torch.Tensor,
    letters: Sequence[str],
    config: AbsorptionConfig,
    progress: bool = False,
    probes: LetterProbes | None = None,
) -> list[LetterAbsorption]:
    """Evaluate each letter (the eval without the LM), training the residual probes unless
    ``probes`` already holds them."""
    if isinstance(decoder, torch.Tensor):
        decoder = decoder.detach().float().cpu().numpy()
    if probes is None:
        probes = train_letter_probes(arrays.x_train, arrays.letters_train, letters, config.probe_c)
    return [
        evaluate_letter(letter, arrays, probes, decoder, config)
        for letter in tqdm(letters, desc="absorption letters", disable=not progress)
    ]


def summarize(
    rows: list[LetterAbsorption], config: AbsorptionConfig, layer: int | None, meta: dict
) -> AbsorptionOutput:
    rates = [row.absorption_rate for row in rows if row.absorption_rate is not None]
    fractions = [row.absorption_fraction for row in rows if row.absorption_fraction is not None]
    return AbsorptionOutput(
        letters=rows,
        mean_absorption_rate=float(np.mean(rates)) if rates else None,
        mean_absorption_fraction=float(np.mean(fractions)) if fractions else None,
        mean_n_split=float(np.mean([row.n_split for row in rows])) if rows else 0.0,
        layer=layer,
        config=config,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# the eval


@dataclass
class AbsorptionData:
    """What the eval needs from the language model; shared by every SAE of the same layer."""

    words_by_letter: dict[str, list[str]]
    train: list[str]
    test: list[str]
    residuals: np.ndarray  # (len(train) + len(test), d_model)
    layer: int
    model: str
    _probes: dict[float, LetterProbes] = field(default_factory=dict, repr=False, compare=False)

    def letter_probes(self, c: float) -> LetterProbes:
        """The residual probes (they do not depend on the SAE): trained once per ``c``."""
        if c not in self._probes:
            x_train = self.residuals[: len(self.train)]
            letters = np.asarray([word[0] for word in self.train])
            self._probes[c] = train_letter_probes(x_train, letters, list(self.words_by_letter), c)
        return self._probes[c]


def prepare_absorption(
    lm, layer: int, config: AbsorptionConfig | None = None, progress: bool = True
) -> AbsorptionData:
    """Pick the words and read their residuals at ``layer`` (the only language-model work)."""
    config = config or AbsorptionConfig()
    config.validate()
    if isinstance(lm, str):
        from saelib.lm import load_lm

        lm = load_lm(lm)
    words_by_letter = first_letter_words(lm.tokenizer, config)
    if len(words_by_letter) < 2:
        raise ValueError(f"only {len(words_by_letter)} letter(s) have enough words")
    train, test = split_words(words_by_letter, config.test_fraction, config.seed)
    residuals = word_residuals(lm, layer, train + test, train, config, progress)
    return AbsorptionData(words_by_letter, train, test, residuals, int(layer), lm.name)


def absorption_from_data(
    sae, data: AbsorptionData, config: AbsorptionConfig | None = None, progress: bool = True
) -> AbsorptionOutput:
    """The eval of one SAE on prepared residuals (no language-model forward pass)."""
    config = config or AbsorptionConfig()
    started = time.perf_counter()
    n_train = len(data.train)
    arrays = word_arrays(
        sae, data.residuals[:n_train], [w[0] for w in data.train], data.residuals[n_train:],
        [w[0] for w in data.test],
    )  # fmt: skip
    probes = data.letter_probes(config.probe_c)
    letters = list(data.words_by_letter)
    rows = evaluate_letters(arrays, sae.W_dec, letters, config, progress, probes)
    meta = {
        "model": data.model,
        "d_sae": int(sae.d_sae),
        "n_train_words": n_train,
        "n_test_words": len(data.test),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return summarize(rows, config, data.layer, meta)


def run_absorption_eval(
    sae,
    lm,
    layer: int | None = None,
    config: AbsorptionConfig | None = None,
    progress: bool = True,
) -> AbsorptionOutput:
    """First-letter feature absorption of ``sae`` on ``lm`` (a LoadedLM or a model source)."""
    layer = sae.metadata.get("layer") if layer is None else layer
    if layer is None:
        raise ValueError("pass layer=...: the SAE's metadata has no 'layer'")
    data = prepare_absorption(lm, layer, config, progress)
    return absorption_from_data(sae, data, config, progress)
