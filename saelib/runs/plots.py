"""Figures shared by the study notebooks (seaborn on matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from saelib.io import write_with

HEATMAP_METRICS = {
    "explained_variance": ("Explained variance", "viridis", "{:.3f}"),
    "death_rate": ("Feature death rate", "rocket_r", "{:.1%}"),
    "mean_activation": ("Mean activation (active latents)", "mako", "{:.2f}"),
    "max_activation": ("Max activation", "mako", "{:.1f}"),
    "mse": ("Reconstruction loss (MSE)", "rocket", "{:.4f}"),
    "cosine_loss": ("Reconstruction loss (1 - cosine)", "rocket", "{:.3f}"),
    "topk_cosine_loss": ("Fixed-TopK reconstruction (1 - cosine)", "rocket", "{:.3f}"),
    "active_mean": ("Active bits per sample (mean)", "mako", "{:.1f}"),
    "active_std": ("Active bits per sample (std)", "mako", "{:.1f}"),
    "dead_fraction": ("Dead bits", "rocket_r", "{:.1%}"),
    "probe_accuracy": ("Topic probe accuracy", "viridis", "{:.3f}"),
}


def grid_heatmaps(summary: pd.DataFrame, metrics: list[str] | None = None) -> plt.Figure:
    """One annotated heatmap per metric over K x latent_dim; cells show mean +- std over seeds.

    ``metrics`` defaults to every metric of ``HEATMAP_METRICS`` that ``summary`` has.
    """
    metrics = metrics or [name for name in HEATMAP_METRICS if f"{name}_mean" in summary]
    n_cols = min(3, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.8 * n_rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        title, cmap, fmt = HEATMAP_METRICS[metric]
        means = summary.pivot(index="k", columns="latent_dim", values=f"{metric}_mean")
        stds = summary.pivot(index="k", columns="latent_dim", values=f"{metric}_std").fillna(0)
        labels = means.map(fmt.format) + "\n±" + stds.map(fmt.format)
        sns.heatmap(
            means, annot=labels, fmt="", cmap=cmap, ax=ax, cbar=False, annot_kws={"size": 8}
        )
        ax.set_title(title)
        ax.set_xlabel("latent_dim")
        ax.set_ylabel("K")
    figure.tight_layout()
    return figure


def pareto_frontier(summary: pd.DataFrame, optimal: pd.Series) -> plt.Figure:
    """EV against K per latent_dim (error bars: std over seeds); Pareto-optimal configs circled."""
    figure, ax = plt.subplots(figsize=(6, 4))
    palette = sns.color_palette("viridis", summary["latent_dim"].nunique())
    for color, (latent_dim, rows) in zip(palette, summary.groupby("latent_dim"), strict=True):
        rows = rows.sort_values("k")
        ax.errorbar(
            rows["k"], rows["explained_variance_mean"], yerr=rows["explained_variance_std"],
            marker="o", capsize=3, color=color, label=f"latent_dim {latent_dim}",
        )  # fmt: skip
    best = summary[optimal.to_numpy()]
    ax.scatter(
        best["k"], best["explained_variance_mean"], s=160, facecolors="none",
        edgecolors="crimson", linewidths=1.5, label="Pareto-optimal", zorder=3,
    )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(sorted(summary["k"].unique()), labels=sorted(summary["k"].unique()))
    ax.set_xlabel("K (active latents per token)")
    ax.set_ylabel("explained variance (validation)")
    ax.set_title("Quality vs sparsity")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def training_curves(histories: dict[str, list[dict]], metric: str = "mse") -> plt.Figure:
    """``metric`` against step for each named run, on a log scale."""
    figure, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        ax.plot([row["step"] for row in history], [row[metric] for row in history], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if len(histories) <= 12:
        ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def metric_bars(
    summary: pd.DataFrame, metrics: dict[str, str], controls: tuple[str, ...] = ()
) -> plt.Figure:
    """One bar chart per metric: mean over seeds per run, error bars one std.

    ``summary`` is indexed by run with ``<metric>_mean`` / ``<metric>_std`` columns; ``metrics``
    maps each metric to its axis label; the ``controls`` runs are drawn in grey.
    """
    n_cols = min(3, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    colors = ["0.55" if run in controls else "C0" for run in summary.index]
    for ax, (metric, label) in zip(axes.flat, metrics.items(), strict=False):
        ax.bar(summary.index, summary[f"{metric}_mean"], yerr=summary[f"{metric}_std"].fillna(0),
               color=colors, capsize=3)  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        low = (summary[f"{metric}_mean"] - summary[f"{metric}_std"].fillna(0)).min()
        high = (summary[f"{metric}_mean"] + summary[f"{metric}_std"].fillna(0)).max()
        margin = 0.15 * (high - low) if high > low else 0.05 * abs(high) + 1e-6
        ax.set_ylim(low - margin, high + margin)
    figure.tight_layout()
    return figure


def over_training(table: pd.DataFrame, columns: dict[str, str]) -> plt.Figure:
    """Per-run mean (over seeds) of each column against training progress."""
    figure, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.6), squeeze=False)
    for ax, (column, label) in zip(axes.flat, columns.items(), strict=True):
        sns.lineplot(data=table, x="progress", y=column, hue="run", marker="o", ax=ax,
                     errorbar="sd", legend=ax is axes.flat[-1])  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training progress p")
    if axes.flat[-1].get_legend() is not None:
        sns.move_legend(axes.flat[-1], "upper left", bbox_to_anchor=(1, 1), fontsize=8)
    figure.tight_layout()
    return figure


def save_figure(figure: plt.Figure, folder: str | Path, name: str) -> Path:
    path = Path(folder) / f"{name}.png"
    return write_with(
        path,
        lambda temporary: figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight"),
    )


def frequency_profiles(frequencies: dict[str, Any], window: int = 25) -> plt.Figure:
    """Each run's latent firing frequency by latent index, as a running mean over ``window``
    neighbouring latents (is the index ordered? an ordered run falls from left to right), and
    sorted (the frequency spectrum), on a log scale."""
    figure, (raw, ordered) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, frequency in frequencies.items():
        values = np.asarray(frequency, dtype=float)
        width = max(1, min(window, len(values)))
        smoothed = np.convolve(values, np.ones(width) / width, mode="valid")
        raw.plot(np.arange(len(smoothed)) + (width - 1) / 2, smoothed, lw=1.0, label=name)
        ordered.plot(np.sort(values)[::-1], lw=1.0, label=name)
    titles = (f"frequency by latent index (running mean of {window})", "frequencies, sorted")
    for ax, title in zip((raw, ordered), titles, strict=True):
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("latent index" if ax is raw else "rank")
        ax.set_ylabel("fraction of samples active")
        ax.set_title(title, fontsize=10)
    if len(frequencies) <= 12:
        ordered.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def count_histograms(histograms: dict[str, list[int]], k: int | None = None) -> plt.Figure:
    """The distribution of active units per sample for each named code (counts by number of
    active units), with K marked: a TopK code is one bar at K."""
    figure, ax = plt.subplots(figsize=(7, 3.8))
    for name, counts in histograms.items():
        values = np.asarray(counts, dtype=float)
        ax.step(np.arange(len(values)), values / max(values.sum(), 1), where="mid", label=name)
    if k is not None:
        ax.axvline(k, color="0.3", linestyle="--", linewidth=1, label=f"K = {k}")
    ax.set_xlabel("active units per sample")
    ax.set_ylabel("fraction of samples")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure
