"""Training-step throughput of saelib's TopK SAE against its peers: sparsify, dictionary_learning.

Install the peers' wheels without their dependency trees (those pull in datasets, pyarrow, wandb,
nnsight, umap, ...), plus the small modules the classes used here import:

    .venv/bin/pip install --no-deps eai-sparsify==1.3.3 dictionary-learning==0.1.0
    .venv/bin/pip install --no-deps einops==0.8.2 natsort==8.4.0 simple-parsing==0.1.9 \
        docstring-parser==0.18.0 schedulefree==1.4.1

sparsify's package ``__init__`` imports its ``Trainer``, which needs ``datasets`` (and pyarrow);
this script loads the sparsify modules it uses without running that ``__init__``, so ``datasets``
need not be installed. A peer that is not installed is skipped.

All contestants run in one process at the same shape, on the same batch and from the same
weights, their timed steps interleaved (one step of each per round, the order rotating) so that
background load hits all alike. Each runs its own library's full training step, as that library's
trainer runs it:

- saelib: ``saelib.training.loop._train_step``, the step ``train_saes`` takes: forward, ``TopKLoss``
  (l2 + 1/32 AuxK, k_aux = d_in // 2), backward, decoder-gradient projection
  (``before_optimizer_step``), ``clip_grad_norm_`` at ``TrainConfig.grad_clip_norm`` (1.0), the
  divergence guard with its copy of the last good weights, fused Adam (lr 1e-3), the LR
  scheduler, decoder renormalisation (``after_optimizer_step``), dead-latent bookkeeping, and a
  log entry every ``log_every`` steps.
- sparsify: ``SparseCoder`` (TopK, num_latents = d_sae) driven as ``Trainer.fit`` drives it with
  ``loss_fn="fvu"`` and one micro-batch: decoder renormalisation (the trainer does it before every
  forward), forward with the dead mask (AuxK is computed inside the forward), backward of
  ``fvu + auxk_alpha * auxk``, the trainer's per-step loss reads (``float(fvu)``,
  ``float(auxk)``), removal of the decoder-parallel gradient, its optimizer, dead-latent
  bookkeeping. The optimizer is the trainer's default, ``"signum"``: ScheduleFreeWrapper(SignSGD,
  momentum 0.95), lr 5e-3 / sqrt(num_latents / 2**14); ``--sparsify-optimizer adam`` takes its
  Adam branch instead (bitsandbytes' Adam8bit when importable, else ``torch.optim.Adam``, lr
  2e-4 / sqrt(num_latents / 2**14), linear warmup schedule). The trainer clips no gradients.
  Its AuxK term trains the decoder only: the backward of its fused encoder drops the gradient of
  the dense pre-activations the AuxK latents are read from, so its AuxK backward does less work
  than saelib's and dictionary_learning's. With triton installed (CUDA) it decodes with its
  Triton kernel, else with ``embedding_bag``. Left out, as for every contestant: producing the
  batch (there, the language-model forward, the hook's token mask and its clone of the
  activations).
- dictionary_learning: ``TopKTrainer.update(step, x)`` on ``AutoEncoderTopK``: dense TopK forward,
  l2 + 1/32 AuxK (dense, k_aux = d_in // 2), backward, decoder-gradient projection,
  ``clip_grad_norm_(1.0)``, Adam (lr 2e-4 / sqrt(d_sae / 2**14)), LR scheduler, decoder
  renormalisation, ``loss.item()``. Step indices start past ``threshold_start_step``, so the
  running mean of the inference threshold is updated as in most of a real run. On CUDA the batch
  is bf16 and the step runs under bf16 autocast, as ``trainSAE(autocast_dtype=torch.bfloat16)``.
- encoder GEMM: ``addmm(b_enc, x, W_enc.T)`` without gradient, the one dense product no TopK step
  avoids: the hardware floor.
- Adam alone: saelib's fused Adam over the SAE's four parameters, gradients given.

AuxK runs every step in every library, on the same 10% of latents: those latents get an encoder
bias of -10 (the other pre-activations are about N(0, 1) on this data), so they never fire, and
their "tokens since fired" counter starts at twice the library's threshold; each library's own
bookkeeping then keeps exactly them dead. (Their AuxK activations are ReLU zeros; no library's
cost depends on those values.) The switches:

- saelib: ``TopKLoss(auxk_alpha=1/32)``; the run's ``tokens_since_fired`` (dead when
  >= ``TrainConfig.dead_after_tokens``), read before the step's forward.
- sparsify: ``TrainConfig(auxk_alpha=1/32)`` (its default is 0: AuxK off); the trainer's
  ``num_tokens_since_fired`` (dead when > ``dead_feature_threshold``), passed to the forward as
  ``dead_mask``.
- dictionary_learning: ``TopKTrainer(auxk_alpha=1/32)`` (its default); the trainer's
  ``num_tokens_since_fired`` (dead when >= ``dead_feature_threshold``, read after the counters
  are updated with the current batch).

The number of dead latents each library's AuxK saw at its last step is printed. With ``--check``
(the default), before timing: every forward must reconstruct the batch with finite values, and
sparsify and dictionary_learning, given saelib's weights (all three share one parametrisation:
W_enc, b_enc, unit-norm W_dec, b_dec subtracted before encoding and added after decoding), must
reconstruct it as saelib does (float32; sparsify's forward autocasts itself to bf16 on CUDA, so
there only its finiteness is required).

Printed per thread count: median ms per step, tokens/s, and the ratios with the issue's goals:
saelib's step <= 1.6x the encoder GEMM, >= 2x faster than sparsify, >= 5x faster than
dictionary_learning.

    python benchmarks/peers.py [--steps N] [--warmup N] [--threads 1 2] [--shape cpu|cuda|all]
        [--device D] [--sparsify-optimizer signum|adam] [--no-check]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from topk_step import (  # that benchmark's shapes and helpers
    SHAPES,
    Shape,
    autocast,
    device_and_shapes,
    time_interleaved,
)
from torch import Tensor

from saelib.saes.topk import TopKConfig, TopKSAE
from saelib.training import SAESpec, TopKLoss, TrainConfig, make_optimizer
from saelib.training import loop as saelib_loop

AUXK_ALPHA = 1 / 32
DEAD_FRACTION = 0.1
DEAD_BIAS = -10.0
TOTAL_STEPS = 1_000_000  # the run length each trainer is told; only its LR schedule reads it

SAELIB, SPARSIFY, DICTIONARY_LEARNING = "saelib", "sparsify", "dictionary_learning"
GEMM, ADAM = "encoder GEMM", "Adam alone"
GOALS = (  # (numerator, denominator, goal, higher is better)
    (SAELIB, GEMM, 1.6, False),
    (SPARSIFY, SAELIB, 2.0, True),
    (DICTIONARY_LEARNING, SAELIB, 5.0, True),
)


@dataclass
class Contestant:
    name: str
    step: Callable[[], None]
    dead: Callable[[], int] | None = None  # latents its AuxK treats as dead now
    forward: Callable[[Tensor], Tensor] | None = None  # reconstruction, for --check


@dataclass
class Reference:
    """saelib's freshly initialised SAE, the batch, and the latents made dead."""

    sae: TopKSAE
    x: Tensor
    dead: Tensor  # (d_sae,) bool


