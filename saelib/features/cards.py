"""Static HTML feature cards, readable without a live kernel or widget JavaScript.

A card shows one latent of a ``FeatureStats``: its density and activation statistics, the
histogram of its activations (a small SVG embedded as a base64 data URI), its top-activating
examples and samples from each activation group (every token's background colored by its
activation relative to the latent's max), the tokens its decoder direction promotes and
suppresses, and its co-activating and decoder-similar neighbours (anchors to
``#saelib-latent-<id>``, so cards on one page link to each other).

The HTML is self-contained: inline CSS with class names prefixed ``saelib-card``, no scripts,
no external resources, every token and label escaped. It therefore survives nbconvert, notebook
viewers and the HTML renders of executed study notebooks.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import torch

from saelib.features.stats import FeatureStats

ANCHOR_PREFIX = "saelib-latent-"
HIGHLIGHT_RGB = (221, 132, 82)  # seaborn "deep" orange
PickBy = Literal["max_activation", "density", "random"]

CSS = """
.saelib-card{font:13px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;
 color:#1f2328;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;
 margin:10px 0;max-width:920px;box-sizing:border-box;text-align:left}
.saelib-card-page{font:14px system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;
 color:#1f2328;margin:6px 0}
.saelib-card-head{display:flex;flex-wrap:wrap;align-items:baseline;gap:2px 16px;
 border-bottom:1px solid #eaeef2;padding-bottom:6px}
.saelib-card-id{font-size:16px;font-weight:600}
.saelib-card-stat{color:#57606a}
.saelib-card-stat b{color:#1f2328;font-weight:600}
.saelib-card-top{display:flex;flex-wrap:wrap;gap:6px 24px;align-items:flex-start}
.saelib-card-h{font-weight:600;font-size:11px;text-transform:uppercase;letter-spacing:.05em;
 color:#57606a;margin:10px 0 4px}
.saelib-card-g{font-weight:600;font-size:12px;color:#57606a;margin:6px 0 2px}
.saelib-card-ex{display:flex;align-items:baseline;gap:8px;margin:1px 0}
.saelib-card-val{flex:0 0 58px;text-align:right;font-size:12px;color:#57606a;
 font-variant-numeric:tabular-nums}
.saelib-card-toks{font:12px/1.75 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.saelib-card-toks>span{display:inline-block;white-space:pre;border-radius:2px;padding:0 1px;
 margin:0 .5px}
.saelib-card-hit{font-weight:700;box-shadow:inset 0 -2px 0 #8c3c0b}
.saelib-card-cols{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:2px 28px}
.saelib-card-li{display:flex;justify-content:space-between;gap:10px;border-bottom:1px solid
 #f3f4f6;padding:1px 0}
.saelib-card-li .saelib-card-toks>span{background:#eef1f4}
.saelib-card-num{font-variant-numeric:tabular-nums;color:#57606a}
.saelib-card-pos{color:#116329}
.saelib-card-neg{color:#b42318}
.saelib-card a{color:#0969da;text-decoration:none}
.saelib-card a:hover{text-decoration:underline}
.saelib-card-note{color:#6e7781;font-style:italic}
.saelib-card-hist{display:block}
"""


# ------------------------------------------------------------------------------------- public


def render_card(
    stats: FeatureStats, latent: int, title: str | None = None, *, include_style: bool = True
) -> str:
    """One latent's card as an HTML fragment (with its own ``<style>`` unless told not to)."""
    if not 0 <= latent < stats.d_sae:
        raise IndexError(f"latent {latent} outside 0..{stats.d_sae - 1}")
    parts = [
        _header(stats, latent, title),
        _section("Activation histogram", _histogram(stats, latent)),
        _examples_section(stats, latent),
        _quantiles_section(stats, latent),
        _logits_section(stats, latent),
        _neighbours_section(stats, latent),
    ]
    card = f'<div class="saelib-card" id="{ANCHOR_PREFIX}{latent}">{"".join(parts)}</div>'
    return _style() + card if include_style else card


def render_cards(stats: FeatureStats, latents: Iterable[int], title: str | None = None) -> str:
    """Several cards after one shared ``<style>`` block and a short heading."""
    latents = [int(latent) for latent in latents]
    cards = "".join(render_card(stats, latent, include_style=False) for latent in latents)
    return (
        f'{_style()}<div class="saelib-cards">{_page_heading(stats, latents, title)}{cards}</div>'
    )


def cards_html_object(stats: FeatureStats, latents: Iterable[int], title: str | None = None):
    """The cards as an ``IPython.display.HTML`` object, for ``display()`` in a notebook."""
    from IPython.display import HTML

    return HTML(render_cards(stats, latents, title))


def cards_page(stats: FeatureStats, latents: Iterable[int], title: str | None = None) -> str:
    """A standalone HTML document of cards (e.g. to write beside a checkpoint)."""
    heading = html.escape(title or "SAE feature cards")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{heading}</title></head><body>{render_cards(stats, latents, title)}"
        "</body></html>\n"
    )


def pick_latents(
    stats: FeatureStats, n: int, by: PickBy = "max_activation", seed: int = 0
) -> list[int]:
    """Up to ``n`` live latents: the largest by ``max_activation`` or ``density``, or random."""
    live = torch.nonzero((stats.density > 0) & (stats.max_activation > 0)).flatten()
    if by == "random":
        order = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))
    elif by in ("max_activation", "density"):
        key = getattr(stats, by)[live].float()
        order = torch.argsort(key, descending=True, stable=True)
    else:
        raise ValueError(f"by must be 'max_activation', 'density' or 'random', not {by!r}")
    return [int(latent) for latent in live[order[: max(n, 0)]]]


def activation_color(activation: float, max_activation: float) -> str | None:
    """Background for a token: orange, more opaque as the activation nears the max.

    None (no color) for NaN, non-positive activations or a latent that never fired.
    """
    if not max_activation > 0 or not activation > 0:  # also catches NaN
        return None
    alpha = 0.12 + 0.78 * min(activation / max_activation, 1.0)
    red, green, blue = HIGHLIGHT_RGB
    return f"rgba({red},{green},{blue},{alpha:.2f})"


def token_text(stats: FeatureStats, token: int) -> str:
    """A token's text made visible: newline as ↵, tab as ⇥ (spaces are kept as they are)."""
    text = stats.vocab.get(int(token), stats.vocab.get(str(token)))  # str keys: read from JSON
    if text is None:
        return f"⟨{int(token)}⟩"
    text = text.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")
    return text or "∅"


# ------------------------------------------------------------------------------------ header


def _style() -> str:
    return "<style>" + " ".join(CSS.split()) + "</style>"


def _page_heading(stats: FeatureStats, latents: Sequence[int], title: str | None) -> str:
    described = ", ".join(
        f"{key} {value}" for key, value in stats.metadata.items() if _is_short_scalar(value)
    )
    text = html.escape(title or "Feature cards")
    extra = f" · {html.escape(described)}" if described else ""
    count = f"{len(latents)} latent{'s' if len(latents) != 1 else ''}"
    return f'<div class="saelib-card-page"><b>{text}</b> · {count}{extra}</div>'


def _is_short_scalar(value: object) -> bool:
    return isinstance(value, int | float | str) and len(str(value)) <= 60


def _header(stats: FeatureStats, latent: int, title: str | None) -> str:
    density = float(stats.density[latent])
    mean, peak = float(stats.mean_activation[latent]), float(stats.max_activation[latent])
    items = [f'<span class="saelib-card-id">Latent {latent}</span>']
    if title:
        items.append(f'<span class="saelib-card-stat">{html.escape(title)}</span>')
    items.append(_stat("density", f"{_percent(density)} ({_one_in(density)})"))
    items.append(_stat("mean act", _num(mean)))
    items.append(_stat("max act", _num(peak)))
    fired = round(density * stats.n_vectors)
    items.append(_stat("fires on", f"{fired:,} of {stats.n_vectors:,} tokens"))
    return f'<div class="saelib-card-head">{"".join(items)}</div>'


def _stat(label: str, value: str) -> str:
    return f'<span class="saelib-card-stat">{label} <b>{html.escape(value)}</b></span>'


def _percent(fraction: float) -> str:
    if not fraction > 0:
        return "0%"
    return f"{fraction:.1%}" if fraction >= 0.01 else f"{fraction * 100:.2g}%"


def _one_in(fraction: float) -> str:
    if not fraction > 0:
        return "never fires"
    every = round(1 / fraction)
    return "every token" if every <= 1 else f"1 in {every:,} tokens"


def _num(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _section(heading: str, body: str) -> str:
    return f'<div class="saelib-card-h">{heading}</div>{body}'


def _note(text: str) -> str:
    return f'<div class="saelib-card-note">{html.escape(text)}</div>'


# --------------------------------------------------------------------------------- histogram


class _Layout(NamedTuple):
    """The histogram's size and margins, in pixels."""

    width: int = 320
    height: int = 96
    left: int = 40
    right: int = 8
    top: int = 8
    bottom: int = 20

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def base(self) -> int:  # the x axis
        return self.height - self.bottom


def _histogram(stats: FeatureStats, latent: int) -> str:
    counts = [count if count > 0 else 0.0 for count in stats.histogram_counts[latent].tolist()]
    edges = [float(edge) for edge in stats.histogram_edges[latent].tolist()]
    if not any(counts) or not all(math.isfinite(edge) for edge in edges):
        return _note("no activations recorded")
    layout = _Layout()
    data = base64.b64encode(histogram_svg(edges, counts, layout).encode("utf-8")).decode("ascii")
    alt = html.escape(
        f"histogram of {round(sum(counts)):,} activations from {_num(edges[0])} "
        f"to {_num(edges[-1])}"
    )
    return (
        f'<img class="saelib-card-hist" width="{layout.width}" height="{layout.height}" '
        f'alt="{alt}" src="data:image/svg+xml;base64,{data}">'
    )


def histogram_svg(
    edges: Sequence[float], counts: Sequence[float], layout: _Layout | None = None
) -> str:
    """A small SVG bar chart of a histogram; bars colored like the tokens they count."""
    layout = layout or _Layout()
    bars = _bars(edges, counts, layout)
    axis = (
        f'<path d="M{layout.left} {layout.top}V{layout.base}H{layout.left + layout.plot_w}" '
        'stroke="#8c959f" fill="none"/>'
    )
    labels = _axis_labels(edges[0], edges[-1], max(counts), layout)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{layout.width}" '
        f'height="{layout.height}" viewBox="0 0 {layout.width} {layout.height}">'
        f"{bars}{axis}{labels}</svg>"
    )


def _bars(edges: Sequence[float], counts: Sequence[float], layout: _Layout) -> str:
    low, high, peak = edges[0], edges[-1], max(counts)
    span, plot_h = (high - low) or 1.0, layout.base - layout.top
    bars = []
    for count, start, stop in zip(counts, edges[:-1], edges[1:], strict=True):
        if count <= 0:
            continue
        x = layout.left + (start - low) / span * layout.plot_w
        bar_w = max((stop - start) / span * layout.plot_w - 1, 0.8)
        bar_h = max(count / peak * plot_h, 0.8)
        fill = _bar_color((start + stop) / 2 / high if high > 0 else 0.0)
        bars.append(
            f'<rect x="{x:.1f}" y="{layout.base - bar_h:.1f}" width="{bar_w:.1f}" '
            f'height="{bar_h:.1f}" fill="{fill}"/>'
        )
    return "".join(bars)


def _bar_color(fraction: float) -> str:
    red, green, blue = HIGHLIGHT_RGB
    return f"rgba({red},{green},{blue},{0.35 + 0.6 * min(max(fraction, 0.0), 1.0):.2f})"


def _axis_labels(low: float, high: float, peak: float, layout: _Layout) -> str:
    font = 'font-family="Helvetica,Arial,sans-serif" font-size="10" fill="#57606a"'
    below, right = layout.base + 13, layout.left + layout.plot_w
    labels = [
        (layout.left, below, "start", _num(low)),
        (right, below, "end", _num(high)),
        ((layout.left + right) / 2, below, "middle", "activation"),
        (layout.left - 4, layout.top + 8, "end", _count(peak)),
        (layout.left - 4, layout.base, "end", "0"),
    ]
    return "".join(
        f'<text x="{x}" y="{y}" {font} text-anchor="{anchor}">{html.escape(text)}</text>'
        for x, y, anchor, text in labels
    )


def _count(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.0f}"


# ---------------------------------------------------------------------------------- examples


def _examples_section(stats: FeatureStats, latent: int) -> str:
    peak = float(stats.max_activation[latent])
    values = stats.top_values[latent].tolist()
    tokens, acts = stats.top_tokens[latent].tolist(), stats.top_token_acts[latent].tolist()
    rows = [
        _example_row(stats, tokens[i], acts[i], peak, value)
        for i, value in enumerate(values)
        if value > 0 and any(token >= 0 for token in tokens[i])
    ]
    body = "".join(rows) if rows else _note("no examples (the latent never fired)")
    return _section("Top-activating examples", body)


def _quantiles_section(stats: FeatureStats, latent: int) -> str:
    peak = float(stats.max_activation[latent])
    groups = stats.quantile_group[latent].tolist()
    tokens = stats.quantile_tokens[latent].tolist()
    acts = stats.quantile_token_acts[latent].tolist()
    centre = stats.config.context_left
    members: dict[int, list[int]] = {}
    for slot, group in enumerate(groups):
        if group >= 0 and any(token >= 0 for token in tokens[slot]):
            members.setdefault(group, []).append(slot)
    blocks = []
    for group, slots in sorted(
        members.items(), key=lambda item: -_group_top(acts, item[1], centre)
    ):
        values = [acts[slot][centre] for slot in slots]
        rows = [_example_row(stats, tokens[s], acts[s], peak, acts[s][centre]) for s in slots]
        blocks.append(_group_heading(group, values, peak) + "".join(rows))
    body = "".join(blocks) if blocks else _note("no samples")
    return _section("Samples by activation group", body)


def _group_top(acts: list[list[float]], slots: list[int], centre: int) -> float:
    return max((_zero_if_nan(acts[slot][centre]) for slot in slots), default=0.0)


def _group_heading(group: int, values: list[float], peak: float) -> str:
    known = [value for value in values if not math.isnan(value)]
    text = f"Group {group}"
    if known:
        low, high = min(known), max(known)
        text += f": activation {_num(low)}–{_num(high)}"
        if peak > 0:
            text += f" ({low / peak:.0%}–{high / peak:.0%} of max)"
    return f'<div class="saelib-card-g">{html.escape(text)}</div>'


def _zero_if_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _example_row(
    stats: FeatureStats, tokens: list[int], acts: list[float], peak: float, value: float
) -> str:
    centre = stats.config.context_left
    spans = [
        _token_span(stats, token, act, peak, position == centre)
        for position, (token, act) in enumerate(zip(tokens, acts, strict=True))
        if token >= 0
    ]
    return (
        f'<div class="saelib-card-ex"><span class="saelib-card-val">{_num(value)}</span>'
        f'<span class="saelib-card-toks">{"".join(spans)}</span></div>'
    )


def _token_span(stats: FeatureStats, token: int, act: float, peak: float, hit: bool) -> str:
    classes = ' class="saelib-card-hit"' if hit else ""
    color = activation_color(act, peak)
    style = f' style="background:{color}"' if color else ""
    tooltip = "activation unknown" if math.isnan(act) else f"{act:.6g}"
    if hit:
        tooltip = f"example token: {tooltip}"
    text = html.escape(token_text(stats, token))
    return f'<span{classes}{style} title="{tooltip}">{text}</span>'


# ---------------------------------------------------------------------- logits and neighbours


def _logits_section(stats: FeatureStats, latent: int) -> str:
    promoted = _token_list(stats, stats.promoted_tokens[latent], stats.promoted_logits[latent])
    suppressed = _token_list(
        stats, stats.suppressed_tokens[latent], stats.suppressed_logits[latent]
    )
    return _section("Output logits", _columns("Promoted", promoted, "Suppressed", suppressed))


def _token_list(stats: FeatureStats, tokens: torch.Tensor, logits: torch.Tensor) -> str:
    items = [
        _list_item(
            f'<span class="saelib-card-toks"><span>{html.escape(token_text(stats, token))}'
            "</span></span>",
            f"{logit:+.3g}",
            "saelib-card-pos" if logit >= 0 else "saelib-card-neg",
        )
        for token, logit in zip(tokens.tolist(), logits.tolist(), strict=True)
        if token >= 0
    ]
    return "".join(items) if items else _note("none")


def _neighbours_section(stats: FeatureStats, latent: int) -> str:
    coactive = _latent_list(stats.coactive_latents[latent], stats.coactive_scores[latent], "")
    similar = _latent_list(stats.similar_latents[latent], stats.similar_scores[latent], "+")
    columns = _columns("Co-activating", coactive, "Decoder-similar (cosine)", similar)
    return _section("Neighbour latents", columns)


def _latent_list(latents: torch.Tensor, scores: torch.Tensor, sign: str) -> str:
    items = [
        _list_item(
            f'<a href="#{ANCHOR_PREFIX}{other}">latent {other}</a>',
            f"{score:{sign}.3f}",
            "saelib-card-num",
        )
        for other, score in zip(latents.tolist(), scores.tolist(), strict=True)
        if other >= 0
    ]
    return "".join(items) if items else _note("none")


def _list_item(label: str, value: str, value_class: str) -> str:
    return (
        f'<div class="saelib-card-li"><span>{label}</span>'
        f'<span class="{value_class}">{html.escape(value)}</span></div>'
    )


def _columns(left_title: str, left: str, right_title: str, right: str) -> str:
    return (
        f'<div class="saelib-card-cols"><div><div class="saelib-card-g">{left_title}</div>{left}'
        f'</div><div><div class="saelib-card-g">{right_title}</div>{right}</div></div>'
    )
