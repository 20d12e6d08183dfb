"""train_saes trains any model: a tiny next-byte language model on real text learns, checkpoints
as model.safetensors, resumes exactly, and stops alone on a NaN loss; the AuxK loss refuses a
model without an AuxK encoder before training starts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn import functional as F

from saelib.data import load_documents
from saelib.saes import SAEOutput
from saelib.training import (
    CheckpointMismatchError,
    StepInfo,
    TopKLoss,
    TrainConfig,
    TrainSpec,
    TrainState,
    for_models,
    train_saes,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

CONTEXT = 8


@pytest.fixture(scope="module")
def windows() -> Tensor:
    """(n, CONTEXT + 1) byte values of real text, as float32 rows: CONTEXT bytes, then the next."""
    text = " ".join(document.text for document in load_documents("wiki", limit=3))
    data = torch.tensor(list(text.encode("utf-8")[:640]), dtype=torch.float32)
    return data.unfold(0, CONTEXT + 1, 1).contiguous()


class ByteLM(nn.Module):
    """Embed CONTEXT bytes, predict the next one with one linear layer."""

    def __init__(self, width: int = 16, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(256, width)
        self.head = nn.Linear(CONTEXT * width, 256)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(256, width, generator=generator))
            scale = (CONTEXT * width) ** -0.5
            self.head.weight.copy_(torch.randn(256, CONTEXT * width, generator=generator) * scale)
            self.head.bias.zero_()

    def forward(self, rows: Tensor) -> Tensor:
        return self.head(self.embed(rows[:, :CONTEXT].long()).flatten(1))  # (batch, 256) logits


@dataclass
class NextByteLoss:
    """Cross-entropy of the next byte; NaN at step ``nan_at`` when set."""

    nan_at: int | None = None

    def __call__(self, model: nn.Module, rows: Tensor, logits: Tensor, state: TrainState):
        assert state.dead is None  # logits do not say which latents fired
        total = F.cross_entropy(logits.float(), rows[:, CONTEXT].long())
        if state.step == self.nan_at:
            total = total * float("nan")
        return {"total": total}


def config(**changes) -> TrainConfig:
    """632 windows, batches of 64: 10 steps per epoch."""
    fields = {"lr": 1e-2, "batch_size": 64, "epochs": 4, "device": "cpu", "log_every": 1}
    return TrainConfig(**(fields | changes))


def train(specs, windows, train_config, folder=None, **kwargs):
    return train_saes(specs, windows, train_config, folder, progress=False, **kwargs)


def lm_spec(loss=None, width: int = 16) -> TrainSpec:
    labels = {"run": "byte-lm", "seed": 0}
    return TrainSpec("lm", ByteLM(width), loss or NextByteLoss(), {"text": "wiki"}, labels)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), f"{name} differs"


def test_a_byte_language_model_learns_and_checkpoints(windows, tmp_path):
    [result] = train([lm_spec()], windows, config(checkpoint_every=7), tmp_path)
    assert (result.status, result.steps) == ("complete", 40)
    losses = [entry["total"] for entry in result.history]
    assert losses[0] == pytest.approx(math.log(256), rel=0.3)  # about uniform at the start
    assert losses[-1] < 0.6 * losses[0]
    assert "dead_fraction" not in result.history[-1]
    assert result.labels == {"run": "byte-lm", "seed": 0}
    assert isinstance(result.optimizer, torch.optim.Adam)

    folder = tmp_path / "lm"
    assert sorted(path.name for path in folder.iterdir()) == [
        "config.json", "history.json", "model.safetensors", "trainer_state.pt",
    ]  # fmt: skip
    stored = json.loads((folder / "config.json").read_text())
    assert stored["model_class"].endswith("ByteLM")
    assert (stored["trained_steps"], stored["train_status"]) == (40, "complete")
    assert stored["labels"] == {"run": "byte-lm", "seed": 0} and stored["text"] == "wiki"
    reloaded = ByteLM(seed=5)
    reloaded.load_state_dict(load_file(folder / "model.safetensors"))
    assert_same_state(reloaded, result.model)


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted(windows, tmp_path):
    train_config = config(checkpoint_every=7, warmup_steps=3, lr_schedule="cosine")
    [reference] = train([lm_spec()], windows, train_config, tmp_path / "a")

    def crash_at_step_17(info: StepInfo) -> None:
        if info.step == 17:
            raise Interrupt

    with pytest.raises(Interrupt):
        train([lm_spec()], windows, train_config, tmp_path / "b", hooks=[crash_at_step_17])
    stored = json.loads((tmp_path / "b" / "lm" / "config.json").read_text())
    assert stored["trained_steps"] == 14

    [resumed] = train([lm_spec()], windows, train_config, tmp_path / "b")
    assert resumed.steps == reference.steps == 40
    assert resumed.history == reference.history
    assert_same_state(resumed.model, reference.model)
    for moments in ("exp_avg", "exp_avg_sq"):
        for parameter, other in zip(
            resumed.model.parameters(), reference.model.parameters(), strict=True
        ):
            assert torch.equal(
                resumed.optimizer.state[parameter][moments],
                reference.optimizer.state[other][moments],
            )

    wider = lm_spec(width=32)  # another model: its checkpoint is refused
    with pytest.raises(CheckpointMismatchError, match="shapes"):
        train([wider], windows, train_config, tmp_path / "b")


@dataclass
class CountingHook:
    """Counts, per model, the steps it has seen: state that a resume must restore."""

    seen: dict = field(default_factory=dict)

    def __call__(self, info: StepInfo) -> None:
        for result in info.results:
            self.seen[result.name] = self.seen.get(result.name, 0) + 1

    def hook_state(self, name: str) -> dict:
        return {"seen": self.seen.get(name, 0)}

    def load_hook_state(self, name: str, state: dict) -> None:
        self.seen[name] = state["seen"]


def test_a_hooks_per_model_state_is_checkpointed_and_restored(windows, tmp_path):
    train_config = config(checkpoint_every=7)
    with pytest.raises(Interrupt):
        hooks = [CountingHook(), for_models(["lm"], CountingHook()), crash_at(17)]
        train([lm_spec()], windows, train_config, tmp_path, hooks=hooks)
    fresh, restricted = CountingHook(), for_models(["lm"], CountingHook())
    train([lm_spec()], windows, train_config, tmp_path, hooks=[fresh, restricted])
    # 14 steps restored from the checkpoint, then steps 14..39 seen live
    assert fresh.seen == restricted.hook.seen == {"lm": 40}


def crash_at(step: int):
    def crash(info: StepInfo) -> None:
        if info.step == step:
            raise Interrupt

    return crash


def test_a_nan_loss_stops_the_model_as_diverged(windows, tmp_path):
    with pytest.warns(UserWarning, match="'lm' diverged at step 12"):
        [broken] = train([lm_spec(NextByteLoss(nan_at=12))], windows, config(), tmp_path)
    assert (broken.status, broken.steps) == ("diverged", 11)
    assert "not finite" in broken.message
    [eleven] = train([lm_spec()], windows, config(max_tokens=11 * 64))
    assert_same_state(broken.model, eleven.model)  # back at the last weights whose loss passed
    stored = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert (stored["trained_steps"], stored["train_status"]) == (11, "diverged")


class ReLUCode(nn.Module):
    """A dense ReLU code: its output says which latents fired, but it has no AuxK encoder."""

    def __init__(self, d_in: int = 16, d_sae: int = 32, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.d_in = d_in
        self.encoder = nn.Parameter(torch.randn(d_sae, d_in, generator=generator) * 0.3)
        self.decoder = nn.Parameter(torch.randn(d_sae, d_in, generator=generator) * 0.3)
        self.bias = nn.Parameter(torch.full((d_sae,), -0.5))

    def forward(self, x: Tensor) -> SAEOutput:
        codes = torch.relu(x @ self.encoder.T + self.bias)
        return SAEOutput.from_dense(codes @ self.decoder, codes)


def test_auxk_refuses_a_model_without_an_auxk_encoder_before_training(toy_acts, tmp_path):
    spec = TrainSpec("relu", ReLUCode(), TopKLoss())
    with pytest.raises(TypeError, match=r"'relu'.*ReLUCode lacks b_dec, encode_aux, decode"):
        train([spec], toy_acts, config(), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was trained or written

    # without AuxK it trains, and its dead latents are tracked from output.fired()
    spec = TrainSpec("relu", ReLUCode(), TopKLoss(auxk_alpha=0.0))
    [result] = train([spec], toy_acts, config(epochs=2, dead_after_tokens=256), tmp_path)
    assert result.status == "complete"
    assert all("dead_fraction" in entry for entry in result.history)
    assert (tmp_path / "relu" / "model.safetensors").exists()
