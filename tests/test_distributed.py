"""Training over 2 CPU processes (gloo): data parallel gives the weights of one process with the
global batch, and resumes; SAE parallel gives each SAE's weights trained alone, each checkpoint
written once, through the torchrun launcher; a batch that does not split is refused; without a
process group, parallel="data" trains as "none". A harvest shared by 2 processes writes the
cache a one-process harvest writes."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing

from saelib.activations import HarvestConfig, harvest
from saelib.runs.runner import read_status, run_study
from saelib.saes import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saelib.sparse.masks import MaskedLinear
from saelib.studies import STUDIES
from saelib.training import SAESpec, StepInfo, TopKLoss, TrainConfig, distributed, train_saes
from saelib.training import loop as training_loop
from saelib.training.l1 import L1Loss
from saelib.training.ordering import OrderingLoss
from saelib.training.orthogonality import OrthogonalTopKLoss, make_penalty

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

WORLD = 2


def toy_acts() -> torch.Tensor:
    """conftest's ``toy_acts``: (1024, 16) activations with a non-zero mean."""
    return torch.randn(1024, 16, generator=torch.Generator().manual_seed(123)) + 0.5


def topk_sae(d_sae: int = 64, k: int = 4, seed: int = 0) -> TopKSAE:
    return TopKSAE(
        TopKConfig(d_in=16, d_sae=d_sae, k=k), generator=torch.Generator().manual_seed(seed)
    )


def small_config(**changes) -> TrainConfig:
    """Batches of 64 of the 1024 rows: 16 steps per epoch; a latent is dead after 4 silent."""
    fields = {
        "lr": 1e-2, "batch_size": 64, "epochs": 2, "device": "cpu", "dead_after_tokens": 256,
        "log_every": 1, "warmup_steps": 3, "lr_schedule": "linear",
    }  # fmt: skip
    return TrainConfig(**(fields | changes))


@dataclass
class NaNOnProcess1(TopKLoss):
    """TopKLoss whose total turns NaN at step 6 on process 1 alone."""

    def __call__(self, sae, x, output, state):
        terms = super().__call__(sae, x, output, state)
        if state.step == 6 and distributed.rank() == 1:
            terms["total"] = terms["total"] * float("nan")
        return terms


# the other reconstruction and AuxK forms whose batch statistics span the processes
FVU_ERROR_VARIANCE = TopKLoss(reconstruction="fvu", auxk_form="error_variance")


def data_parallel_specs() -> list[SAESpec]:
    relu = ReLUSAE(ReLUConfig(d_in=16, d_sae=64), generator=torch.Generator().manual_seed(2))
    return [  # wide with k=2: latents go dead, so AuxK and the dead-latent counter take part
        SAESpec("auxk", topk_sae(d_sae=128, k=2, seed=0)),  # the stock loss: l2 + AuxK
        SAESpec("fvu", topk_sae(d_sae=128, k=2, seed=1), FVU_ERROR_VARIANCE),
        # its coefficient follows the batch's mean cosine: the global batch's on each process
        SAESpec("l1", relu, L1Loss(l1_coefficient=1e-2, adaptive=True)),
    ]


TOPK_SPECS = ("auxk", "fvu")


def inexact_specs() -> list[SAESpec]:
    """Losses that keep statistics of the rows they see: refused in data parallel."""
    ortho = OrthogonalTopKLoss(make_penalty("static"))
    return [SAESpec("ordering", topk_sae(), OrderingLoss(TopKLoss())),
            SAESpec("ortho", topk_sae(), ortho)]  # fmt: skip


def sae_parallel_specs() -> list[SAESpec]:
    return [
        SAESpec("a", topk_sae(d_sae=128, k=2, seed=0)),  # the stock loss: AuxK on
        SAESpec("b", topk_sae(seed=1), TopKLoss(auxk_alpha=0.0)),
        SAESpec("c", topk_sae(d_sae=32, k=2, seed=2), TopKLoss(reconstruction="fvu")),
    ]


def train(specs, config, checkpoint_dir=None, **kwargs):
    return train_saes(specs, toy_acts(), config, checkpoint_dir, progress=False, **kwargs)


def summary(results) -> dict:
    return {
        result.name: {
            "state": {name: value.clone() for name, value in result.model.state_dict().items()},
            "history": result.history,
            "steps": result.steps,
            "status": result.status,
        }
        for result in results
    }


