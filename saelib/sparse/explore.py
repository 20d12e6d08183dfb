"""Looking at trained sparse models: a layer's mask (density per row and column, and the
connections gained since training started), and the next-token predictions of several models
for one prompt. Static figures and tables for rendered notebooks, ipywidgets for JupyterLab.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from saelib.sparse.masks import masked_layers
from saelib.sparse.text import Tokenizer

__all__ = ["mask_explorer", "mask_figure", "next_token_table", "prediction_explorer"]


def mask_figure(mask: Tensor, initial: Tensor | None = None, title: str = "") -> plt.Figure:
    """A layer's (out, in) mask: active connections, those gained since ``initial`` (the mask
    when training started) in colour, and the density of each row (output unit) and column
    (input unit)."""
    active = mask.bool().cpu().numpy()
    image = active.astype(float)
    if initial is not None:
        image[active & ~initial.bool().cpu().numpy()] = 2.0  # gained over training
    figure, axes = plt.subplots(
        2, 2, figsize=(7.5, 6), gridspec_kw={"width_ratios": [5, 1], "height_ratios": [1, 5]}
    )
    axes[0, 1].axis("off")
    colours = plt.matplotlib.colors.ListedColormap(["white", "0.35", "tab:orange"])
    axes[1, 0].imshow(image, aspect="auto", interpolation="nearest", cmap=colours, vmin=0, vmax=2)
    axes[1, 0].set(xlabel="input unit", ylabel="output unit")
    axes[0, 0].plot(active.mean(axis=0), lw=0.8)
    axes[0, 0].set(ylabel="column density", xlim=(0, active.shape[1] - 1))
    axes[1, 1].plot(active.mean(axis=1), np.arange(active.shape[0]), lw=0.8)
    axes[1, 1].set(xlabel="row density", ylim=(active.shape[0] - 1, 0))
    gained = int((image == 2).sum())
    figure.suptitle(f"{title}\ndensity {active.mean():.3f}; orange: {gained} connections gained "
                    "since the start (grey: kept)")  # fmt: skip
    figure.tight_layout()
    return figure


@torch.no_grad()
def next_token_table(
    models: dict[str, nn.Module], tokenizer: Tokenizer, prompt: str, top: int = 5
) -> pd.DataFrame:
    """Each model's ``top`` most likely next tokens after ``prompt``, with probabilities."""
    ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
    rows = {}
    for name, model in models.items():
        context = model.config.context
        tokens = torch.tensor([ids[-context:]], device=next(model.parameters()).device)
        was_training = model.training
        model.eval()
        probabilities = F.softmax(model(tokens)[0, -1].float(), dim=-1)
        model.train(was_training)
        values, indices = probabilities.topk(top)
        rows[name] = [f"{tokenizer.decode([int(i)])!r} {float(p):.2f}"
                      for p, i in zip(values, indices, strict=True)]  # fmt: skip
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"#{i + 1}" for i in range(top)])


def mask_explorer(models: dict[str, nn.Module], initial_masks: dict[str, dict[str, Tensor]]):
    """Pick a model (method, sparsity, seed) and a layer; see its mask figure."""
    import ipywidgets as widgets
    from IPython.display import display

    names = list(models)
    layer_names = list(masked_layers(models[names[0]]))
    model_box = widgets.Dropdown(options=names, description="model")
    layer_box = widgets.Dropdown(options=layer_names, description="layer")
    out = widgets.Output()

    def show(_=None) -> None:
        mask = masked_layers(models[model_box.value])[layer_box.value].mask
        initial = initial_masks.get(model_box.value, {}).get(layer_box.value)
        with out:
            out.clear_output(wait=True)
            figure = mask_figure(mask, initial, f"{model_box.value}: {layer_box.value}")
            display(figure)
            plt.close(figure)

    model_box.observe(show, "value")
    layer_box.observe(show, "value")
    show()
    return widgets.VBox([widgets.HBox([model_box, layer_box]), out])


def prediction_explorer(models: dict[str, nn.Module], tokenizer: Tokenizer, prompt: str = ""):
    """Type a prompt; see every model's most likely next tokens side by side."""
    import ipywidgets as widgets
    from IPython.display import display

    box = widgets.Text(value=prompt, description="prompt", layout={"width": "80%"})
    out = widgets.Output()

    def show(_=None) -> None:
        with out:
            out.clear_output(wait=True)
            display(next_token_table(models, tokenizer, box.value))

    box.observe(show, "value")
    show()
    return widgets.VBox([box, out])
