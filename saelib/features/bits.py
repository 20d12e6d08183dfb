"""Per-bit inspection of a binary (or any sparse) code over a set of texts: one vector per text.

The token-level feature cards (:mod:`saelib.features.cards`) read an LM harvest, with token
windows and unembedding logits; a code of sentence embeddings has none of those: each sample is
a whole text with a label (e.g. its wiki topic). :func:`bit_stats` computes, in one pass, what
says whether a bit means something: how often it is on, the texts that turn it on most
strongly (ranked by the encoder's pre-activation, so the strongest come first even for {0, 1}
bits) with their labels, the label mix of the texts it is on for, and its nearest bits by
decoder cosine. :func:`bit_cards_html` renders static cards (plain HTML, shown in rendered
pages); :func:`bit_explorer` is a small ipywidgets browser over the same statistics.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from saelib.features.cards import CSS

TOP_TEXTS = 8
NEIGHBOURS = 5


@dataclass
class BitStats:
    """What :func:`bit_stats` measured, for every bit of one code."""

    frequency: Tensor  # (n_bits,) fraction of samples with the bit on
    top_samples: Tensor  # (n_bits, TOP_TEXTS) sample indices by pre-activation, -1: fewer on
    top_scores: Tensor  # (n_bits, TOP_TEXTS) their pre-activations
    label_counts: list[Counter]  # per bit: labels of the samples it is on for
    neighbours: Tensor  # (n_bits, NEIGHBOURS) nearest bits by decoder cosine
    neighbour_cosine: Tensor  # (n_bits, NEIGHBOURS)
    texts: list[str]
    labels: list[str]

    @property
    def n_bits(self) -> int:
        return len(self.frequency)


@torch.no_grad()
def bit_stats(
    codes: Tensor, scores: Tensor, decoder: Tensor, texts: list[str], labels: list[str]
) -> BitStats:
    """Statistics of each bit from ``codes`` (n, n_bits; nonzero = on), the encoder's
    ``scores`` (pre-activations, same shape), the ``decoder`` rows (n_bits, d) and each
    sample's text and label."""
    on = codes != 0
    ranked = scores.float().masked_fill(~on, float("-inf"))
    top = ranked.topk(min(TOP_TEXTS, len(codes)), dim=0)
    top_samples = top.indices.T.masked_fill(top.values.T.isneginf(), -1)
    directions = torch.nn.functional.normalize(decoder.float(), dim=1)
    cosine = (directions @ directions.T).fill_diagonal_(-2.0)
    nearest = cosine.topk(min(NEIGHBOURS, len(decoder) - 1), dim=1)
    label_counts = [
        Counter(labels[int(i)] for i in torch.nonzero(on[:, bit]).squeeze(1))
        for bit in range(on.shape[1])
    ]
    return BitStats(on.float().mean(0), top_samples, top.values.T, label_counts,
                    nearest.indices, nearest.values, texts, labels)  # fmt: skip


def pick_bits(stats: BitStats, n: int) -> list[int]:
    """``n`` bits spread over the frequency range of the bits that are ever on (most frequent,
    least frequent and evenly between), so cards show both common and rare bits."""
    alive = torch.nonzero(stats.frequency > 0).squeeze(1)
    if len(alive) == 0:
        return []
    ordered = alive[stats.frequency[alive].argsort(descending=True)]
    positions = torch.linspace(0, len(ordered) - 1, min(n, len(ordered))).round().long()
    return [int(ordered[i]) for i in positions.unique()]


def label_purity(counts: Counter) -> float:
    """Share of the bit's samples in its most common label (1: one topic only)."""
    total = sum(counts.values())
    return max(counts.values()) / total if total else float("nan")


def bit_card_html(stats: BitStats, bit: int, max_chars: int = 160) -> str:
    """One bit as a self-contained HTML card."""
    counts = stats.label_counts[bit]
    mix = ", ".join(f"{html.escape(label)} {count}" for label, count in counts.most_common(4))
    rows = []
    for sample, score in zip(stats.top_samples[bit], stats.top_scores[bit], strict=True):
        if sample < 0:
            break
        text = stats.texts[int(sample)]
        shown = text if len(text) <= max_chars else text[:max_chars] + "…"
        rows.append(f"<li><b>{html.escape(stats.labels[int(sample)])}</b> "
                    f"<span class='saelib-card-stat'>({float(score):.2f})</span> "
                    f"{html.escape(shown)}</li>")  # fmt: skip
    pairs = zip(stats.neighbours[bit], stats.neighbour_cosine[bit], strict=True)
    near = ", ".join(f"#{int(other)} ({float(cos):.2f})" for other, cos in pairs)
    purity = label_purity(counts)
    return (
        f"<div class='saelib-card'><div class='saelib-card-head'>"
        f"<span class='saelib-card-id'>bit {bit}</span>"
        f"<span class='saelib-card-stat'>on for {float(stats.frequency[bit]):.2%} of texts</span>"
        f"<span class='saelib-card-stat'>top topic share {purity:.0%}</span></div>"
        f"<p>topics: {mix or 'never on'}</p><p>nearest bits by decoder cosine: {near}</p>"
        f"<ol>{''.join(rows)}</ol></div>"
    )


def bit_cards_html(stats: BitStats, bits: list[int], title: str = "") -> str:
    """Cards for ``bits``, with the shared card style, as one HTML string."""
    heading = f"<h4 class='saelib-card-page'>{html.escape(title)}</h4>" if title else ""
    return f"<style>{CSS}</style>{heading}" + "".join(bit_card_html(stats, b) for b in bits)


def bit_explorer(stats_by_name: dict[str, BitStats]):
    """A live browser: pick a code and a bit (or sort bits by frequency or topic purity);
    the card and clickable nearest bits update in place."""
    import ipywidgets as widgets

    codes = widgets.Dropdown(options=list(stats_by_name), description="code")
    order = widgets.Dropdown(options=["index", "frequency", "topic purity"], description="sort")
    bit = widgets.IntSlider(0, 0, 1, description="bit", continuous_update=False)
    card, near = widgets.HTML(), widgets.HBox()

    def ordering(stats: BitStats) -> list[int]:
        bits = list(range(stats.n_bits))
        if order.value == "frequency":
            return sorted(bits, key=lambda b: -float(stats.frequency[b]))
        if order.value == "topic purity":
            return sorted(bits, key=lambda b: -(label_purity(stats.label_counts[b]) or 0.0))
        return bits

    def show(*_):
        stats = stats_by_name[codes.value]
        bit.max = stats.n_bits - 1
        chosen = ordering(stats)[min(bit.value, stats.n_bits - 1)]
        card.value = f"<style>{CSS}</style>{bit_card_html(stats, chosen)}"
        buttons = [widgets.Button(description=f"bit {int(b)}") for b in stats.neighbours[chosen]]
        for button, other in zip(buttons, stats.neighbours[chosen], strict=True):
            button.on_click(lambda _, other=int(other): jump(other))
        near.children = buttons

    def jump(target: int):
        order.value = "index"
        bit.value = target

    for control in (codes, order, bit):
        control.observe(show, names="value")
    show()
    return widgets.VBox([widgets.HBox([codes, order, bit]), card, near])