class Interrupt(Exception):
    pass


def crash_at_step_12(info: StepInfo) -> None:
    if info.step == 12:
        raise Interrupt


def record_saves(saves: list[str]) -> None:
    """Note the name of every checkpoint this process writes."""
    save = training_loop.save_checkpoint

    def recording(target, *args, **kwargs):
        saves.append(Path(target).name)
        save(target, *args, **kwargs)

    training_loop.save_checkpoint = recording


# --- the processes ------------------------------------------------------------------------------


def start_worker(rank: int, job, address: str, port: int, tmp: str) -> None:
    """A torchrun process: its environment, one thread, then ``job(rank, tmp)``."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "MASTER_PORT": port}
    os.environ.update({key: str(value) for key, value in env.items()} | {"MASTER_ADDR": address})
    torch.set_num_threads(1)
    job(rank, Path(tmp))


def spawn(job, tmp_path: Path) -> list[dict]:
    """Run ``job`` in WORLD processes; return what each saved to ``tmp_path/rank<r>.pt``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = (job, "127.0.0.1", port, str(tmp_path))
    multiprocessing.spawn(start_worker, args=args, nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def data_parallel_job(rank: int, tmp: Path) -> None:
    assert distributed.init_from_env()
    saves: list[str] = []
    record_saves(saves)
    config = small_config(parallel="data", checkpoint_every=5)
    full = summary(train(data_parallel_specs(), config, tmp / "full"))
    saves_full = list(saves)
    with pytest.raises(Interrupt):
        train(data_parallel_specs(), config, tmp / "resumed", hooks=[crash_at_step_12])
    resumed = summary(train(data_parallel_specs(), config, tmp / "resumed"))
    saves.clear()
    specs = [SAESpec("nan", topk_sae(), NaNOnProcess1()), *data_parallel_specs()[1:]]
    with pytest.warns(UserWarning, match="diverged at step 6"):
        diverged = summary(train(specs, config, tmp / "diverged"))
    saves_diverged = list(saves)
    refusals = [
        refusal(data_parallel_specs(), small_config(parallel="data", batch_size=63)),
        *(refusal([spec], config, tmp / "refused") for spec in inexact_specs()),
    ]
    masked = MaskedLinear(3, 2)  # RigL grows where its dense gradient (kept aside) is large
    masked.dense_grad = torch.full((2, 3), float(rank + 1))
    distributed.sum_gradients(masked, weight=0.5)
    outcome = {
        "kept_gradient": masked.dense_grad,
        "full": full,
        "resumed": resumed,
        "saves": saves_full,
        "diverged": diverged,
        "saves_diverged": saves_diverged,
        "refusals": refusals,
        "refused_wrote": (tmp / "refused").exists(),
    }
    dist.destroy_process_group()
    torch.save(outcome, tmp / f"rank{rank}.pt")


def refusal(specs, config, checkpoint_dir=None) -> str:
    """The one-line refusal of ``train``, "" when it trained."""
    try:
        train(specs, config, checkpoint_dir)
    except ValueError as error:
        return str(error)
    return ""


def sae_parallel_job(rank: int, tmp: Path) -> None:
    """Through the launcher, as torchrun would start it: a script that leaves parallel at
    "none" trains SAE-parallel."""
    saves: list[str] = []
    record_saves(saves)
    script = tmp / f"train_rank{rank}.py"
    script.write_text(
        "import sys\n"
        "from test_distributed import train_grid\n"
        "train_grid(int(sys.argv[1]), sys.argv[2])\n"
    )
    distributed.main(["--parallel", "sae", str(script), str(rank), str(tmp)])
    assert not dist.is_initialized()  # the launcher closed the process group
    result = torch.load(tmp / f"grid{rank}.pt", weights_only=False)
    torch.save(result | {"saves": saves}, tmp / f"rank{rank}.pt")


def train_grid(rank: int, tmp: str) -> None:
    assert distributed.mode("none") == "sae" and distributed.rank() == rank
    results = train(sae_parallel_specs(), small_config(), Path(tmp) / "grid")
    torch.save({"results": summary(results)}, Path(tmp) / f"grid{rank}.pt")


# the real embedded model over a few wiki documents; small shards, so each process writes several
HARVEST = HarvestConfig(
    model="smollm2-135m", layer=2, dataset="wiki", positions="all", max_tokens=600,
    context_length=48, batch_size=4, shard_size=128,
)  # fmt: skip
COLUMNS = ("acts", "doc_index", "position", "token_id")


def sharded_harvest_job(rank: int, tmp: Path) -> None:
    assert distributed.init_from_env()
    first = harvest(HARVEST, progress=False, cache_dir=tmp / "cache")
    again = harvest(HARVEST, progress=False, cache_dir=tmp / "cache")
    dist.destroy_process_group()
    outcome = {
        "columns": {name: getattr(first, name) for name in COLUMNS},
        "from_cache": (first.from_cache, again.from_cache),
        "shards": [entry["name"] for entry in first.meta["shards"]],
        "n_documents": first.meta["n_documents_read"],
    }
    torch.save(outcome, tmp / f"rank{rank}.pt")


# --- the tests ----------------------------------------------------------------------------------


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def assert_close_states(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_data_parallel_trains_the_weights_of_one_process_and_resumes(tmp_path):
    ranks = spawn(data_parallel_job, tmp_path)
    alone = summary(train(data_parallel_specs(), small_config()))

    for name, reference in alone.items():
        [zero, one] = [outcome["full"][name] for outcome in ranks]
        for key in zero["state"]:  # every process made the identical updates
            assert torch.equal(zero["state"][key], one["state"][key]), f"{name}.{key}"
        difference = max_difference(zero["state"], reference["state"])
        print(f"{name}: max |data parallel - one process| = {difference:.3g}")
        assert_close_states(zero["state"], reference["state"])
        assert zero["steps"] == reference["steps"] == 32
        assert len(zero["history"]) == len(reference["history"]) == 32
        for entry, expected in zip(zero["history"], reference["history"], strict=True):
            assert entry.keys() == expected.keys()
            for key in entry:  # rank 0 logs the global batch's terms
                assert entry[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
        resumed = ranks[0]["resumed"][name]
        for key in zero["state"]:
            assert torch.equal(resumed["state"][key], zero["state"][key]), f"{name}.{key}"
        assert resumed["history"] == zero["history"]

    for name in TOPK_SPECS:  # latents went dead: AuxK (both forms) took part
        dead = [entry["dead_fraction"] for entry in alone[name]["history"]]
        assert max(dead) > 0 and any(entry["auxk"] > 0 for entry in alone[name]["history"])
    coefficients = {entry["l1_coefficient"] for entry in alone["l1"]["history"]}
    assert len(coefficients) > 10  # the adaptive coefficient moved with the batches
    assert ranks[1]["saves"] == []  # process 0 alone writes checkpoints
    assert ranks[0]["saves"] == ["auxk", "fvu", "l1"] * 7  # every 5 steps, and at the end
    for name in alone:
        config = json.loads((tmp_path / "full" / name / "config.json").read_text())
        assert config["trained_steps"] == 32 and config["train_config"]["parallel"] == "data"

    # a NaN on one process stops the model on both, at the same weights; the other trains on
    [zero, one] = [outcome["diverged"] for outcome in ranks]
    assert zero["nan"]["status"] == one["nan"]["status"] == "diverged"
    assert zero["nan"]["steps"] == one["nan"]["steps"] == 5  # the weights whose loss passed
    for key in zero["nan"]["state"]:
        assert torch.equal(zero["nan"]["state"][key], one["nan"]["state"][key]), key
    assert zero["fvu"]["status"] == "complete"
    assert_close_states(zero["fvu"]["state"], alone["fvu"]["state"])
    assert ranks[1]["saves_diverged"] == []
    assert ranks[0]["saves_diverged"] == ["nan", "fvu", "l1", "nan", *["fvu", "l1"] * 6]

    for outcome in ranks:  # summed as gradients are: the global batch's on each process
        assert torch.equal(outcome["kept_gradient"], torch.full((2, 3), 1.5))

    for outcome in ranks:  # refused in one line, before any step or checkpoint
        batch, ordering, ortho = outcome["refusals"]
        assert "batch_size=63" in batch
        assert "'ordering' (OrderingLoss)" in ordering and "parallel='sae'" in ordering
        assert "'ortho' (OrthogonalTopKLoss)" in ortho
        assert all(text and "\n" not in text for text in outcome["refusals"])
        assert not outcome["refused_wrote"]


def test_sae_parallel_trains_each_sae_as_alone_and_writes_each_checkpoint_once(tmp_path):
    ranks = spawn(sae_parallel_job, tmp_path)

    # spec i on process i % 2; each process also returns the others', from their checkpoints
    assert list(ranks[0]["results"]) == list(ranks[1]["results"]) == ["a", "b", "c"]
    assert ranks[0]["saves"] == ["a", "c"] and ranks[1]["saves"] == ["b"]
    for spec in sae_parallel_specs():
        [alone] = summary(train([spec], small_config())).values()
        for outcome in ranks:
            result = outcome["results"].get(spec.name)
            if result is None:
                continue
            for key, value in alone["state"].items():  # bit-identical
                assert torch.equal(result["state"][key], value), f"{spec.name}.{key}"
            assert result["history"] == alone["history"]
            assert result["steps"] == 32 and result["status"] == "complete"


def test_parallel_data_without_a_process_group_trains_as_none():
    assert not distributed.is_distributed() and distributed.mode("data") == "none"
    assert small_config(parallel="data").identity() == small_config().identity()
    data = summary(train(data_parallel_specs(), small_config(parallel="data", batch_size=63)))
    plain = summary(train(data_parallel_specs(), small_config(batch_size=63)))
    assert data.keys() == plain.keys() == {"auxk", "fvu", "l1"}
    for name in data:
        for key, value in plain[name]["state"].items():
            assert torch.equal(data[name]["state"][key], value), f"{name}.{key}"
        assert data[name]["history"] == plain[name]["history"]


@pytest.mark.slow
def test_a_harvest_shared_by_two_processes_equals_a_one_process_harvest(tmp_path):
    ranks = spawn(sharded_harvest_job, tmp_path)
    single = harvest(HARVEST, progress=False, cache_dir=tmp_path / "single")
    assert len(single) == HARVEST.max_tokens
    for outcome in ranks:
        for name in ("doc_index", "position", "token_id"):
            assert torch.equal(outcome["columns"][name], getattr(single, name)), name
        torch.testing.assert_close(outcome["columns"]["acts"], single.acts)
        assert outcome["from_cache"] == (False, True)  # harvested once, then read back
        assert outcome["n_documents"] == single.meta["n_documents_read"]
    shards = ranks[0]["shards"]
    assert shards == ranks[1]["shards"]
    assert {name.split("_")[1] for name in shards} == {"rank000", "rank001"}  # both forwarded
    assert not list((tmp_path / "cache").glob("*.partial-*"))


def study_rows(run_dir: Path) -> list[dict]:
    """A run's per-seed results, less their timings."""
    rows = json.loads((run_dir / "results.json").read_text())["per_seed"]
    return [{key: value for key, value in row.items() if "seconds" not in key} for row in rows]


def verdicts(run_dir: Path) -> list[bool]:
    claims = json.loads((run_dir / "results.json").read_text())["claims"]
    return [claim["holds"] for claim in claims]


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "tolerance"), [("sae", 1e-5), ("data", 1e-4)])
def test_a_study_notebook_on_two_processes_gives_the_one_process_results(
    smoke_run, tmp_path, parallel, tolerance
):
    """``python -m saelib run --processes 2``: the unchanged notebook under torchrun. SAE mode
    differs from one process only by the thread count's rounding; data mode by the gradient
    sum's."""
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("saelib-topk_grid-process*"))
    smoke = STUDIES["topk_grid"].smoke_params
    run_dir = run_study("topk_grid", smoke, outputs=tmp_path, progress=False, processes=2,
                        parallel=parallel)  # fmt: skip

    assert read_status(run_dir)["status"] == "complete"
    assert (run_dir / "topk_grid.html").is_file() and (run_dir / "topk_grid.report.html").is_file()
    names = sorted(path.name for path in (smoke_run / "checkpoints").iterdir())
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == names
    worst = 0.0
    for row, expected in zip(study_rows(run_dir), study_rows(smoke_run), strict=True):
        assert row.keys() == expected.keys() and row["status"] == expected["status"]
        for key, value in expected.items():
            if isinstance(value, float):
                worst = max(worst, abs(row[key] - value) / max(abs(value), 1.0))
    print(f"{parallel}: max difference from one process {worst:.2g} (relative above 1)")
    assert worst <= tolerance
    assert verdicts(run_dir) == verdicts(smoke_run)
    assert list(tmp_path.iterdir()) == [tmp_path / "topk_grid"]  # one run folder, no other
    assert set(scratch.glob("saelib-topk_grid-process*")) == before  # process 1's folder is gone
