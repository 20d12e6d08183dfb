"""Sentence embeddings: the packaged all-MiniLM-L6-v2 loaded offline, equal to
sentence-transformers' embeddings, and cached (a second request runs no model; a corrupt cache
is refused naming its folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from saelib import embeddings
from saelib.data import load_documents
from saelib.embeddings import (
    MODEL_PACKAGE,
    MODEL_PACKAGE_VERSION,
    CorruptEmbeddingCacheError,
    EmbeddingConfig,
    SentenceEncoder,
    embed_documents,
    model_folder,
    package_version,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SMALL = EmbeddingConfig(dataset="wiki", limit=32)


class CountingEncoder(SentenceEncoder):
    """The real encoder, counting how often it is loaded."""

    loaded = 0

    def __init__(self, device="cpu"):
        type(self).loaded += 1
        super().__init__(device)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def computed_then_cached(cache_root):
    """Embed 32 wiki texts into an empty cache, then ask again; count encoder loads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embeddings, "SentenceEncoder", CountingEncoder)
        first = embed_documents(SMALL, cache_dir=cache_root, batch_size=8)
        loads_after_first = CountingEncoder.loaded
        second = embed_documents(SMALL, cache_dir=cache_root, batch_size=8)
    return first, second, loads_after_first, CountingEncoder.loaded


def test_a_second_request_reads_the_cache(computed_then_cached, cache_root):
    first, second, loads_after_first, loads_after_second = computed_then_cached
    assert loads_after_first == 1 and loads_after_second == 1, "the cached request ran the model"
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.embeddings, second.embeddings)
    assert first.folder == second.folder == cache_root / SMALL.cache_key()
    assert sorted(path.name for path in first.folder.iterdir()) == [
        "embeddings.safetensors",
        "meta.json",
    ]
    assert not list(cache_root.rglob("*.tmp")), "a staging folder was left behind"


def test_embeddings_are_unit_vectors_with_their_documents_and_topics(computed_then_cached):
    result = computed_then_cached[1]
    documents = load_documents("wiki", limit=32)
    assert result.embeddings.shape == (32, 384) and result.embeddings.dtype == torch.float32
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(32))
    assert torch.equal(result.doc_index, torch.arange(32))
    assert result.labels == [document.label for document in documents]
    assert result.texts() == [document.text for document in documents]
    ids, names = result.label_ids()
    assert [names[int(index)] for index in ids] == result.labels
    # different texts, different vectors: no two of the 32 are the same
    similarity = result.embeddings @ result.embeddings.T
    assert float((similarity - torch.eye(32)).max()) < 0.999


def test_embeddings_equal_sentence_transformers(computed_then_cached):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    result = computed_then_cached[1]
    reference_model = sentence_transformers.SentenceTransformer(str(model_folder()), device="cpu")
    reference = reference_model.encode(result.texts(), convert_to_tensor=True, batch_size=16)
    torch.testing.assert_close(result.embeddings, reference.cpu(), atol=1e-5, rtol=1e-4)


def test_the_model_loads_with_the_hub_unreachable(computed_then_cached, tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 and every proxy pointing at a closed port."""
    closed = "http://127.0.0.1:9"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HTTP_PROXY": closed, "HTTPS_PROXY": closed}
    env |= {"http_proxy": closed, "https_proxy": closed, "OMP_NUM_THREADS": "1"}
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from saelib.embeddings import EmbeddingConfig, embed_documents\n"
        "config = EmbeddingConfig(limit=4)\n"
        "result = embed_documents(config, cache_dir=sys.argv[1])\n"
        "torch.save(result.embeddings, sys.argv[2])\n"
    )
    saved = tmp_path / "vectors.pt"
    command = [sys.executable, "-c", script, str(tmp_path / "cache"), str(saved)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    expected = computed_then_cached[1].embeddings[:4]
    torch.testing.assert_close(torch.load(saved), expected, atol=1e-5, rtol=1e-4)


def copy_cache(result, into: Path) -> Path:
    copy = into / result.folder.name
    shutil.copytree(result.folder, copy)
    return copy


def test_a_corrupt_cache_is_refused_naming_its_folder_and_file(computed_then_cached, tmp_path):
    result = computed_then_cached[1]
    broken = copy_cache(result, tmp_path)
    data = bytearray((broken / "embeddings.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "embeddings.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptEmbeddingCacheError, match="embeddings.safetensors does not match"):
        embed_documents(SMALL, cache_dir=tmp_path)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(CorruptEmbeddingCacheError, match=f"{broken}: meta.json is unreadable"):
        embed_documents(SMALL, cache_dir=tmp_path)
    (broken / "meta.json").unlink()
    with pytest.raises(CorruptEmbeddingCacheError, match="meta.json is missing; delete the folder"):
        embed_documents(SMALL, cache_dir=tmp_path)


def test_a_cache_whose_counts_disagree_is_refused(computed_then_cached, tmp_path):
    broken = copy_cache(computed_then_cached[1], tmp_path)
    meta = json.loads((broken / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps(meta | {"labels": meta["labels"][:-1]}))
    with pytest.raises(CorruptEmbeddingCacheError, match="does not list 32 labels"):
        embed_documents(SMALL, cache_dir=tmp_path)


def test_the_cache_key_follows_what_determines_the_vectors():
    assert SMALL.cache_key() == EmbeddingConfig(dataset="wiki", limit=32).cache_key()
    others = {EmbeddingConfig(limit=33), EmbeddingConfig(limit=None), EmbeddingConfig("gsm8k", 32)}
    assert SMALL.cache_key() not in {config.cache_key() for config in others}


def test_config_validation_names_the_parameter():
    with pytest.raises(ValueError, match="model must be"):
        EmbeddingConfig(model="all-mpnet-base-v2")
    with pytest.raises(ValueError, match="limit must be"):
        EmbeddingConfig(limit=0)


def test_the_package_is_pinned_and_installed_at_the_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}" in project["project"]["dependencies"]
    assert package_version() == MODEL_PACKAGE_VERSION
    files = {path.name for path in model_folder().iterdir()}
    assert {"model.safetensors", "tokenizer.json", "sentence_bert_config.json"} <= files
