"""Interactive feature explorer: browse the latents of one or more SAEs in a notebook.

``FeatureExplorer(stats, saes, lm)`` is an ipywidgets panel: pick an SAE, pick a latent (slider,
or a list filtered by a text search and sorted by density or max activation), read its feature
card (``saelib.features.cards.render_card``), jump to its co-activating and decoder-similar
neighbours, and run the SAE on any text to see which latents fire on each token.

All state lives in plain attributes (``sae_name``, ``latent``, ``query``, ``sort_by``,
``listed``) and every control calls a public method (``select_sae``, ``select_latent``,
``search``, ``sort``, ``search_text``), so tests drive the explorer from Python exactly as a
click in the browser would.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import torch

from saelib.features.stats import FeatureStats
from saelib.studies.record import CHECKPOINTS_FOLDER

SORT_OPTIONS = [("latent id", "id"), ("density", "density"), ("max activation", "max_activation")]
NEIGHBOUR_KINDS = {"coactive": "co-activating", "similar": "decoder-similar"}
EXPLORER_CLASS = "saelib-explorer"


@dataclass
class TokenLatents:
    """One token of a "search by text" and the latents firing most on it."""

    token: str
    latents: list[tuple[int, float]]  # (latent id, activation), largest first


class FeatureExplorer:
    """Browse the latents of the SAEs in ``stats`` (name -> FeatureStats).

    ``saes`` (same names) and ``lm`` enable "search by text"; ``layer`` defaults to the SAE's
    metadata. ``explorer.widget`` is the top-level container (CSS class ``saelib-explorer``).
    """

    def __init__(
        self,
        stats: Mapping[str, FeatureStats],
        saes: Mapping[str, torch.nn.Module] | None = None,
        lm: object | None = None,
        layer: int | None = None,
        *,
        max_listed: int = 200,
        latents_per_token: int = 3,
        max_text_tokens: int = 64,
    ):
        if not stats:
            raise ValueError("FeatureExplorer needs the FeatureStats of at least one SAE")
        self.stats = dict(stats)
        self.saes = dict(saes or {})
        self.lm = lm
        self.layer = layer
        self.max_listed = max_listed
        self.latents_per_token = latents_per_token
        self.max_text_tokens = max_text_tokens
        self.sae_name = next(iter(self.stats))
        self.latent = 0
        self.query = ""
        self.sort_by = "id"
        self.listed: list[int] = []
        self.n_matches = 0
        self.text_tokens: list[TokenLatents] = []
        self.token_buttons: list[widgets.Button] = []
        self._search_index: dict[str, list[str]] = {}
        self._quiet_depth = 0
        self._build_widgets()
        self._connect()
        self.select_sae(self.sae_name)

    # ----- public API: every widget goes through these -----

    @property
    def current(self) -> FeatureStats:
        return self.stats[self.sae_name]

    def select_sae(self, name: str) -> None:
        """Show the SAE ``name``; keep the latent id when it exists there, else latent 0."""
        if name not in self.stats:
            raise KeyError(f"unknown SAE {name!r}; known: {sorted(self.stats)}")
        self.sae_name = name
        with self._quiet():
            self.sae_dropdown.value = name
            self.slider.max = self.current.d_sae - 1
        self.text_tokens, self.token_buttons = [], []
        self.text_results.children = ()
        self._refresh_list()
        self.select_latent(self.latent if self.latent < self.current.d_sae else 0)

    def select_latent(self, latent: int) -> None:
        """Show latent ``latent`` of the current SAE: card, neighbours, slider and list."""
        latent = int(latent)
        if not 0 <= latent < self.current.d_sae:
            raise IndexError(f"latent {latent} outside 0..{self.current.d_sae - 1}")
        self.latent = latent
        with self._quiet():
            self.slider.value = latent
            self.latent_list.value = latent if latent in self.listed else None
        self.card.value = self._card_html(latent)
        self._update_neighbours()

    def search(self, query: str) -> list[int]:
        """List the latents whose top examples or promoted tokens contain ``query``.

        An empty query lists every latent. Jumps to the first match when the current latent
        is not one. Returns the listed latents (in the current sort order).
        """
        self.query = query.strip()
        with self._quiet():
            self.search_box.value = query
        self._refresh_list()
        if self.listed and self.latent not in self.listed:
            self.select_latent(self.listed[0])
        return list(self.listed)

    def sort(self, by: str) -> list[int]:
        """Order the latent list by ``"id"``, ``"density"`` or ``"max_activation"``."""
        if by not in dict(SORT_OPTIONS).values():
            raise ValueError(f"unknown sort key {by!r}; options: {[v for _, v in SORT_OPTIONS]}")
        self.sort_by = by
        with self._quiet():
            self.sort_dropdown.value = by
        self._refresh_list()
        return list(self.listed)

    def search_text(self, text: str) -> list[TokenLatents]:
        """Run the current SAE on ``text`` and show each token with its top firing latents."""
        sae = self.saes.get(self.sae_name)
        if sae is None or self.lm is None:
            self._say("search by text needs the SAEs and the language model (saes=, lm=)")
            return []
        with self._quiet():
            self.text_input.value = text
        tokens, acts = self._run_text(sae, text)
        self.text_tokens = top_latents_per_token(tokens, acts, self.latents_per_token)
        self._show_token_latents(self.text_tokens[: self.max_text_tokens])
        self._say(f"{len(tokens)} tokens of text through {self.sae_name}")
        return self.text_tokens

    def neighbour_buttons(self, kind: str) -> list[widgets.Button]:
        """The visible buttons of ``kind`` ("coactive" or "similar") for the current latent."""
        buttons = self.coactive_buttons if kind == "coactive" else self.similar_buttons
        return [button for button in buttons if button.layout.display != "none"]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ----- widgets -----

    def _build_widgets(self) -> None:
        n_neighbours = max(_n_neighbours(stats) for stats in self.stats.values())
        self.sae_dropdown = widgets.Dropdown(options=list(self.stats), description="SAE")
        self.slider = widgets.IntSlider(description="latent", continuous_update=False)
        self.sort_dropdown = widgets.Dropdown(options=SORT_OPTIONS, description="sort by")
        self.search_box = widgets.Text(
            placeholder="text in top examples or promoted tokens",
            description="search",
            continuous_update=False,
            layout=widgets.Layout(width="320px"),
        )
        self.latent_list = widgets.Select(rows=14, layout=widgets.Layout(width="320px"))
        self.status = widgets.HTML()
        self.card = widgets.HTML(layout=_CARD_LAYOUT)
        self.coactive_buttons = [_small_button("saelib-neighbour") for _ in range(n_neighbours)]
        self.similar_buttons = [_small_button("saelib-neighbour") for _ in range(n_neighbours)]
        self.text_input = widgets.Text(placeholder="any text", description="text")
        self.text_button = widgets.Button(description="search by text", icon="search")
        self.text_results = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.widget = self._layout()

    def _layout(self) -> widgets.VBox:
        controls = widgets.HBox([self.sae_dropdown, self.slider, self.sort_dropdown])
        picker = widgets.VBox([self.search_box, self.latent_list, self.status])
        neighbours = widgets.VBox(
            [
                _labelled_row(NEIGHBOUR_KINDS["coactive"], self.coactive_buttons),
                _labelled_row(NEIGHBOUR_KINDS["similar"], self.similar_buttons),
            ]
        )
        text = widgets.VBox([widgets.HBox([self.text_input, self.text_button]), self.text_results])
        body = widgets.HBox([picker, widgets.VBox([self.card, neighbours])])
        container = widgets.VBox([controls, body, text])
        container.add_class(EXPLORER_CLASS)
        return container

    def _connect(self) -> None:
        self._on(self.sae_dropdown, self.select_sae)
        self._on(self.slider, self.select_latent)
        self._on(self.search_box, self.search)
        self._on(self.sort_dropdown, self.sort)
        self._on(self.latent_list, self.select_latent, skip_none=True)
        for kind, buttons in self._neighbour_groups():
            for index, button in enumerate(buttons):
                button.on_click(lambda _, kind=kind, index=index: self._jump(kind, index))
        self.text_button.on_click(lambda _: self.search_text(self.text_input.value))

    def _on(self, widget: widgets.ValueWidget, method, skip_none: bool = False) -> None:
        def handler(change: dict) -> None:
            if self._quiet_depth or (skip_none and change["new"] is None):
                return
            method(change["new"])

        widget.observe(handler, names="value")

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Set widget values without their observers calling back into the explorer."""
        self._quiet_depth += 1
        try:
            yield
        finally:
            self._quiet_depth -= 1

    def _say(self, message: str) -> None:
        self.status.value = f"<small>{html.escape(message)}</small>"

    # ----- latent list -----

    def _refresh_list(self) -> None:
        stats = self.current
        if self.query:
            latents = matching_latents(stats, self.query, self._index())
        else:
            latents = list(range(stats.d_sae))
        ordered = order_latents(stats, latents, self.sort_by)
        self.n_matches = len(ordered)
        self.listed = ordered[: self.max_listed]
        with self._quiet():
            self.latent_list.options = [(_latent_label(stats, i), i) for i in self.listed]
            self.latent_list.value = self.latent if self.latent in self.listed else None
        shown = f" (first {len(self.listed)} listed)" if self.n_matches > len(self.listed) else ""
        found = f" match {self.query!r}" if self.query else ""
        self._say(f"{self.n_matches} latents{found}{shown}")

    def _index(self) -> list[str]:
        if self.sae_name not in self._search_index:
            self._search_index[self.sae_name] = search_index(self.current)
        return self._search_index[self.sae_name]

    # ----- card and neighbours -----

    def _card_html(self, latent: int) -> str:
        from saelib.features.cards import render_card

        body = render_card(self.current, latent, title=self.sae_name)
        name = html.escape(self.sae_name, quote=True)
        return (
            f'<div class="saelib-explorer-card" data-sae="{name}" data-latent="{latent}">'
            f"{body}</div>"
        )

    def _update_neighbours(self) -> None:
        for kind, buttons in self._neighbour_groups():
            found = neighbours(self.current, self.latent, kind)
            for index, button in enumerate(buttons):
                if index < len(found):
                    latent, score = found[index]
                    button.description = str(latent)
                    button.tooltip = f"latent {latent}: {NEIGHBOUR_KINDS[kind]}, {score:+.2f}"
                    button.layout.display = None
                else:
                    button.layout.display = "none"

    def _neighbour_groups(self) -> tuple[tuple[str, list[widgets.Button]], ...]:
        return (("coactive", self.coactive_buttons), ("similar", self.similar_buttons))

    def _jump(self, kind: str, index: int) -> None:
        found = neighbours(self.current, self.latent, kind)
        if index < len(found):
            self.select_latent(found[index][0])

    # ----- search by text -----

    def _run_text(self, sae: torch.nn.Module, text: str) -> tuple[list[str], torch.Tensor]:
        from saelib.features.text import latent_activations_for_text  # loads nnsight

        layer = self._layer(sae)
        tokens, acts = latent_activations_for_text(sae, self.lm, text, layer)
        return list(tokens), torch.as_tensor(acts)

    def _layer(self, sae: torch.nn.Module) -> int:
        for source in (self.layer, getattr(sae, "metadata", {}).get("layer")):
            if source is not None:
                return int(source)
        layer = self.current.metadata.get("layer")
        if layer is None:
            raise ValueError(f"no layer for {self.sae_name}: pass FeatureExplorer(layer=...)")
        return int(layer)

    def _show_token_latents(self, rows: list[TokenLatents]) -> None:
        chips, self.token_buttons = [], []
        for row in rows:
            buttons = [_small_button("saelib-token-latent") for _ in row.latents]
            for button, (latent, value) in zip(buttons, row.latents, strict=True):
                button.description = f"{latent}: {value:.1f}"
                button.tooltip = f"latent {latent} fires {value:.3f} on {row.token!r}"
                button.on_click(lambda _, latent=latent: self.select_latent(latent))
            self.token_buttons.extend(buttons)
            label = widgets.HTML(f"<code>{html.escape(repr(row.token))}</code>")
            chips.append(widgets.VBox([label, *buttons], layout=_CHIP_LAYOUT))
        self.text_results.children = chips


