"""Static HTML feature cards rendered from a synthetic FeatureStats."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser

import pytest
import torch

from saelib.features.cards import (
    activation_color,
    cards_html_object,
    cards_page,
    pick_latents,
    render_card,
    render_cards,
)
from saelib.features.stats import FeatureStats, FeatureStatsConfig

CONFIG = FeatureStatsConfig(
    n_top=5, n_quantile_groups=3, n_per_group=2, context_left=4, context_right=2,
    n_logits=4, n_neighbours=3, histogram_bins=10,
)  # fmt: skip
VOCAB = {0: " the", 1: "<script>", 2: "a&b", 3: '"quoted"', 4: "line\nbreak", 5: "  two spaces"}
VOCAB |= {i: f"w{i}" for i in range(6, 40)}
DEAD = 3


def make_stats(d_sae: int = 8, seed: int = 0) -> FeatureStats:
    """Random tensors of the documented shapes; latent DEAD never fires."""
    g = torch.Generator().manual_seed(seed)
    c, window = CONFIG, CONFIG.context_left + 1 + CONFIG.context_right
    n_q = c.n_quantile_groups * c.n_per_group
    max_act = torch.rand(d_sae, generator=g) * 10 + 1
    density = torch.rand(d_sae, generator=g) * 0.05 + 0.001
    top_acts = torch.rand(d_sae, c.n_top, window, generator=g) * max_act[:, None, None]
    top_acts[:, :, 0] = float("nan")
    top_acts[:, 0, c.context_left] = max_act
    quantile_group = torch.arange(n_q).repeat(d_sae, 1) // c.n_per_group
    stats = FeatureStats(
        config=c, n_vectors=10_000, density=density, mean_activation=max_act / 3,
        max_activation=max_act,
        histogram_edges=torch.linspace(0, 1, c.histogram_bins + 1) * max_act[:, None],
        histogram_counts=torch.randint(0, 500, (d_sae, c.histogram_bins), generator=g).float(),
        top_tokens=torch.randint(0, len(VOCAB), (d_sae, c.n_top, window), generator=g),
        top_token_acts=top_acts, top_values=top_acts[:, :, c.context_left].clone(),
        quantile_tokens=torch.randint(0, len(VOCAB), (d_sae, n_q, window), generator=g),
        quantile_token_acts=torch.rand(d_sae, n_q, window, generator=g) * max_act[:, None, None],
        quantile_group=quantile_group,
        promoted_tokens=torch.randint(0, len(VOCAB), (d_sae, c.n_logits), generator=g),
        promoted_logits=torch.rand(d_sae, c.n_logits, generator=g).sort(descending=True)[0] + 1,
        suppressed_tokens=torch.randint(0, len(VOCAB), (d_sae, c.n_logits), generator=g),
        suppressed_logits=-torch.rand(d_sae, c.n_logits, generator=g).sort(descending=True)[0],
        coactive_latents=(torch.arange(d_sae)[:, None] + torch.tensor([1, 2, 3])) % d_sae,
        coactive_scores=torch.rand(d_sae, c.n_neighbours, generator=g),
        similar_latents=(torch.arange(d_sae)[:, None] + torch.tensor([5, 6, 7])) % d_sae,
        similar_scores=torch.rand(d_sae, c.n_neighbours, generator=g) * 2 - 1,
        vocab=dict(VOCAB), metadata={"name": "toy <sae>", "layer": 3},
    )  # fmt: skip
    _kill(stats, DEAD)
    return stats


def _kill(stats: FeatureStats, latent: int) -> None:
    for name in ("density", "mean_activation", "max_activation", "histogram_counts"):
        getattr(stats, name)[latent] = 0
    stats.top_values[latent] = 0
    stats.top_tokens[latent] = -1
    stats.quantile_group[latent] = -1


def _set_window(stats: FeatureStats, latent: int, tokens: list[int], acts: list[float]) -> None:
    """The first top example of ``latent`` becomes exactly these tokens and activations."""
    stats.top_tokens[latent, 0] = torch.tensor(tokens)
    stats.top_token_acts[latent, 0] = torch.tensor(acts)
    stats.top_values[latent, 0] = acts[CONFIG.context_left]


class _Spans(HTMLParser):
    """Collects the token spans of example rows: their attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict] = []
        self.tags: list[str] = []
        self._in_row = False
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "saelib-card-toks":
            self._in_row = True
        elif tag == "span" and self._in_row:
            self._open = {"class": ""} | attrs | {"text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None
        elif tag == "span":
            self._in_row = False


def _parse(html: str) -> _Spans:
    parser = _Spans()
    parser.feed(html)
    return parser


def _alpha(style: str | None) -> float:
    if not style:
        return 0.0
    return float(re.search(r"rgba\(\d+,\d+,\d+,([\d.]+)\)", style).group(1))


@pytest.fixture(scope="module")
def stats() -> FeatureStats:
    return make_stats()


def test_tokens_are_escaped_never_tags():
    stats = make_stats()
    _set_window(stats, 0, [1, 2, 3, 4, 1, 5, 0], [0.0] * 4 + [5.0, 1.0, 0.5])
    html = render_card(stats, 0)
    assert "<script" not in html.lower() and "&lt;script&gt;" in html
    assert "a&amp;b" in html and "&quot;quoted&quot;" in html
    parsed = _parse(html)
    assert "script" not in parsed.tags
    texts = [span["text"] for span in parsed.spans]
    assert "<script>" in texts and "line↵break" in texts and "  two spaces" in texts
    assert "toy <sae>" not in render_cards(stats, [0]) and "toy &lt;sae&gt;" in render_cards(
        stats, [0]
    )


def test_card_has_every_section(stats):
    html = render_card(stats, 1, title="My SAE")
    for text in ("Latent 1", "My SAE", "density", "1 in ", "mean act", "max act",
                 "Activation histogram", "Top-activating examples",
                 "Samples by activation group", "Group 0", "Group 1", "Group 2",
                 "Promoted", "Suppressed", "Co-activating", "Decoder-similar"):  # fmt: skip
        assert text in html, text
    assert 'id="saelib-latent-1"' in html


def test_header_density_as_percent_and_one_in_n():
    stats = make_stats()
    stats.density[2] = 0.0025
    html = render_card(stats, 2)
    assert "0.25%" in html and "1 in 400 tokens" in html


def test_example_token_is_highlighted():
    stats = make_stats()
    _set_window(stats, 0, [6, 7, 8, 9, 10, 11, 12], [0.1, 0.2, 0.3, 0.4, 9.0, 0.5, 0.6])
    spans = _parse(render_card(stats, 0)).spans
    first_row = spans[:7]
    hits = [span for span in first_row if "saelib-card-hit" in span["class"]]
    assert [span["text"] for span in hits] == ["w10"]
    assert "9" in hits[0]["title"]


def test_colors_monotone_in_activation_and_nan_uncolored():
    stats = make_stats()
    stats.max_activation[0] = 10.0
    acts = [float("nan"), 0.0, 1.0, 2.5, 10.0, 5.0, 7.5]
    _set_window(stats, 0, [6, 7, 8, 9, 10, 11, 12], acts)
    spans = _parse(render_card(stats, 0)).spans[:7]
    assert spans[0].get("style") is None and "unknown" in spans[0]["title"]
    assert spans[1].get("style") is None
    alphas = sorted(
        (act, _alpha(span.get("style"))) for act, span in zip(acts[1:], spans[1:], strict=True)
    )
    values = [alpha for _, alpha in alphas]
    assert values == sorted(values) and values[0] < values[1] < values[-1]
    assert activation_color(20.0, 10.0) == activation_color(10.0, 10.0)
    assert activation_color(1.0, 0.0) is None


def test_tooltips_carry_exact_activations():
    stats = make_stats()
    _set_window(stats, 0, [6, 7, 8, 9, 10, 11, 12], [0.0, 0.0, 0.0, 0.0, 3.14159, 1.25, 0.0])
    titles = [span["title"] for span in _parse(render_card(stats, 0)).spans[:7]]
    assert "3.14159" in titles[4] and titles[5] == "1.25"


def test_neighbours_link_to_card_anchors(stats):
    html = render_card(stats, 1)
    assert 'href="#saelib-latent-2"' in html and 'href="#saelib-latent-6"' in html
    both = render_cards(stats, [1, 2])
    assert 'id="saelib-latent-2"' in both and 'href="#saelib-latent-2"' in both


def test_no_external_resources_and_histogram_is_a_data_uri(stats):
    html = render_cards(stats, range(stats.d_sae))
    images = re.findall(r'src="([^"]*)"', html)
    assert images and all(src.startswith("data:image/svg+xml;base64,") for src in images)
    svg = base64.b64decode(images[0].split(",", 1)[1]).decode()
    assert ElementTree.fromstring(svg).tag.endswith("svg") and svg.count("<rect") > 0
    without_data = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", html)
    assert "http" not in without_data and "//" not in without_data
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert "@import" not in html


def test_card_size_is_bounded():
    big = make_stats()
    big.config = FeatureStatsConfig()  # defaults: 12 top examples, 12 tokens each
    big = _with_default_sizes(big)
    assert len(render_card(big, 0).encode()) < 40_000


def _with_default_sizes(stats: FeatureStats) -> FeatureStats:
    c = stats.config
    window, n_q = c.context_left + 1 + c.context_right, c.n_quantile_groups * c.n_per_group
    g = torch.Generator().manual_seed(1)
    d = stats.d_sae
    stats.top_tokens = torch.randint(0, len(VOCAB), (d, c.n_top, window), generator=g)
    stats.top_token_acts = torch.rand(d, c.n_top, window, generator=g) * 10
    stats.top_values = stats.top_token_acts[:, :, c.context_left].clone()
    stats.quantile_tokens = torch.randint(0, len(VOCAB), (d, n_q, window), generator=g)
    stats.quantile_token_acts = torch.rand(d, n_q, window, generator=g) * 10
    stats.quantile_group = torch.arange(n_q).repeat(d, 1) // c.n_per_group
    stats.histogram_edges = torch.linspace(0, 10, c.histogram_bins + 1).repeat(d, 1)
    stats.histogram_counts = torch.rand(d, c.histogram_bins, generator=g) * 1000
    for name in ("promoted", "suppressed"):
        setattr(stats, f"{name}_tokens", torch.randint(0, 40, (d, c.n_logits), generator=g))
        setattr(stats, f"{name}_logits", torch.randn(d, c.n_logits, generator=g))
    for name in ("coactive", "similar"):
        setattr(stats, f"{name}_latents", torch.randint(0, d, (d, c.n_neighbours), generator=g))
        setattr(stats, f"{name}_scores", torch.rand(d, c.n_neighbours, generator=g))
    stats.max_activation[0] = 10.0
    return stats


def test_dead_latent_card_renders_without_examples(stats):
    html = render_card(stats, DEAD)
    assert "never fires" in html and "no examples" in html and "<img" not in html


def test_render_cards_shares_one_style_block(stats):
    html = render_cards(stats, [0, 1, 2], title="Toy")
    assert html.count("<style>") == 1 and html.count('class="saelib-card"') == 3
    assert render_card(stats, 0).count("<style>") == 1
    assert cards_html_object(stats, [0]).data == render_cards(stats, [0])
    page = cards_page(stats, [0, 1])
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page


def test_css_is_scoped(stats):
    style = re.search(r"<style>(.*?)</style>", render_cards(stats, [0]), re.S).group(1)
    selectors = re.findall(r"(?:^|})\s*([^{}]+)\{", style)
    assert selectors and all(s.strip().startswith(".saelib-card") for s in selectors)


def test_pick_latents_skips_dead_ones(stats):
    for by in ("max_activation", "density", "random"):
        picked = pick_latents(stats, stats.d_sae, by=by, seed=1)
        assert DEAD not in picked and len(picked) == stats.d_sae - 1 == len(set(picked))
    top = pick_latents(stats, 2)
    assert top == stats.max_activation.argsort(descending=True)[:2].tolist()
    assert pick_latents(stats, 3, "random", 5) == pick_latents(stats, 3, "random", 5)
    with pytest.raises(ValueError):
        pick_latents(stats, 2, by="bogus")


def test_vocab_with_string_keys_and_unknown_tokens():
    stats = make_stats()
    stats.vocab = {str(key): text for key, text in VOCAB.items() if key != 7}
    _set_window(stats, 0, [6, 7, 8, 9, 10, 11, 12], [0.0] * 4 + [5.0, 0.0, 0.0])
    texts = [span["text"] for span in _parse(render_card(stats, 0)).spans[:7]]
    assert texts[:3] == ["w6", "⟨7⟩", "w8"]


def test_histogram_tolerates_nan_counts():
    stats = make_stats()
    stats.histogram_counts[0, :3] = float("nan")
    assert "data:image/svg+xml;base64," in render_card(stats, 0)
    stats.histogram_counts[0] = float("nan")
    assert "no activations recorded" in render_card(stats, 0)
