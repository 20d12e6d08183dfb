"""Shared fixtures: tiny TopK SAEs and toy activation matrices, all seeded."""

from __future__ import annotations

import pytest
import torch

from saelib.saes import TopKConfig, TopKSAE


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
