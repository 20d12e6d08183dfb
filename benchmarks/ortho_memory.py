"""Peak memory and time of the orthogonality penalty: saelib's sparse version vs a dense one.

The dense formulation (the original's) builds n_ij, c_ij and F = f^T f / B as d_sae x d_sae
matrices; saelib's works on the co-active pairs of the batch. Each variant runs in its own
process, and the peak resident memory of a process that does everything but the penalty is
subtracted, so the printed number is what the penalty itself adds.

    python benchmarks/ortho_memory.py [--d-sae 16384] [--d-in 576] [--k 40] [--batch 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def run_variant(variant: str, d_sae: int, d_in: int, k: int, batch: int) -> dict:
    from saelib.saes import TopKConfig, TopKSAE
    from saelib.saes.sparse_ops import dense_latents
    from saelib.training.losses import TrainState
    from saelib.training.orthogonality import OrthogonalityPenalty, static_schedule

    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in, d_sae, k, use_decoder_bias=False))
    x = torch.randn(batch, d_in)
    output = sae(x)
    started = time.perf_counter()
    if variant == "sparse":
        penalty = OrthogonalityPenalty(static_schedule(0.1, 0.1), include_diagonal=True)
        value = penalty(sae, output, TrainState(1, 10, torch.zeros(d_sae, dtype=torch.bool)))
        value.backward()
    elif variant == "dense":
        f = dense_latents(output.acts, output.indices, d_sae)
        active = (f > 0).float()
        together = active.T @ active
        ratio = torch.nan_to_num(together / together.diagonal()[None, :], nan=0.0)
        coefficient = ((ratio - 0.1) / 0.1).clamp(0, 1)
        value = 0.1 * (coefficient * (f.T @ f / batch).abs()).sum()
        value.backward()
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "peak_mb": peak_mb, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.d_sae, args.d_in, args.k, args.batch)
    if args.variant:
        print(json.dumps(run_variant(args.variant, *shape)))
        return
    results = {variant: _in_subprocess(variant, args) for variant in ("none", "sparse", "dense")}
    base = results["none"]["peak_mb"]
    print(f"d_sae={args.d_sae} d_in={args.d_in} k={args.k} batch={args.batch} (CPU)")
    print(f"{'variant':<8} {'penalty adds (MB)':>18} {'seconds':>9}")
    for variant in ("sparse", "dense"):
        row = results[variant]
        print(f"{variant:<8} {row['peak_mb'] - base:>18.0f} {row['seconds']:>9.2f}")
    ratio = (results["dense"]["peak_mb"] - base) / max(results["sparse"]["peak_mb"] - base, 1.0)
    print(f"dense / sparse extra memory = {ratio:.1f}x")


def _in_subprocess(variant: str, args) -> dict:
    sizes = ["--d-sae", args.d_sae, "--d-in", args.d_in, "--k", args.k, "--batch", args.batch]
    command = [sys.executable, __file__, "--variant", variant, *map(str, sizes)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
