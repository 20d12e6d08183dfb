"""Step time of the progressive-orthogonality study's runs: the EMA schedules against the static
penalty and the plain TopK step, at the study's default shape.

Each run is a full training step as the loop runs it (forward, TopK loss with AuxK, the
orthogonality penalty, backward, Adam), on the same batches, in one process with the timed
steps interleaved so that background load hits every run alike. Steps are timed late in
training (progress 0.7), where every EMA schedule is on and its EMA holds the pairs of many
batches. Prints the median step time per run and its ratio to the static penalty's.

With ``--sparse-ema`` the EMA is kept as a sparse tensor of the pairs seen, as it is for a
d_sae whose dense pair matrix exceeds ``dense_max_mib``.

    python benchmarks/ortho_step.py [--steps N] [--warmup N] [--d-sae 4096] [--batch 512]
                                    [--sparse-ema]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelib.saes import TopKConfig, TopKSAE
from saelib.training import TrainConfig, make_optimizer
from saelib.training.losses import TopKLoss, TrainState
from saelib.training.orthogonality import OrthogonalTopKLoss, make_penalty

RUNS = ("baseline", "static", "run4", "run5", "run6", "run7")


def build(run: str, d_in: int, d_sae: int, k: int, sparse_ema: bool):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in, d_sae, k))
    loss = TopKLoss()
    if run != "baseline":
        penalty = make_penalty(run)
        if sparse_ema:
            penalty.dense_max_mib = 0.0
        loss = OrthogonalTopKLoss(penalty)
    optimizer = make_optimizer(sae, TrainConfig(lr=5e-4), torch.device("cpu"))
    return sae, loss, optimizer


def step(sae, loss, optimizer, batch: torch.Tensor, state: TrainState) -> float:
    started = time.perf_counter()
    output = sae(batch)
    terms = loss(sae, batch, output, state)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--sparse-ema", action="store_true", help="keep every EMA sparse")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(1)
    batches = torch.randn(16, args.batch, args.d_in, generator=generator) * 3
    runs = {run: build(run, args.d_in, args.d_sae, args.k, args.sparse_ema) for run in RUNS}
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    dead[: args.d_sae // 10] = True  # AuxK on, as when 10% of latents are dead
    total = round((args.warmup + args.steps) / 0.3)  # the timed steps lie past 70% of training
    times: dict[str, list[float]] = {run: [] for run in runs}
    for index in range(args.warmup + args.steps):
        state = TrainState(total - args.warmup - args.steps + index, total, dead)
        for run, (sae, loss, optimizer) in runs.items():
            seconds = step(sae, loss, optimizer, batches[index % len(batches)], state)
            if index >= args.warmup:
                times[run].append(seconds)
    static = statistics.median(times["static"])
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")  # fmt: skip
    for run, values in times.items():
        median = statistics.median(values)
        print(f"{run:>9}: {1000 * median:7.1f} ms/step  {median / static:5.2f}x static")


if __name__ == "__main__":
    main()