def build_reference(shape: Shape, device: torch.device) -> Reference:
    """saelib's SAE with its decoder bias placed on the batch (as on the loop's first step) and
    ``DEAD_FRACTION`` of its latents silenced by a very negative encoder bias."""
    generator = torch.Generator().manual_seed(0)
    sae = TopKSAE(TopKConfig(shape.d_in, shape.d_sae, shape.k, use_decoder_bias=True), generator)
    x = torch.randn(shape.batch, shape.d_in, generator=generator)
    sae.init_decoder_bias(x)
    chosen = torch.randperm(shape.d_sae, generator=generator)[: round(DEAD_FRACTION * shape.d_sae)]
    dead = torch.zeros(shape.d_sae, dtype=torch.bool)
    dead[chosen] = True
    with torch.no_grad():
        sae.b_enc[dead] = DEAD_BIAS
    return Reference(sae.to(device), x.to(device), dead.to(device))


def dead_counters(dead: Tensor, threshold: int) -> Tensor:
    """Tokens-since-fired counters: twice ``threshold`` for the dead latents, 0 for the others."""
    return torch.where(dead, 2 * threshold, 0).long()


def saelib_contestant(ref: Reference, device: torch.device) -> Contestant:
    """saelib's loop step on a copy of the reference SAE, from step 1 (step 0 only adds the
    decoder-bias placement, already done)."""
    config = TrainConfig(device=str(device))
    sae = copy.deepcopy(ref.sae)
    spec = SAESpec(SAELIB, sae, TopKLoss(auxk_alpha=AUXK_ALPHA))
    run = saelib_loop._start_run(spec, config, device, TOTAL_STEPS, None, False, "benchmark")
    run.tokens_since_fired = dead_counters(ref.dead, config.dead_after_tokens)
    run.step = 1

    def step() -> None:
        saelib_loop._train_step(run, ref.x, run.step, TOTAL_STEPS, config, device)
        if run.status != "training":
            raise RuntimeError(f"saelib's run stopped: {run.message}")

    def dead() -> int:
        return int((run.tokens_since_fired >= config.dead_after_tokens).sum())

    return Contestant(SAELIB, step, dead, lambda x: sae(x).recon)


def sparsify_module(name: str) -> ModuleType:
    """``sparsify.<name>``, imported without running the package's ``__init__`` (whose Trainer
    import needs ``datasets``)."""
    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        if spec is None:
            raise ModuleNotFoundError(
                "sparsify is not installed: pip install --no-deps eai-sparsify"
            )
        sys.modules["sparsify"] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"sparsify.{name}")


def sparsify_optimizers(sae, train_config, num_batches: int) -> tuple[list, list]:
    """The optimizers and LR schedulers ``sparsify.Trainer.__init__`` builds for one coder."""
    scale = (sae.num_latents / 2**14) ** 0.5
    if train_config.optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper

        SignSGD = sparsify_module("sign_sgd").SignSGD
        lr = train_config.lr or 5e-3 / scale
        optimizer = ScheduleFreeWrapper(
            SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95
        )
        optimizer.train()
        return [optimizer], []
    if train_config.optimizer == "adam":
        from transformers import get_linear_schedule_with_warmup

        try:
            from bitsandbytes.optim import Adam8bit as Adam
        except ImportError:
            from torch.optim import Adam
        lr = train_config.lr or 2e-4 / scale
        adam = Adam([dict(params=sae.parameters(), lr=lr)])
        schedule = get_linear_schedule_with_warmup(adam, train_config.lr_warmup_steps, num_batches)
        return [adam], [schedule]
    raise ValueError(f"optimizer {train_config.optimizer!r} is not benchmarked")


def sparsify_coder(ref: Reference, device: torch.device):
    """sparsify's ``SparseCoder`` holding the reference SAE's weights."""
    sparse_coder = sparsify_module("sparse_coder")
    config = sparse_coder.SparseCoderConfig(num_latents=ref.sae.d_sae, k=ref.sae.k)
    coder = sparse_coder.SparseCoder(ref.sae.d_in, config, device, dtype=torch.float32)
    with torch.no_grad():
        coder.encoder.weight.copy_(ref.sae.W_enc)
        coder.encoder.bias.copy_(ref.sae.b_enc)
        coder.W_dec.copy_(ref.sae.W_dec)
        coder.b_dec.copy_(ref.sae.b_dec)
    return coder


