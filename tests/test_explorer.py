"""The feature explorer, driven from Python on synthetic FeatureStats (no model, no browser)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from saelib.features.explorer import (
    FeatureExplorer,
    checkpoint_folders,
    matching_latents,
    neighbours,
    newest_run,
    order_latents,
    top_latents_per_token,
)
from saelib.features.stats import FeatureStats, FeatureStatsConfig

PLANTED_LATENT = 7
PLANTED_TOKEN = 999  # " zebra", only in latent 7's top examples
PROMOTED_LATENT = 11
PROMOTED_TOKEN = 998  # " quokka", only among latent 11's promoted tokens
CONFIG = FeatureStatsConfig(
    n_top=4, n_quantile_groups=2, n_per_group=2, context_left=3, context_right=1,
    n_logits=5, n_neighbours=4, histogram_bins=6,
)  # fmt: skip


def synthetic_stats(d_sae: int, seed: int = 0, name: str = "sae") -> FeatureStats:
    """FeatureStats of the documented shapes with random values and two planted tokens."""
    g = torch.Generator().manual_seed(seed)
    c, n_vocab = CONFIG, 50
    window = c.context_left + 1 + c.context_right
    n_quantile = c.n_quantile_groups * c.n_per_group
    groups = torch.arange(c.n_quantile_groups).repeat_interleave(c.n_per_group)
    max_activation = torch.rand(d_sae, generator=g) * 10
    top_tokens = torch.randint(0, n_vocab, (d_sae, c.n_top, window), generator=g)
    top_tokens[PLANTED_LATENT, 1, c.context_left] = PLANTED_TOKEN
    promoted = torch.randint(0, n_vocab, (d_sae, c.n_logits), generator=g)
    promoted[PROMOTED_LATENT, 0] = PROMOTED_TOKEN
    vocab = {i: f" w{i:02d}" for i in range(n_vocab)} | {
        PLANTED_TOKEN: " zebra", PROMOTED_TOKEN: " quokka"
    }  # fmt: skip

    def latents() -> torch.Tensor:
        scores = torch.rand(d_sae, d_sae, generator=g)
        return scores.topk(c.n_neighbours, dim=1).indices

    return FeatureStats(
        config=c,
        n_vectors=1000,
        density=torch.rand(d_sae, generator=g) * 0.1,
        mean_activation=max_activation / 3,
        max_activation=max_activation,
        histogram_edges=torch.linspace(0, 1, c.histogram_bins + 1).expand(d_sae, -1)
        * max_activation[:, None],
        histogram_counts=torch.randint(0, 30, (d_sae, c.histogram_bins), generator=g).float(),
        top_tokens=top_tokens,
        top_token_acts=torch.rand(d_sae, c.n_top, window, generator=g),
        top_values=torch.rand(d_sae, c.n_top, generator=g) + 0.1,
        quantile_tokens=torch.randint(0, n_vocab, (d_sae, n_quantile, window), generator=g),
        quantile_token_acts=torch.rand(d_sae, n_quantile, window, generator=g),
        quantile_group=groups.expand(d_sae, -1).clone(),
        promoted_tokens=promoted,
        promoted_logits=torch.rand(d_sae, c.n_logits, generator=g).sort(descending=True).values,
        suppressed_tokens=torch.randint(0, n_vocab, (d_sae, c.n_logits), generator=g),
        suppressed_logits=-torch.rand(d_sae, c.n_logits, generator=g),
        coactive_latents=latents(),
        coactive_scores=torch.rand(d_sae, c.n_neighbours, generator=g),
        similar_latents=latents(),
        similar_scores=torch.rand(d_sae, c.n_neighbours, generator=g) * 2 - 1,
        vocab=vocab,
        metadata={"name": name, "model": "toy", "layer": 3},
    )


@pytest.fixture
def explorer() -> FeatureExplorer:
    stats = {"small": synthetic_stats(32, 0, "small"), "big": synthetic_stats(64, 1, "big")}
    return FeatureExplorer(stats)


def shown_latent(explorer: FeatureExplorer) -> int:
    found = re.search(r'class="saelib-explorer-card"[^>]*data-latent="(\d+)"', explorer.card.value)
    assert found, "the card widget must hold an explorer card"
    return int(found.group(1))


def test_selecting_a_latent_updates_the_card(explorer):
    assert explorer.sae_name == "small" and shown_latent(explorer) == 0
    explorer.select_latent(5)
    assert explorer.latent == 5 and shown_latent(explorer) == 5
    assert "Latent 5" in explorer.card.value
    explorer.slider.value = 9  # as the browser slider would
    assert explorer.latent == 9 and shown_latent(explorer) == 9
    explorer.latent_list.value = 3  # a click in the list
    assert explorer.latent == 3 and explorer.slider.value == 3 and shown_latent(explorer) == 3
    with pytest.raises(IndexError):
        explorer.select_latent(32)


@pytest.mark.parametrize("kind", ["coactive", "similar"])
def test_neighbour_buttons_jump(explorer, kind):
    explorer.select_latent(4)
    expected = neighbours(explorer.current, 4, kind)
    buttons = explorer.neighbour_buttons(kind)
    assert [button.description for button in buttons] == [str(i) for i, _ in expected]
    buttons[1].click()
    target = expected[1][0]
    assert explorer.latent == target and shown_latent(explorer) == target
    assert explorer.slider.value == target


def test_switching_sae_changes_the_latent_range(explorer):
    explorer.select_latent(20)
    explorer.select_sae("big")
    assert explorer.slider.max == 63 and explorer.latent == 20
    explorer.select_latent(50)
    assert 'data-sae="big"' in explorer.card.value and shown_latent(explorer) == 50
    explorer.sae_dropdown.value = "small"  # from the dropdown: 50 does not exist there
    assert explorer.sae_name == "small" and explorer.slider.max == 31 and explorer.latent == 0
    assert len(explorer.latent_list.options) == 32


def test_search_finds_planted_tokens(explorer):
    assert explorer.search("ZEBRA") == [PLANTED_LATENT]
    assert explorer.latent == PLANTED_LATENT and shown_latent(explorer) == PLANTED_LATENT
    assert [value for _, value in explorer.latent_list.options] == [PLANTED_LATENT]
    explorer.search_box.value = "quokka"  # typed in the box
    assert explorer.listed == [PROMOTED_LATENT] and explorer.latent == PROMOTED_LATENT
    assert explorer.search("no such text") == [] and "0 latents" in explorer.status.value
    assert len(explorer.search("")) == 32
    assert matching_latents(explorer.current, " w0") != []


def test_sort_orders_the_list(explorer):
    stats = explorer.current
    by_density = explorer.sort("density")
    assert sorted(by_density) == list(range(32))
    assert by_density == sorted(range(32), key=lambda i: -float(stats.density[i]))
    assert [value for _, value in explorer.latent_list.options] == by_density
    explorer.sort_dropdown.value = "max_activation"
    peaks = [float(stats.max_activation[i]) for i in explorer.listed]
    assert peaks == sorted(peaks, reverse=True)
    assert explorer.sort("id") == list(range(32))
    assert order_latents(stats, [5, 2, 9], "id") == [2, 5, 9]


def test_search_by_text_shows_token_latents(monkeypatch):
    stats = synthetic_stats(16)
    acts = torch.zeros(3, 16)
    acts[0, 2], acts[1, 5], acts[1, 9], acts[2, 12] = 1.0, 3.0, 2.0, 0.5

    def fake_latent_activations_for_text(sae, lm, text, layer):
        assert (sae, lm, text, layer) == ("the-sae", "the-lm", "a b c", 3)
        return ["a", " b", " c"], acts

    monkeypatch.setattr(
        "saelib.features.text.latent_activations_for_text",
        fake_latent_activations_for_text,
        raising=False,
    )
    explorer = FeatureExplorer({"s": stats}, saes={"s": "the-sae"}, lm="the-lm")
    explorer.text_input.value = "a b c"
    explorer.text_button.click()
    rows = explorer.text_tokens
    assert [row.token for row in rows] == ["a", " b", " c"]
    assert [[i for i, _ in row.latents] for row in rows] == [[2], [5, 9], [12]]
    assert len(explorer.text_results.children) == 3
    explorer.token_buttons[2].click()  # " b" -> latent 9
    assert explorer.latent == 9 and shown_latent(explorer) == 9


def test_search_by_text_without_model_says_why():
    explorer = FeatureExplorer({"s": synthetic_stats(16)})
    assert explorer.search_text("hello") == []
    assert "needs the SAEs and the language model" in explorer.status.value


def test_top_latents_per_token_ignores_silent_latents():
    rows = top_latents_per_token(["x", "y"], torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0]]))
    assert rows[0].latents == [(1, 2.0), (2, 1.0)] and rows[1].latents == []


def test_widget_is_the_displayed_container(explorer):
    assert "saelib-explorer" in explorer.widget._dom_classes
    assert explorer.card in explorer.widget.children[1].children[1].children


def test_newest_run_and_checkpoint_folders(tmp_path):
    for run, names in (("20260101-000000-aaaa", ["a_s0"]), ("20260102-000000-bbbb", [])):
        (tmp_path / "topk_grid" / run / "checkpoints").mkdir(parents=True)
        for name in names:
            (tmp_path / "topk_grid" / run / "checkpoints" / name).mkdir()
            (tmp_path / "topk_grid" / run / "checkpoints" / name / "config.json").write_text("{}")
    run = newest_run(tmp_path)
    assert run.name == "20260101-000000-aaaa"  # the newer one has no checkpoints
    assert list(checkpoint_folders(run)) == ["a_s0"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_folders(run, ["missing"])
    with pytest.raises(FileNotFoundError, match="no run with checkpoints"):
        newest_run(tmp_path / "empty")


def test_checkpoint_folders_pick_seed_zero_by_labels(tmp_path):
    """Seeds come from the labels checkpoints record; names say nothing about them."""
    checkpoints = tmp_path / "run" / "checkpoints"
    labels = {
        "small-a": {"size": 1, "seed": 0},
        "small-b": {"size": 1, "seed": 1},
        "large-a": {"size": 2, "seed": 1},
        "large-b": {"size": 2, "seed": 0},
        "tiny_s0": {"size": 0, "seed": 2},  # the name's suffix does not count
    }
    for name, label in labels.items():
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "config.json").write_text(json.dumps({"labels": label}))
    assert list(checkpoint_folders(tmp_path / "run")) == ["large-b", "small-a"]
    assert list(checkpoint_folders(tmp_path / "run", n=1)) == ["large-b"]
    (checkpoints / "single").mkdir()
    (checkpoints / "single" / "config.json").write_text(json.dumps({"labels": {"size": 3}}))
    assert "single" in checkpoint_folders(tmp_path / "run")  # no seed label: its only seed
