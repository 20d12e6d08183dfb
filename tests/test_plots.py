"""Shared figures draw from whatever metrics a study's summary has."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from saelib.runs import plots


def _summary(metrics: list[str]) -> pd.DataFrame:
    rows = [{"k": k, "latent_dim": n} for k in (8, 16) for n in (64, 128)]
    table = pd.DataFrame(rows)
    for metric in metrics:
        table[f"{metric}_mean"] = range(len(table))
        table[f"{metric}_std"] = 0.1
    return table


def test_grid_heatmaps_by_default_draws_the_metrics_the_summary_has():
    figure = plots.grid_heatmaps(_summary(["explained_variance", "death_rate"]))
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["Explained variance", "Feature death rate"]
    plt.close(figure)


def test_grid_heatmaps_draws_the_metrics_asked_for():
    figure = plots.grid_heatmaps(_summary(["mse", "cosine_loss", "death_rate"]), ["cosine_loss"])
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["Reconstruction loss (1 - cosine)"]
    plt.close(figure)