def sparsify_contestant(ref: Reference, device: torch.device, optimizer: str) -> Contestant:
    """One step of ``sparsify.Trainer.fit`` (loss_fn "fvu", one hookpoint, no gradient
    accumulation), its activations given."""
    coder = sparsify_coder(ref, device)
    train_config = sparsify_module("config").TrainConfig
    config = train_config(coder.cfg, optimizer=optimizer, auxk_alpha=AUXK_ALPHA)
    optimizers, schedulers = sparsify_optimizers(coder, config, TOTAL_STEPS)
    counters = dead_counters(ref.dead, config.dead_feature_threshold)
    did_fire = torch.zeros_like(ref.dead)
    averages = {"fvu": 0.0, "auxk": 0.0}  # the trainer's running averages for its log
    x = ref.x

    def step() -> None:
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = counters > config.dead_feature_threshold if config.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = coder(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        averages["fvu"] += float(out.fvu.detach())
        averages["auxk"] += float(out.auxk_loss.detach())
        loss = out.fvu + config.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        for each in optimizers:
            each.step()
            each.zero_grad()
        for schedule in schedulers:
            schedule.step()
        with torch.no_grad():
            counters.add_(len(x))
            counters[did_fire] = 0
            did_fire.zero_()

    def dead() -> int:
        return int((counters > config.dead_feature_threshold).sum())

    return Contestant(SPARSIFY, step, dead, lambda x: coder(x).sae_out)


def dictionary_learning_trainer(ref: Reference, device: torch.device):
    """dictionary_learning's ``TopKTrainer`` whose ``AutoEncoderTopK`` holds the reference
    SAE's weights."""
    from dictionary_learning.trainers.top_k import TopKTrainer

    sae = ref.sae
    trainer = TopKTrainer(
        TOTAL_STEPS,
        sae.d_in,
        sae.d_sae,
        sae.k,
        layer=0,
        lm_name="benchmark",
        auxk_alpha=AUXK_ALPHA,
        device=str(device),
    )
    with torch.no_grad():
        trainer.ae.encoder.weight.copy_(sae.W_enc)
        trainer.ae.encoder.bias.copy_(sae.b_enc)
        trainer.ae.decoder.weight.copy_(sae.W_dec.T)
        trainer.ae.b_dec.copy_(sae.b_dec)
    trainer.num_tokens_since_fired = dead_counters(ref.dead, trainer.dead_feature_threshold)
    return trainer


def dictionary_learning_contestant(ref: Reference, device: torch.device) -> Contestant:
    trainer = dictionary_learning_trainer(ref, device)
    x = ref.x.to(torch.bfloat16) if device.type == "cuda" else ref.x  # as trainSAE casts it
    step_index = trainer.threshold_start_step + 1

    def step() -> None:
        nonlocal step_index
        with autocast(device):
            trainer.update(step_index, x)
        step_index += 1

    return Contestant(DICTIONARY_LEARNING, step, lambda: trainer.dead_features, trainer.ae)


def gemm_contestant(ref: Reference, device: torch.device) -> Contestant:
    weight, bias = ref.sae.W_enc.detach().clone(), ref.sae.b_enc.detach().clone()

    @torch.no_grad()
    def step() -> None:
        with autocast(device):
            torch.addmm(bias, ref.x, weight.T)

    return Contestant(GEMM, step)


def adam_contestant(ref: Reference, device: torch.device) -> Contestant:
    sae = copy.deepcopy(ref.sae)
    for parameter in sae.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer = make_optimizer(sae, TrainConfig(device=str(device)), device)
    return Contestant(ADAM, optimizer.step)


def build_contestants(ref: Reference, device: torch.device, sparsify_optimizer: str):
    """Every contestant whose library is installed, and the names of the skipped ones."""
    contestants = [saelib_contestant(ref, device)]
    skipped = []
    if importlib.util.find_spec("sparsify") is not None:
        contestants.append(sparsify_contestant(ref, device, sparsify_optimizer))
    else:
        skipped.append(f"{SPARSIFY} (pip install --no-deps eai-sparsify)")
    if importlib.util.find_spec("dictionary_learning") is not None:
        contestants.append(dictionary_learning_contestant(ref, device))
    else:
        skipped.append(f"{DICTIONARY_LEARNING} (pip install --no-deps dictionary-learning)")
    contestants += [gemm_contestant(ref, device), adam_contestant(ref, device)]
    return contestants, skipped


@torch.no_grad()
def check_reconstructions(ref: Reference, contestants: list[Contestant]) -> bool:
    """Before any step: finite reconstructions, and the peers' equal to saelib's (float32)."""
    expected = ref.sae(ref.x).recon
    variance = (ref.x - ref.x.mean(0)).pow(2).sum()
    passed = True
    for contestant in contestants:
        if contestant.forward is None:
            continue
        recon = contestant.forward(ref.x).float()
        finite = bool(recon.isfinite().all())
        fvu = float((recon - ref.x).pow(2).sum() / variance)
        diff = float((recon - expected).abs().max())
        line = f"  check {contestant.name:<20} finite={finite} fvu={fvu:.4f}"
        same = True
        if contestant.name != SAELIB:
            bf16 = contestant.name == SPARSIFY and ref.x.is_cuda  # its forward autocasts itself
            same = bf16 or torch.allclose(recon, expected, rtol=1e-4, atol=1e-4)
            note = " (its own bf16 autocast: not compared)" if bf16 else ""
            line += f" same as saelib from the same weights: {same}, max |diff| = {diff:.2e}{note}"
        print(line)
        passed &= finite and same
    return passed


def print_table(seconds: dict[str, float], batch: int) -> None:
    print(f"  {'contestant':<22}{'median ms/step':>16}{'tokens/s':>14}")
    for name, value in seconds.items():
        print(f"  {name:<22}{value * 1e3:>16.2f}{batch / value:>14,.0f}")
    print(f"  {'ratio (step times)':<34}{'measured':>10}{'goal':>10}{'met':>6}")
    for numerator, denominator, goal, higher in GOALS:
        label = f"{numerator} / {denominator}"
        if numerator not in seconds or denominator not in seconds:
            print(f"  {label:<34}{'n/a':>10}")
            continue
        ratio = seconds[numerator] / seconds[denominator]
        met = ratio >= goal if higher else ratio <= goal
        bound = f"{'>=' if higher else '<='} {goal:g}x"
        print(f"  {label:<34}{ratio:>9.2f}x{bound:>10}{'yes' if met else 'NO':>6}")


def versions() -> str:
    found = []
    for distribution in ("torch", "eai-sparsify", "dictionary-learning"):
        try:
            found.append(f"{distribution} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{distribution} absent")
    return ", ".join(found)


def run_shape(shape: Shape, device: torch.device, threads: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ref = build_reference(shape, device)
    contestants, skipped = build_contestants(ref, device, args.sparsify_optimizer)
    print(
        f"[{shape.name}] d_in={shape.d_in} d_sae={shape.d_sae} k={shape.k} batch={shape.batch} "
        f"device={device.type} threads={torch.get_num_threads()} "
        f"autocast={'bf16' if device.type == 'cuda' else 'off'} steps={args.steps} "
        f"warmup={args.warmup} dead latents={int(ref.dead.sum())} "
        f"sparsify optimizer={args.sparsify_optimizer}"
    )
    print(f"  versions: {versions()}")
    for name in skipped:
        print(f"  skipped, not installed: {name}")
    if args.check and not check_reconstructions(ref, contestants):
        raise SystemExit("check failed: see the lines above")
    steps = {contestant.name: contestant.step for contestant in contestants}
    seconds = time_interleaved(steps, device, args.warmup, args.steps)
    print_table(seconds, shape.batch)
    seen = ", ".join(f"{c.name} {c.dead()}" for c in contestants if c.dead is not None)
    print(f"  dead latents in AuxK at the last step: {seen}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contestant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one table each"
    )
    parser.add_argument(
        "--shape",
        choices=["auto", "all", *SHAPES],
        default="auto",
        help="auto: the cpu shape, plus the cuda shape on a CUDA device",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--sparsify-optimizer",
        choices=["signum", "adam"],
        default="signum",
        help="sparsify's trainer optimizer (signum is its default)",
    )
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the reconstructions once before timing",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device, names = device_and_shapes(args.device, args.shape)
    for name in names:
        for threads in args.threads:
            run_shape(SHAPES[name], device, threads, args)


if __name__ == "__main__":
    main()