_CARD_LAYOUT = {"min_width": "560px", "max_height": "620px", "overflow": "auto"}
_CHIP_LAYOUT = {"border": "1px solid #ddd", "margin": "2px", "padding": "2px"}


def _small_button(css_class: str) -> widgets.Button:
    button = widgets.Button(layout=widgets.Layout(width="auto"))
    button.add_class(css_class)
    return button


def _labelled_row(label: str, buttons: list[widgets.Button]) -> widgets.HBox:
    return widgets.HBox([widgets.Label(label, layout=widgets.Layout(width="120px")), *buttons])


def _n_neighbours(stats: FeatureStats) -> int:
    return max(stats.coactive_latents.shape[1], stats.similar_latents.shape[1])


def _latent_label(stats: FeatureStats, latent: int) -> str:
    density = float(stats.density[latent])
    peak = float(stats.max_activation[latent])
    return f"{latent:>5}   density {100 * density:.3g}%   max {peak:.3g}"


# ----- pure helpers (tested directly) -----


def neighbours(stats: FeatureStats, latent: int, kind: str) -> list[tuple[int, float]]:
    """The co-activating (``kind="coactive"``) or decoder-similar latents of ``latent``."""
    if kind not in NEIGHBOUR_KINDS:
        raise ValueError(f"kind must be one of {list(NEIGHBOUR_KINDS)}, got {kind!r}")
    ids = getattr(stats, f"{kind}_latents")[latent].tolist()
    scores = getattr(stats, f"{kind}_scores")[latent].tolist()
    return [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0 and i != latent]


