"""Throughput of one TopK SAE training step: saelib's sparse kernels vs a dense reference.

Measures tokens/s (activation vectors per second) of a full training step, as saelib's trainer
runs it: forward, MSE loss (AuxK off), backward, removal of the decoder-gradient component
parallel to the decoder directions, Adam step, decoder renormalisation. The same step is timed
for ``saelib.saes.TopKSAE`` and for a dense reference (the formulation of dictionary_learning's
TopK trainer: the k values are scattered into a dense (batch, d_sae) matrix and decoded by a
dense matmul, all with plain autograd). Both use the optimizer saelib's trainer builds and run
in the same process at the same shapes, their timed steps interleaved so that background load
hits both alike. The script checks once that they reconstruct identically from the same weights,
then prints the median step time, tokens/s, and ``ratio = saelib tokens/s / dense tokens/s``.

    python benchmarks/topk_step.py [--steps N] [--warmup N] [--shape cpu|cuda|all] [--device D]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelib.saes.topk import TopKConfig, TopKSAE
from saelib.training import TopKLoss, TrainConfig, TrainState, make_optimizer


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    d_sae: int
    k: int
    batch: int


SHAPES = {
    "cpu": Shape("cpu", d_in=576, d_sae=4608, k=32, batch=1024),
    "cuda": Shape("cuda", d_in=2304, d_sae=16384, k=40, batch=2048),
}


class DenseTopKSAE(nn.Module):
    """Reference TopK SAE: dense latents, dense decoder, plain autograd."""

    def __init__(self, d_in: int, d_sae: int, k: int):
        super().__init__()
        self.k = k
        self.encoder = nn.Linear(d_in, d_sae)
        self.decoder = nn.Linear(d_sae, d_in)  # weight (d_in, d_sae): one direction per column
        nn.init.zeros_(self.decoder.bias)  # plays the role of b_dec

    def forward(self, x: Tensor) -> Tensor:
        post_relu = torch.relu(self.encoder(x - self.decoder.bias))
        values, indices = post_relu.topk(self.k, dim=-1, sorted=False)
        latents = torch.zeros_like(post_relu).scatter(-1, indices, values)
        return self.decoder(latents)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        weight, grad = self.decoder.weight, self.decoder.weight.grad
        grad.sub_((grad * weight).sum(dim=0, keepdim=True) * weight)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        weight = self.decoder.weight
        weight.div_(weight.norm(dim=0, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def load_from(self, sae: TopKSAE) -> None:
        """Copy saelib's weights (W_enc, b_enc, W_dec, b_dec) into this module."""
        self.encoder.weight.copy_(sae.W_enc)
        self.encoder.bias.copy_(sae.b_enc)
        self.decoder.weight.copy_(sae.W_dec.T)
        self.decoder.bias.copy_(sae.b_dec)


def l2(x: Tensor, recon: Tensor) -> Tensor:
    """TopKLoss's default reconstruction term: summed over d_in, averaged over the batch."""
    return (recon.float() - x.float()).pow(2).sum(dim=-1).mean()


def autocast(device: torch.device) -> AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def saelib_step(sae: TopKSAE, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    """The trainer's step for saelib (that of saelib.training.train_saes without logging,
    clipping and the divergence guard), through the SAE's own training hooks."""
    loss = TopKLoss(auxk_alpha=0.0)
    state = TrainState(0, 1, torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device))
    with autocast(x.device):
        total = loss(sae, x, sae(x), state)["total"]
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    sae.before_optimizer_step()  # drops the decoder-parallel gradient
    optimizer.step()
    sae.after_optimizer_step()  # renormalises the decoder


