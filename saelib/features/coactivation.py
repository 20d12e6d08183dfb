"""The co-activating neighbours of each latent, counted from the stored codes.

:func:`saelib.evals.feature_separation.coactivation_pairs` encodes its input with ``sae(x)``;
here a stand-in module answers with the stored codes of the rows it is given, so the counts
cost no second encoder pass and follow the eval's definition exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelib.evals.feature_separation import coactivation_pairs
from saelib.features.codes import Codes
from saelib.features.sweeps import top_per_group
from saelib.saes import SAEOutput


class _CodeReplay(nn.Module):
    """Maps a column of consecutive row numbers to those rows' stored codes."""

    def __init__(self, codes: Codes, bar: tqdm):
        super().__init__()
        self.codes, self.d_sae, self.bar = codes, codes.d_sae, bar
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # tells the device

    def forward(self, row_numbers: Tensor) -> SAEOutput:
        start, stop = int(row_numbers[0, 0]), int(row_numbers[-1, 0]) + 1
        if stop - start != len(row_numbers):
            raise ValueError("the code replay serves consecutive rows only")
        self.bar.update(len(row_numbers))
        return self.codes.output(start, stop)


def coactive_neighbours(
    codes: Codes, n_neighbours: int, batch_size: int, progress: bool
) -> tuple[Tensor, Tensor]:
    """For each latent j, the latents i with the largest n_ij = P(i fires | j fires).

    Returns (latents, scores), each (d_sae, n_neighbours). Ties go to the smaller latent id;
    slots beyond the latents that ever fire with j are -1 (score NaN).
    """
    if len(codes) >= 1 << 24:  # float32 row numbers would no longer be exact
        raise ValueError("co-activation over more than 2**24 vectors is not supported")
    row_numbers = torch.arange(len(codes), dtype=torch.float32).unsqueeze(1)
    desc = "feature stats: co-activation"
    with tqdm(total=len(codes), desc=desc, unit="vec", disable=not progress) as bar:
        i, j, n_ij, _ = coactivation_pairs(_CodeReplay(codes, bar), row_numbers, batch_size)
    # the pairs come in order of i * d_sae + j, so equal scores keep the smaller i first
    scores, latents = top_per_group(j.cpu(), n_ij.cpu(), i.cpu(), codes.d_sae, n_neighbours)
    return latents, scores.float().masked_fill(latents < 0, torch.nan)