def search_index(stats: FeatureStats) -> list[str]:
    """Per latent: the text of its top examples and promoted tokens, lower-cased."""
    vocab = stats.vocab
    texts = []
    for latent in range(stats.d_sae):
        examples = [
            "".join(vocab.get(t, "") for t in row if t >= 0)
            for row, value in zip(
                stats.top_tokens[latent].tolist(), stats.top_values[latent].tolist(), strict=True
            )
            if value > 0
        ]
        promoted = [vocab.get(t, "") for t in stats.promoted_tokens[latent].tolist() if t >= 0]
        texts.append("\n".join(examples + promoted).lower())
    return texts


def matching_latents(stats: FeatureStats, query: str, index: list[str] | None = None) -> list[int]:
    """Latents whose top examples or promoted tokens contain ``query`` (case-insensitive)."""
    needle = query.lower()
    index = index if index is not None else search_index(stats)
    return [latent for latent, text in enumerate(index) if needle in text]


def order_latents(stats: FeatureStats, latents: Iterable[int], by: str) -> list[int]:
    """``latents`` by id, or by density / max activation (largest first, ties by id)."""
    latents = list(latents)
    if by == "id":
        return sorted(latents)
    values = {"density": stats.density, "max_activation": stats.max_activation}[by].tolist()
    return sorted(latents, key=lambda i: (-values[i], i))


