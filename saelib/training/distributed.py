"""Multi-process training with PyTorch's own engine (``torch.distributed``, launched by torchrun).

``train_saes`` reads ``TrainConfig.parallel`` when a process group with more than one process is
initialised (otherwise every mode trains as ``"none"``, in one process):

- ``"data"``: every process holds the same models and reads the same global batch; each trains
  on its own contiguous slice of the rows and the gradients are summed over the processes
  (weighted by rows, so the update is the global batch's) before ``before_optimizer_step``,
  clipping and the optimizer step. The latents fired anywhere count as fired, the dead-latent
  counter advances by the global batch, the logged loss terms are the global batch's, and a
  divergence stops the model on every process. Process 0 alone writes checkpoints; all resume
  from them. ``batch_size`` must be a multiple of the world size.
- ``"sae"``: the specs are dealt out round-robin (spec ``i`` trains on process
  ``i % world_size``); each process trains its share on the same batches, with no traffic, and
  writes its own models' checkpoints. ``train_saes`` returns the results of a process's own
  specs; with a ``checkpoint_dir``, every process returns every spec's result, in spec order,
  the others' loaded from their final checkpoints (with the state hooks keep per model).

A data-parallel run trains to the weights of a one-process run with the same global batch
(up to float rounding) when its loss is a mean over rows, given statistics of the whole batch:
``TopKLoss`` completes its batch statistics (AuxK's per-dimension variance, the ``"fvu"``
denominator) over every process's slice with :func:`batch_sum`, and ``L1Loss`` its adaptive
coefficient, so their every form is exact. A loss that keeps statistics of the rows it sees
would see only its process's slice: ``OrderingLoss`` (its firing tracker) and
``OrthogonalTopKLoss`` (its n_ij) declare ``data_parallel_exact = False`` and are refused in
data mode before any step: train those in SAE mode. Hooks run on every process (data mode: on
identical models; SAE mode: on the process's own models) and must act the same on each.

Under a data- or SAE-parallel run, every process checkpoints into process 0's
``checkpoint_dir`` (it must be a folder all of them reach).

Launch a script that calls ``train_saes`` under torchrun, unchanged::

    torchrun --nproc_per_node 2 -m saelib.training.distributed --parallel data train.py ARGS

(``-m package.module`` in place of the script path runs a module). The launcher initialises the
process group (:func:`init_from_env`) and makes ``--parallel`` the mode of every ``train_saes``
call whose config leaves ``parallel`` at ``"none"`` (through ``$SAELIB_PARALLEL``, which
``python -m saelib run --processes N`` sets for the notebook kernels it starts under torchrun:
those join the group on their first ``harvest`` or ``train_saes``, see
:func:`join_launched_group`). A script of one's own may instead call :func:`init_from_env` and
set ``TrainConfig(parallel=...)``, then run as ``torchrun --nproc_per_node 2 train.py``.

Every helper here is a no-op (or the one-process answer) when no multi-process group is set up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch import distributed as dist

__all__ = [
    "Parallel",
    "barrier",
    "batch_rows",
    "batch_sum",
    "from_main",
    "init_from_env",
    "is_distributed",
    "is_main",
    "join_launched_group",
    "launch_mode",
    "main",
    "mode",
    "rank",
    "world_size",
]

Parallel = Literal["none", "data", "sae"]
PARALLEL_MODES: tuple[str, ...] = Parallel.__args__
T = TypeVar("T")

LAUNCH_VARIABLE = "SAELIB_PARALLEL"  # the launchers' mode for configs that leave "none"
_in_sharded_loss: ContextVar[bool] = ContextVar("saelib_in_sharded_loss", default=False)


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); backend "nccl" when CUDA is available, else "gloo". With CUDA,
    each process takes the GPU of its LOCAL_RANK. Outside torchrun (no WORLD_SIZE) it does
    nothing, so one script runs both ways. Returns whether a process group is initialised."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def launch_mode() -> Parallel:
    """The mode a launcher asked for (``$SAELIB_PARALLEL``), "none" without one."""
    requested = os.environ.get(LAUNCH_VARIABLE, "none")
    if requested not in PARALLEL_MODES:
        raise ValueError(f"${LAUNCH_VARIABLE} must be one of {PARALLEL_MODES}, got {requested!r}")
    return requested


def join_launched_group() -> bool:
    """In a process a launcher started under torchrun with a mode (a study notebook's kernel):
    initialise the process group if that is not done yet. Returns whether one is initialised."""
    if launch_mode() == "none":
        return dist.is_available() and dist.is_initialized()
    return init_from_env()


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Process 0 (the only process when not distributed)."""
    return rank() == 0


def mode(requested: Parallel) -> Parallel:
    """The mode ``train_saes`` trains in: ``requested`` (the launcher's ``--parallel`` when
    that is "none"), and "none" whenever there is no multi-process group."""
    if requested not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {requested!r}")
    chosen = requested if requested != "none" else launch_mode()
    return chosen if is_distributed() else "none"


def from_main(value: T) -> T:
    """Process 0's ``value`` on every process (a picklable object; ``value`` itself alone)."""
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main(write: Callable[[], None]) -> None:
    """Run ``write`` on process 0 alone; the others wait until it is done."""
    try:
        if is_main():
            write()
    finally:
        barrier()


def owned(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` in SAE-parallel mode: item i goes to process i % W."""
    return list(items[rank() :: world_size()])


def check_batch_split(batch_size: int, n_rows: int, total_steps: int) -> None:
    """Refuse, in one line, a batch that cannot be split over the processes."""
    size = world_size()
    if batch_size % size != 0:
        raise ValueError(
            f"parallel='data' splits each batch over {size} processes: batch_size={batch_size} "
            f"must be a multiple of {size}"
        )
    last = n_rows % batch_size  # an epoch's last, short batch
    if 0 < last < size and total_steps >= -(-n_rows // batch_size):
        raise ValueError(
            f"parallel='data': each epoch ends with a batch of {last} row(s), fewer than the "
            f"{size} processes; choose a batch_size that leaves 0 or at least {size} rows of the "
            f"{n_rows} over"
        )


def shard(batch: Tensor) -> tuple[Tensor, float]:
    """This process's contiguous slice of the global batch (rows [r*n/W, (r+1)*n/W)), and its
    share of the rows (the weight of its gradients and loss terms)."""
    size, index, n = world_size(), rank(), len(batch)
    rows = batch[index * n // size : (index + 1) * n // size]
    return rows, len(rows) / n


@contextlib.contextmanager
def sharded_loss(active: bool) -> Iterator[None]:
    """While a data-parallel process computes its loss on its slice: :func:`batch_sum` reduces."""
    token = _in_sharded_loss.set(active and is_distributed())
    try:
        yield
    finally:
        _in_sharded_loss.reset(token)


def batch_sum(tensor: Tensor) -> Tensor:
    """A sum over the rows of the batch, completed over every process's slice when called from
    a data-parallel loss (``tensor`` as it is otherwise). For statistics a loss normalises by
    (a variance, a row count): no gradient flows through the result."""
    if not _in_sharded_loss.get():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def batch_rows(x: Tensor) -> int:
    """The batch's row count: ``len(x)``, or the sum over every process's slice when called
    from a data-parallel loss (no tensor is made otherwise)."""
    if not _in_sharded_loss.get():
        return len(x)
    return int(batch_sum(torch.tensor(len(x), device=x.device)))


def broadcast_module(module: nn.Module) -> None:
    """Copy process 0's parameters and buffers to every process."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def sum_gradients(module: nn.Module, weight: float) -> None:
    """Each gradient becomes the sum over processes of ``weight`` times the local one: the
    global batch's gradient when each local loss is a mean over ``weight`` of the rows. A
    parameter with a gradient on some process only gets zeros elsewhere. Gradients a submodule
    keeps elsewhere (``kept_gradients()``: a masked layer's dense gradient, which RigL grows
    by) are summed alike."""
    if not is_distributed():
        return
    kept = [grad for sub in module.modules() for grad in _kept_gradients(sub)]
    pending = [dist.all_reduce(grad.mul_(weight), async_op=True) for grad in kept]
    for grad in _parameter_gradients(module):
        pending.append(dist.all_reduce(grad.mul_(weight), async_op=True))
    for work in pending:
        work.wait()


def _kept_gradients(module: nn.Module) -> list[Tensor]:
    method = getattr(module, "kept_gradients", None)
    return method() if method is not None else []


def _parameter_gradients(module: nn.Module) -> list[Tensor]:
    """The gradients to sum: of every trainable parameter that has one on some process (zeros
    where it has none)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        return []
    flags = [parameter.grad is not None for parameter in parameters]
    has_grad = torch.tensor(flags, dtype=torch.uint8, device=parameters[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    chosen = [p for p, anywhere in zip(parameters, has_grad.tolist(), strict=True) if anywhere]
    for parameter in chosen:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    return [parameter.grad for parameter in chosen]


def sum_terms(terms: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """Loss terms (scalars) as the weighted sum over processes: the global batch's values.
    Detached: for logging and the divergence check, after the backward pass."""
    if not is_distributed():
        return terms
    names = list(terms)
    values = torch.stack([terms[name].detach().float().reshape(()) for name in names]) * weight
    dist.all_reduce(values)
    return dict(zip(names, values.unbind(), strict=True))


def any_fired(fired: Tensor | None) -> Tensor | None:
    """(n_latents,) bool: the latents that fired on any process's slice."""
    if fired is None or not is_distributed():
        return fired
    anywhere = fired.to(torch.uint8)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    return anywhere.bool()


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on some process (every process gets the same answer)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.uint8, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def main(argv: list[str] | None = None) -> None:
    """``python -m saelib.training.distributed [--parallel MODE] (SCRIPT | -m MODULE) ARGS``,
    under torchrun: initialise the process group, then run the script as ``__main__``."""
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m saelib.training.distributed",
        description="Run a training script on every process, train_saes in parallel.",
    )
    parser.add_argument("--parallel", choices=("data", "sae"), default="data")
    parser.add_argument("-m", dest="module", help="run this module instead of a script")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="SCRIPT ARGS (or ARGS with -m)")
    args = parser.parse_args(argv)
    if args.module is None and not args.target:
        parser.error("give a script to run, or -m MODULE")
    previous = os.environ.get(LAUNCH_VARIABLE)
    os.environ[LAUNCH_VARIABLE] = args.parallel
    init_from_env()
    try:
        if args.module is not None:
            sys.argv = [args.module, *args.target]
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args.target)
            runpy.run_path(args.target[0], run_name="__main__")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if previous is None:
            os.environ.pop(LAUNCH_VARIABLE, None)
        else:
            os.environ[LAUNCH_VARIABLE] = previous


if __name__ == "__main__":
    main()
