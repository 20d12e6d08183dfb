"""Peak memory of training from a cache streamed shard by shard, at 1x and 10x the data.

Writes synthetic activation caches in the harvest format (random vectors, 64 per document) of
``--scales`` times the progressive-orthogonality study's default size (120,000 vectors of
width 576, SmolLM2-135M's residual stream) under a temporary folder, then trains one TopK SAE
(the study's width and k by default) for one epoch on each through ``train_saes``, each run in
a fresh process: streamed with a :class:`ShardedSource`, and, for comparison, the largest cache
loaded whole into memory as the studies load a harvest. Prints each run's peak resident memory
(RSS) and time.

    python benchmarks/stream_memory.py [--scales 1 10] [--d-sae 4096] [--k 40] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saelib.activations import HarvestConfig, ShardedSource, cache_folder, harvest, write_cache
from saelib.saes.topk import TopKConfig, TopKSAE
from saelib.training import SAESpec, TopKLoss, TrainConfig, train_saes

DEFAULT_VECTORS, D_MODEL = 120_000, 576  # the progressive-orthogonality study's harvest
DOC_LENGTH = 64
CHUNK = 65_536  # vectors generated at a time (one default shard)


def _config(scale: int) -> HarvestConfig:
    return HarvestConfig(dataset="wiki", max_tokens=scale * DEFAULT_VECTORS, context_length=128)


def write_synthetic_cache(root: Path, scale: int) -> HarvestConfig:
    """A cache in the harvest format, under ``root``, where ``harvest`` looks for it."""
    config = _config(scale)
    n = config.max_tokens
    generator = torch.Generator().manual_seed(scale)

    def chunks():
        for first in range(0, n, CHUNK):
            index = torch.arange(first, min(first + CHUNK, n))
            yield {
                "acts": torch.randn(len(index), D_MODEL, generator=generator),
                "doc_index": index // DOC_LENGTH,
                "position": index % DOC_LENGTH,
                "token_id": index % 49_152,
            }

    write_cache(cache_folder(config, root), chunks(), config)
    return config


def train_once(mode: str, scale: int, root: Path, args: argparse.Namespace) -> dict:
    """One epoch of one TopK SAE on the cache (in this process); peak RSS and time."""
    started = time.perf_counter()
    config = _config(scale)
    if mode == "stream":
        data = ShardedSource(config, cache_dir=root)
    else:  # the whole set in memory, as a study loads its harvest
        data = harvest(config, progress=False, cache_dir=root, on_corrupt="error").acts
    sae = TopKSAE(TopKConfig(d_in=D_MODEL, d_sae=args.d_sae, k=args.k))
    train_config = TrainConfig(batch_size=args.batch_size, device="cpu", log_every=10**9)
    [result] = train_saes([SAESpec("sae", sae, TopKLoss())], data, train_config, progress=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seconds = time.perf_counter() - started
    return {"peak_rss_mb": peak_kib / 1024, "seconds": seconds, "steps": result.steps}


def _run_child(mode: str, scale: int, root: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(scale), str(root)]
    command += ["--d-sae", str(args.d_sae), "--k", str(args.k)]
    command += ["--batch-size", str(args.batch_size)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SCALE", "ROOT"), help="internal")
    args = parser.parse_args()
    if args.child:
        mode, scale, root = args.child
        print(json.dumps(train_once(mode, int(scale), Path(root), args)))
        return
    root = Path(tempfile.mkdtemp(prefix="stream_memory-"))
    try:
        for scale in args.scales:
            write_synthetic_cache(root, scale)
        cases = [("stream", scale) for scale in args.scales] + [("memory", max(args.scales))]
        print(f"TopK SAE d_in={D_MODEL} d_sae={args.d_sae} k={args.k}, one epoch, CPU")
        print(f"{'data':<10}{'vectors':>11}{'data MB':>10}{'peak RSS MB':>13}{'seconds':>9}")
        for mode, scale in cases:
            vectors = scale * DEFAULT_VECTORS
            found = _run_child(mode, scale, root, args)
            data_mb = vectors * D_MODEL * 4 / 2**20
            label = f"{mode} {scale}x"
            print(
                f"{label:<10}{vectors:>11,}{data_mb:>10.0f}"
                f"{found['peak_rss_mb']:>13.0f}{found['seconds']:>9.0f}",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
