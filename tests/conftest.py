"""Shared fixtures: tiny TopK SAEs and toy activation matrices, all seeded; one smoke run of
the TopK grid study for every test that reads a real run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from saelib.runs.runner import run_study
from saelib.saes import TopKConfig, TopKSAE
from saelib.studies import STUDIES


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, for tests of tiny tensors: a second thread barely helps them, and on a
    busy 2-core machine oversubscribed threads make each small op wait, about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_sae():
    """Factory for a small TopK SAE with a reproducible initialisation."""

    def make(d_in=16, d_sae=64, k=4, use_decoder_bias=True, seed=0) -> TopKSAE:
        config = TopKConfig(d_in=d_in, d_sae=d_sae, k=k, use_decoder_bias=use_decoder_bias)
        return TopKSAE(config, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def toy_acts() -> torch.Tensor:
    """(1024, 16) activations with a non-zero mean, so the decoder bias matters."""
    generator = torch.Generator().manual_seed(123)
    return torch.randn(1024, 16, generator=generator) + 0.5


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small topk_grid run (real model and data, tiny grid) in a temp outputs folder.

    ``SAELIB_TEST_SMOKE_RUN=<run folder>`` reuses an existing smoke run instead (quicker
    iteration on these tests).
    """
    if os.environ.get("SAELIB_TEST_SMOKE_RUN"):
        return Path(os.environ["SAELIB_TEST_SMOKE_RUN"])
    outputs = tmp_path_factory.mktemp("outputs")
    smoke = STUDIES["topk_grid"].smoke_params
    return run_study("topk_grid", smoke, outputs=outputs, progress=False)