def top_latents_per_token(tokens: list[str], acts: torch.Tensor, n: int = 3) -> list[TokenLatents]:
    """For each token, the ``n`` latents with the largest positive activation on it."""
    acts = acts.detach().float().cpu()
    values, indices = acts.topk(min(n, acts.shape[1]), dim=1)
    rows = []
    for token, token_values, token_indices in zip(tokens, values, indices, strict=True):
        fired = [
            (int(i), float(v))
            for v, i in zip(token_values.tolist(), token_indices.tolist(), strict=True)
            if v > 0
        ]
        rows.append(TokenLatents(token, fired))
    return rows


# ----- finding checkpoints for the explorer notebook -----


def newest_run(outputs: str | Path | None = None) -> Path:
    """The newest run folder (of any study) under ``outputs`` that holds SAE checkpoints."""
    from saelib.runs.runner import outputs_root

    root = Path(outputs) if outputs else outputs_root()
    runs = [path.parent for path in root.glob("*/*/checkpoints") if any(path.iterdir())]
    if not runs:
        raise FileNotFoundError(f"no run with checkpoints under {root}; run a study first")
    return max(runs, key=lambda run: (run.name, run.stat().st_mtime))


def external_sae(
    folder: str | Path, model: str | None = None, layer: int | None = None, device: str = "cpu"
):
    """An SAE folder in any format (:func:`saelib.saes.formats.load_any`: saelib's, SAELens's,
    sparsify's, dictionary_learning's), with the model and layer it reads: as given, else as its
    metadata says (an error naming the parameter when neither does)."""
    from saelib.saes.formats import load_any

    sae = load_any(folder, device=device)
    given = {"model": model, "layer": layer}
    sae.metadata.update({key: value for key, value in given.items() if value is not None})
    missing = [key for key in given if sae.metadata.get(key) is None]
    if missing:
        names = " and ".join(f"{key}=" for key in missing)
        raise ValueError(f"{folder}: the SAE does not say which {missing} it reads; pass {names}")
    return sae


