"""The causal Transformer LM: a later token never changes earlier logits, the output head is
the embedding, the presets have the sizes they claim, and a tiny model learns real text."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from saelib.sparse import (
    LM_PRESETS,
    LMConfig,
    NextTokenLoss,
    TextConfig,
    TransformerLM,
    load_text,
    mask_linears,
    random_masks,
    validation_loss,
)
from saelib.training import TrainConfig, TrainSpec, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LMConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_mlp=64, context=16)


@pytest.mark.parametrize("masked", [False, True])
def test_a_later_token_leaves_earlier_logits_bit_for_bit_unchanged(masked):
    model = TransformerLM(TINY, seed=1)
    if masked:
        random_masks(mask_linears(model), density=0.3, seed=2)
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 7) % 256
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])  # the change is seen from there on


def test_the_output_head_is_the_token_embedding():
    model = TransformerLM(TINY)
    d, per_block = TINY.d_model, 4 * 32 * 32 + 2 * 32 * 64 + 2 * 2 * 32  # attn, mlp, two norms
    expected = 257 * d + 16 * d + TINY.n_layers * per_block + 2 * d  # no separate head
    assert model.n_parameters() == expected
    tokens = torch.tensor([[1, 2, 3]])
    model(tokens).sum().backward()
    assert model.embed.weight.grad[200].abs().sum() > 0  # unseen token: gradient via the head


def test_presets_have_their_documented_sizes():
    sizes = {
        name: TransformerLM(dataclasses.replace(config, n_layers=1)).n_parameters(False)
        * config.n_layers  # one block, times the depth: cheap to build
        for name, config in LM_PRESETS.items()
        if name != "gpt2-small"
    }
    assert sizes["cpu"] < 1_500_000
    assert 10_000_000 <= sizes["plan"] <= 20_000_000
    gpt2 = LM_PRESETS["gpt2-small"]
    assert (gpt2.d_model, gpt2.n_layers, gpt2.n_heads, gpt2.context) == (768, 12, 12, 1024)


def test_longer_input_than_the_context_is_refused():
    with pytest.raises(ValueError, match="context 16"):
        TransformerLM(TINY)(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(d_model=30, n_heads=4)


def test_a_tiny_lm_learns_real_wiki_text_with_the_shared_loop():
    data = load_text(TextConfig(context=32, max_documents=80, seed=0))
    model = TransformerLM(dataclasses.replace(TINY, context=32))
    before = validation_loss(model, data.val)
    config = TrainConfig(lr=3e-3, batch_size=16, max_tokens=16 * 40, device="cpu", log_every=1)
    [result] = train_saes([TrainSpec("lm", model, NextTokenLoss())], data.train, config,
                          progress=False)  # fmt: skip
    after = validation_loss(model, data.val)
    assert result.status == "complete" and result.steps == 40
    assert before == pytest.approx(torch.log(torch.tensor(257.0)).item(), rel=0.05)
    assert after < 0.75 * before
