"""Harvesting through nnsight on the real embedded model and data, and the on-disk cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelib.activations import CorruptCacheError, HarvestConfig, harvest
from saelib.activations.cache import new_staging_folder
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
    [shard] = first.meta["shards"]
    data = (first.path / shard["name"]).read_bytes()
    assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()


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
    left = list(tmp_path.iterdir())
    assert all(path.suffix == ".lock" and path.stat().st_size == 0 for path in left), left


def test_split_by_document_keeps_documents_whole(tmp_path):
    acts = harvest(TINY, progress=False, cache_dir=tmp_path)
    train, val = acts.split_by_document(0.25, seed=0)
    assert len(train) + len(val) == len(acts)
    shared = set(acts.doc_index[train].tolist()) & set(acts.doc_index[val].tolist())
    assert not shared


# --- cache integrity and concurrent harvests ------------------------------------------------

SHARDED = dataclasses.replace(TINY, shard_size=50)  # 120 vectors in three shards
MIDDLE_SHARD = "shard_00001.safetensors"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return harvest(SHARDED, progress=False, cache_dir=tmp_path_factory.mktemp("original"))


@pytest.fixture
def cached(original, tmp_path) -> Path:
    """A fresh copy of the original cache folder, to corrupt."""
    folder = tmp_path / original.path.name
    shutil.copytree(original.path, folder)
    return folder


def flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    begin = 8 + header_length + header["acts"]["data_offsets"][0] + 400
    data[begin : begin + 16] = bytes(byte ^ 0x5A for byte in data[begin : begin + 16])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))  # same size: only the checksum tells


def garbage_json(path: Path) -> None:
    path.write_text('{"shards": [not json')


CORRUPTIONS = [
    (flip_tensor_bytes, MIDDLE_SHARD),
    (truncate, MIDDLE_SHARD),
    (garbage, MIDDLE_SHARD),
    (Path.unlink, MIDDLE_SHARD),
    (garbage_json, "meta.json"),
]


def assert_same_activations(actual, expected) -> None:
    for column in ("acts", "doc_index", "position", "token_id"):
        assert torch.equal(getattr(actual, column), getattr(expected, column)), column


def test_flipped_tensor_bytes_still_parse_as_safetensors(original, cached):
    """Why checksums are needed: the format itself does not notice changed tensor data."""
    flip_tensor_bytes(cached / MIDDLE_SHARD)
    changed = load_file(cached / MIDDLE_SHARD)["acts"]
    assert not torch.equal(changed, original.acts[50:100])


@pytest.mark.parametrize(
    ("corrupt", "bad_file"), CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS]
)
def test_a_corrupt_cache_is_named_and_rebuilt(
    original, cached: Path, corrupt: Callable[[Path], None], bad_file: str
):
    corrupt(cached / bad_file)
    with pytest.raises(CorruptCacheError) as raised:
        harvest(SHARDED, progress=False, cache_dir=cached.parent, on_corrupt="error")
    message = str(raised.value)
    assert str(cached) in message and bad_file in message and "\n" not in message
    assert cached.is_dir(), "on_corrupt='error' removed the folder it reports"

    with pytest.warns(UserWarning) as caught:
        rebuilt = harvest(SHARDED, progress=False, cache_dir=cached.parent)
    [warning] = [str(w.message) for w in caught if "corrupt activation cache" in str(w.message)]
    assert str(cached) in warning and bad_file in warning
    assert not rebuilt.from_cache and rebuilt.path == cached
    assert_same_activations(rebuilt, original)

    again = harvest(SHARDED, progress=False, cache_dir=cached.parent, on_corrupt="error")
    assert again.from_cache
    assert_same_activations(again, original)


def test_on_corrupt_must_be_rebuild_or_error(tmp_path):
    with pytest.raises(ValueError, match="on_corrupt must be"):
        harvest(TINY, progress=False, cache_dir=tmp_path, on_corrupt="ignore")


def test_a_failed_harvest_leaves_neither_a_final_nor_a_staging_folder(lm, tmp_path):
    def fail(module, inputs, output):
        raise RuntimeError("interrupted")

    handle = lm.hf_model.model.layers[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            harvest(TINY, progress=False, cache_dir=tmp_path)
    finally:
        handle.remove()
    assert [path.name for path in tmp_path.iterdir()] == [f"{TINY.cache_key()}.lock"]


def test_staging_folders_are_unique_per_call_and_process(tmp_path):
    final = tmp_path / "somekey"
    first, second = new_staging_folder(final), new_staging_folder(final)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.startswith(f"somekey.partial-{os.getpid()}-")
    assert not final.exists()


def test_leftover_staging_folders_of_a_killed_harvest_are_removed(original, tmp_path):
    leftover = tmp_path / f"{SHARDED.cache_key()}.partial-999999-deadbeef"
    leftover.mkdir()
    (leftover / MIDDLE_SHARD).write_bytes(b"half written")
    acts = harvest(SHARDED, progress=False, cache_dir=tmp_path)
    assert not leftover.exists()
    assert_same_activations(acts, original)


def _harvest_in_child(cache_dir: str, ready, go, out: str) -> None:
    """Runs in a spawned process: load the model, wait for the parent's signal, harvest TINY."""
    lm = load_lm("smollm2-135m")
    counter = ForwardCounter(lm)
    ready.set()
    go.wait(timeout=300)
    cache_was_complete = (Path(cache_dir) / TINY.cache_key() / "meta.json").exists()
    result = harvest(TINY, progress=False, cache_dir=Path(cache_dir))
    torch.save(
        {
            "acts": result.acts,
            "from_cache": result.from_cache,
            "forward_calls": counter.calls,
            "cache_was_complete": cache_was_complete,
        },
        out,
    )


def test_concurrent_harvests_of_one_key_run_one_forward_pass(lm, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "child.pt"
    context = multiprocessing.get_context("spawn")
    ready, go = context.Event(), context.Event()
    child = context.Process(target=_harvest_in_child, args=(str(cache_dir), ready, go, str(out)))
    child.start()

    def release_child_mid_harvest(module, inputs, output):
        if not go.is_set():
            go.set()
            time.sleep(1.0)  # the child asks for the same key while this harvest is under way

    counter = ForwardCounter(lm)
    release = lm.hf_model.model.layers[0].register_forward_hook(release_child_mid_harvest)
    try:
        assert ready.wait(timeout=300), "the child process did not load the model"
        ours = harvest(TINY, progress=False, cache_dir=cache_dir)
    finally:
        release.remove()
        counter.handle.remove()
        child.join(timeout=300)
    assert child.exitcode == 0
    theirs = torch.load(out)
    assert not theirs["cache_was_complete"], "the child started after the cache was complete"
    assert counter.calls > 0 and not ours.from_cache
    assert theirs["forward_calls"] == 0 and theirs["from_cache"]
    assert torch.equal(ours.acts, theirs["acts"])
    key = TINY.cache_key()
    assert sorted(path.name for path in cache_dir.iterdir()) == [key, f"{key}.lock"]
    reread = harvest(TINY, progress=False, cache_dir=cache_dir, on_corrupt="error")
    assert reread.from_cache
    assert_same_activations(reread, ours)