def external_harvest_config(
    sae, dataset: str, max_tokens: int | None = None, positions: str | None = None
):
    """The activations for the statistics of an SAE folder (:func:`external_sae`): ``dataset``
    through its model and layer, every position, 20,000 vectors unless told otherwise."""
    from saelib.activations import HarvestConfig

    return HarvestConfig(
        model=sae.metadata["model"], layer=int(sae.metadata["layer"]), dataset=dataset,
        positions=positions or "all", max_tokens=max_tokens or 20_000,
    )  # fmt: skip


def checkpoint_folders(
    run_dir: str | Path, names: list[str] | None = None, n: int = 3
) -> dict[str, Path]:
    """``{name: folder}`` of the run's checkpoints: ``names``, or ``n`` of them spread through
    its seed-0 checkpoints (through all of them when none is seed 0)."""
    folder = Path(run_dir) / CHECKPOINTS_FOLDER
    configs = {
        path.name: json.loads((path / "config.json").read_text())
        for path in folder.iterdir()
        if (path / "config.json").exists()
    }
    available = sorted(configs)
    if names is None:
        first_seed = [name for name in available if _is_first_seed(name, configs[name])]
        names = _spread(first_seed or available, n)
    missing = sorted(set(names) - set(available))
    if missing:
        raise FileNotFoundError(f"{folder} has no checkpoint {missing}; it has {available}")
    return {name: folder / name for name in names}


def _is_first_seed(name: str, config: dict) -> bool:
    """Seed 0 by the labels the checkpoint records (no seed label: its only seed). Checkpoints
    without labels predate them: their names end in ``_s<seed>``."""
    labels = config.get("labels")
    if isinstance(labels, dict):
        return labels.get("seed", 0) == 0
    return name.endswith("_s0")


def _spread(items: list[str], n: int) -> list[str]:
    """``n`` items evenly spaced through ``items`` (all of them when there are few)."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / max(n - 1, 1)
    return [items[round(i * step)] for i in range(n)]
