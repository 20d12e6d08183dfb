"""The sparse code of every row of an activation set, from one encoder pass.

Feature statistics read these codes many times (two sweeps, the context windows, the
co-activation counts) and never run the encoder again. Only the active (non-zero) entries are
kept, as flat arrays sorted by row and then latent: a TopK code costs n * k entries, and a code
with a varying number of active latents per row (ReLU, JumpReLU, binary) costs what it holds
rather than its busiest row times n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelib.saes import SAE, SAEOutput


@dataclass
class Codes:
    """The active entries of the code of rows 0..n_rows-1, as (row * d_sae + latent, value)."""

    keys: Tensor  # (entries,) int64, ascending: row-major, latents ascending within a row
    values: Tensor  # (entries,) float32, all positive
    n_rows: int
    d_sae: int
    row_starts: Tensor = field(init=False, repr=False)  # (n_rows + 1,) first entry of each row

    def __post_init__(self) -> None:
        bounds = torch.arange(self.n_rows + 1, dtype=torch.int64) * self.d_sae
        self.row_starts = torch.searchsorted(self.keys, bounds)

    def __len__(self) -> int:
        return self.n_rows

    def active(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """(row, latent, value) of the active entries of rows start..stop-1, row-major."""
        first, last = int(self.row_starts[start]), int(self.row_starts[min(stop, self.n_rows)])
        keys = self.keys[first:last]
        return keys // self.d_sae, keys % self.d_sae, self.values[first:last]

    def lookup(self, rows: Tensor, latents: Tensor) -> Tensor:
        """Activation of ``latents[i]`` on ``rows[i]`` (0 where it is not active)."""
        if len(self.keys) == 0:
            return torch.zeros(rows.shape)
        wanted = rows.long() * self.d_sae + latents.long()
        where = torch.searchsorted(self.keys, wanted).clamp_max(len(self.keys) - 1)
        return torch.where(self.keys[where] == wanted, self.values[where], 0.0)

    def output(self, start: int, stop: int) -> SAEOutput:
        """Rows start..stop-1 as an :class:`SAEOutput` (no reconstruction): the active-entries
        view, each row padded with zeros to the batch's largest count."""
        rows, latents, values = self.active(start, stop)
        rows = rows - start
        counts = torch.bincount(rows, minlength=stop - start)
        slot = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]
        width = max(int(counts.max()), 1)
        acts = torch.zeros(stop - start, width)
        indices = torch.zeros(stop - start, width, dtype=torch.int64)
        acts[rows, slot], indices[rows, slot] = values, latents
        return SAEOutput(torch.zeros(0), acts, indices, self.d_sae)


@torch.no_grad()
def encode_rows(sae: SAE, acts: Tensor, batch_size: int, progress: bool) -> Codes:
    """The one encoder pass, through the SAE output's active-entries view.

    The statistics read activations as magnitudes (histograms from 0 to the max, quantile groups
    as fractions of it), so a code with negative values is refused.
    """
    device = next(sae.parameters()).device
    keys, values = [], []
    bar = tqdm(total=len(acts), desc="feature stats: encode", unit="vec", disable=not progress)
    for start in range(0, len(acts), batch_size):
        batch = acts[start : start + batch_size]
        rows, latents, batch_values = sae(batch.to(device).float()).active()
        batch_keys = (rows + start) * sae.d_sae + latents.long()
        order = batch_keys.argsort()
        keys.append(batch_keys[order].cpu())
        values.append(batch_values[order].detach().float().cpu())
        bar.update(len(batch))
    bar.close()
    codes = Codes(torch.cat(keys), torch.cat(values), len(acts), sae.d_sae)
    if (codes.values < 0).any():
        raise ValueError("feature statistics need non-negative codes; the SAE gave negative ones")
    return codes