def dense_step(model: DenseTopKSAE, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    with autocast(x.device):
        total = l2(x, model(x))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    model.remove_parallel_decoder_grad()
    optimizer.step()
    model.normalize_decoder()


def build(shape: Shape, device: torch.device) -> tuple[TopKSAE, DenseTopKSAE, Tensor]:
    generator = torch.Generator().manual_seed(0)
    sae = TopKSAE(TopKConfig(shape.d_in, shape.d_sae, shape.k, use_decoder_bias=True), generator)
    x = torch.randn(shape.batch, shape.d_in, generator=generator)
    sae.init_decoder_bias(x)
    dense = DenseTopKSAE(shape.d_in, shape.d_sae, shape.k)
    dense.load_from(sae)
    return sae.to(device), dense.to(device), x.to(device)


@torch.no_grad()
def check_same_recon(sae: TopKSAE, dense: DenseTopKSAE, x: Tensor) -> tuple[bool, float]:
    """Same weights, float32, no autocast: do both reconstruct x identically?"""
    recon_sparse, recon_dense = sae(x).recon, dense(x)
    max_diff = (recon_sparse - recon_dense).abs().max().item()
    return torch.allclose(recon_sparse, recon_dense, rtol=1e-4, atol=1e-4), max_diff


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_optimizers(
    sae: TopKSAE, dense: DenseTopKSAE, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The optimizer saelib's trainer builds for ``sae``, and one with the same settings for
    ``dense``."""
    optimizer = make_optimizer(sae, TrainConfig(device=str(device)), device)
    return optimizer, type(optimizer)(dense.parameters(), **optimizer.defaults)


def time_interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each step; the steps take turns, after ``warmup`` rounds, the
    order rotating from round to round (so no step always runs after the same one)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            step = steps[name]
            sync(device)
            started = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def run_shape(shape: Shape, device: torch.device, warmup: int, steps: int) -> None:
    sae, dense, x = build(shape, device)
    same, max_diff = check_same_recon(sae, dense, x)
    print(
        f"[{shape.name}] d_in={shape.d_in} d_sae={shape.d_sae} k={shape.k} batch={shape.batch} "
        f"device={device.type} threads={torch.get_num_threads()} "
        f"autocast={'bf16' if device.type == 'cuda' else 'off'} steps={steps} warmup={warmup}"
    )
    print(f"  same reconstruction (same weights, fp32): {same}  max |diff| = {max_diff:.2e}")
    sae_opt, dense_opt = trainer_optimizers(sae, dense, device)
    print(f"  optimizer (as saelib's trainer): {type(sae_opt).__name__} {_settings(sae_opt)}")
    step_fns = {
        "saelib (sparse)": lambda: saelib_step(sae, sae_opt, x),
        "dense reference": lambda: dense_step(dense, dense_opt, x),
    }
    print_table(time_interleaved(step_fns, device, warmup, steps), shape.batch)


def _settings(optimizer: torch.optim.Optimizer) -> str:
    keys = ("lr", "betas", "fused", "foreach")
    return " ".join(f"{key}={optimizer.defaults.get(key)}" for key in keys)


def print_table(seconds: dict[str, float], batch: int) -> None:
    print(f"  {'implementation':<18}{'median ms/step':>16}{'tokens/s':>14}")
    for name, value in seconds.items():
        print(f"  {name:<18}{value * 1e3:>16.2f}{batch / value:>14,.0f}")
    ratio = seconds["dense reference"] / seconds["saelib (sparse)"]
    print(f"  ratio = saelib tokens/s / dense tokens/s = {ratio:.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument(
        "--shape",
        choices=["auto", "all", *SHAPES],
        default="auto",
        help="auto: the cpu shape, plus the cuda shape on a CUDA device",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser.parse_args()


def device_and_shapes(device_name: str, shape: str) -> tuple[torch.device, list[str]]:
    """The device (``auto``: CUDA when available) and the shapes to run (``auto``: the cpu
    shape, plus the cuda shape on a CUDA device; ``all``: both)."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if device_name == "auto" else device_name)
    if shape in ("auto", "all"):
        return device, ["cpu", "cuda"] if device.type == "cuda" or shape == "all" else ["cpu"]
    return device, [shape]


def main() -> None:
    args = parse_args()
    device, names = device_and_shapes(args.device, args.shape)
    torch.manual_seed(0)
    for name in names:
        run_shape(SHAPES[name], device, args.warmup, args.steps)


if __name__ == "__main__":
    main()
