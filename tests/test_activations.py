"""Harvesting through nnsight on the real embedded model and data, and the on-disk cache."""

from __future__ import annotations

import pytest
import torch

from saelib.activations import HarvestConfig, harvest
from saelib.data import load_documents
from saelib.lm import load_lm

pytestmark = pytest.mark.slow

TINY = HarvestConfig(
    model="smollm2-135m", layer=2, dataset="gsm8k", positions="answer", max_tokens=120,
    context_length=96, batch_size=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def lm():
    return load_lm("smollm2-135m")


class ForwardCounter:
    """Counts real forward passes through the model's first decoder block."""

    def __init__(self, lm):
        self.calls = 0
        self.handle = lm.hf_model.model.layers[0].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1


def test_embedded_model_is_the_expected_llama(lm):
    assert type(lm.hf_model).__name__ == "LlamaForCausalLM"
    assert (lm.n_layers, lm.d_model) == (30, 576)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    completion = lm.hf_model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert lm.tokenizer.decode(completion[0, ids["input_ids"].shape[1] :]).startswith(" Paris")


def test_second_request_reads_the_cache_without_a_forward_pass(lm, tmp_path):
    counter = ForwardCounter(lm)
    try:
        first = harvest(TINY, progress=False, cache_dir=tmp_path)
        calls_after_first = counter.calls
        second = harvest(TINY, progress=False, cache_dir=tmp_path)
    finally:
        counter.handle.remove()
    assert calls_after_first > 0 and not first.from_cache
    assert counter.calls == calls_after_first, "the cached request ran the model"
    assert second.from_cache
    assert torch.equal(first.acts, second.acts) and torch.equal(first.doc_index, second.doc_index)
    assert len(first) == TINY.max_tokens
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


def test_activations_equal_the_models_hidden_states(lm, tmp_path):
    config = HarvestConfig(layer=4, positions="all", max_tokens=40, context_length=64)
    acts = harvest(config, progress=False, cache_dir=tmp_path)
    document = load_documents("gsm8k", limit=1)[0]
    ids = lm.tokenizer(document.text, return_tensors="pt", truncation=True, max_length=64)
    with torch.no_grad():
        hidden = lm.hf_model(**ids, output_hidden_states=True).hidden_states[config.layer + 1]
    rows = acts.doc_index == 0
    expected = hidden[0, acts.position[rows]]
    torch.testing.assert_close(acts.acts[rows], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(acts.token_id[rows], ids["input_ids"][0, acts.position[rows]])


def test_answer_positions_cover_only_solution_tokens(lm, tmp_path):
    acts = harvest(TINY, progress=False, cache_dir=tmp_path)
    documents = load_documents("gsm8k", limit=int(acts.doc_index.max()) + 1)
    for doc_index in acts.doc_index.unique().tolist()[:3]:
        document = documents[doc_index]
        rows = acts.doc_index == doc_index
        kept_text = lm.tokenizer.decode(acts.token_id[rows])
        answer = document.text[document.answer_start :]
        assert kept_text.strip() in answer.strip() or answer.strip().startswith(kept_text.strip())
        assert "Question" not in kept_text
    assert (acts.token_id != lm.tokenizer.pad_token_id).all(), "a pad token was kept"


def test_last_position_gives_one_vector_per_document(tmp_path):
    config = HarvestConfig(layer=1, positions="last", max_tokens=10, context_length=64)
    acts = harvest(config, progress=False, cache_dir=tmp_path)
    assert len(acts) == 10
    assert acts.doc_index.unique().numel() == 10


def test_layer_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="layer 30 is out of range"):
        harvest(HarvestConfig(layer=30, max_tokens=10), progress=False, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "a failed request left files in the cache"


def test_split_by_document_keeps_documents_whole(tmp_path):
    acts = harvest(TINY, progress=False, cache_dir=tmp_path)
    train, val = acts.split_by_document(0.25, seed=0)
    assert len(train) + len(val) == len(acts)
    shared = set(acts.doc_index[train].tolist()) & set(acts.doc_index[val].tolist())
    assert not shared
