"""Figures of a sparse-training comparison, from per-model tables (columns method, variant,
sparsity, perplexity, train_flops) and per-update logs (proxy, val_loss, stability)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

__all__ = ["layer_density_bars", "perplexity_panels", "proxy_scatter", "stability_curves"]


def perplexity_panels(per_seed: pd.DataFrame) -> plt.Figure:
    """Validation perplexity against training FLOPs (each seed a point) and against sparsity
    (mean ± std over seeds), one colour per method; dense as a horizontal reference."""
    main = per_seed[~per_seed["variant"].str.contains("(", regex=False)]
    methods = list(dict.fromkeys(main["method"]))  # one colour per method in both panels
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods)), strict=True))
    figure, (by_flops, by_sparsity) = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.scatterplot(main, x="train_flops", y="perplexity", hue="method", style="sparsity",
                    palette=palette, ax=by_flops)  # fmt: skip
    by_flops.set(xscale="log", xlabel="training FLOPs (unmasked weights)", ylabel="perplexity")
    sparse = main[main["method"] != "dense"]
    sns.pointplot(sparse, x="sparsity", y="perplexity", hue="method", errorbar="sd", dodge=0.3,
                  palette=palette, ax=by_sparsity)  # fmt: skip
    dense = main[main["method"] == "dense"]["perplexity"]
    if len(dense):
        by_sparsity.axhline(dense.mean(), color="0.3", ls="--", label="dense")
        by_sparsity.legend()
    by_sparsity.set(ylabel="perplexity (mean ± std over seeds)")
    figure.tight_layout()
    return figure


def proxy_scatter(trajectory: pd.DataFrame) -> plt.Figure:
    """SparsAE's chosen P(M) against the validation loss measured at the same update."""
    figure, axis = plt.subplots(figsize=(8.5, 4.2))
    sns.scatterplot(trajectory, x="proxy", y="val_loss", hue="variant", style="sparsity", ax=axis)
    _legend_outside(axis)
    axis.set(xlabel="P(M) of the chosen mask (z-normalised terms)",
             ylabel="validation loss at the update (nats)")  # fmt: skip
    figure.tight_layout()
    return figure


def layer_density_bars(layers: pd.DataFrame) -> plt.Figure:
    """Final density of each masked layer per method (mean over seeds), one panel per sparsity."""
    sparsities = sorted(layers["sparsity"].unique())
    figure, axes = plt.subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 4),
                                squeeze=False, sharey=True)  # fmt: skip
    for axis, sparsity in zip(axes[0], sparsities, strict=True):
        at = layers[layers["sparsity"] == sparsity]
        sns.barplot(at, x="layer", y="density", hue="variant", ax=axis)
        axis.set_title(f"sparsity {sparsity:g}")
        axis.tick_params(axis="x", rotation=90)
    figure.tight_layout()
    return figure


def stability_curves(stability: pd.DataFrame) -> plt.Figure:
    """The fraction of active connections each mask update keeps, over training."""
    figure, axis = plt.subplots(figsize=(9, 4.2))
    sns.lineplot(stability, x="step", y="stability", hue="variant", style="sparsity",
                 errorbar="sd", ax=axis)  # fmt: skip
    axis.set(ylabel="connections kept by the update", ylim=(0, 1.02))
    _legend_outside(axis)
    figure.tight_layout()
    return figure


def _legend_outside(axis: plt.Axes) -> None:
    """The legend to the right of the axes, off the data."""
    axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
