"""train_saes: ground-truth recovery, one pass for many SAEs, determinism, resume and what a
checkpoint must match, per-SAE divergence."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch.nn import functional as F

from saelib.activations import HarvestConfig, ShardedSource, write_cache
from saelib.saes import TopKConfig, TopKSAE, load_sae
from saelib.training import (
    CheckpointMismatchError,
    SAESpec,
    StepInfo,
    TrainConfig,
    for_models,
    train_saes,
)
from saelib.training.loop import _lr_lambda
from saelib.training.losses import TopKLoss
from saelib.training.orthogonality import OrthogonalTopKLoss, make_penalty

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def small_config(**changes) -> TrainConfig:
    """A short CPU run on ``toy_acts`` (1024 rows): 16 steps per epoch; dead after 4 silent."""
    fields = {
        "lr": 1e-2, "batch_size": 64, "epochs": 2, "device": "cpu",
        "dead_after_tokens": 256, "log_every": 1,
    }  # fmt: skip
    return TrainConfig(**(fields | changes))


def train(specs, acts, config, checkpoint_dir=None, **kwargs):
    return train_saes(specs, acts, config, checkpoint_dir, progress=False, **kwargs)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), f"{name} differs"


def test_recovers_ground_truth_directions():
    """Toy model of superposition: 256 unit directions in 64 dims, 4 active per sample."""
    generator = torch.Generator().manual_seed(0)
    n, d, n_features, active = 20_000, 64, 256, 4
    directions = F.normalize(torch.randn(n_features, d, generator=generator), dim=1)
    chosen = torch.rand(n, n_features, generator=generator).argsort(dim=1)[:, :active]
    coefficients = 0.5 + torch.rand(n, active, generator=generator)
    acts = torch.zeros(n, n_features).scatter_(1, chosen, coefficients) @ directions

    config = TopKConfig(d_in=d, d_sae=n_features, k=active, use_decoder_bias=False)
    sae = TopKSAE(config, generator=torch.Generator().manual_seed(1))
    train_config = TrainConfig(
        lr=3e-3, batch_size=256, epochs=10, device="cpu", log_every=100,
        dead_after_tokens=5_000,  # AuxK revives stuck latents: ~0.99 instead of ~0.95
    )  # fmt: skip
    [result] = train([SAESpec("toy", sae)], acts, train_config)

    cosine = directions @ F.normalize(sae.W_dec.detach(), dim=1).T
    assert cosine.max(dim=1).values.mean() >= 0.9
    assert result.history[-1]["mse"] < 0.5 * result.history[0]["mse"]


def test_many_saes_in_one_pass_match_training_each_alone(make_sae, toy_acts):
    def specs():
        return [
            SAESpec("a", make_sae(k=4, seed=0)),
            SAESpec("b", make_sae(d_sae=128, k=2, use_decoder_bias=False, seed=1)),
            SAESpec("c", make_sae(d_sae=32, k=2, seed=2), TopKLoss(auxk_alpha=0.0)),
        ]

    config = small_config(warmup_steps=3, lr_schedule="cosine")
    together = train(specs(), toy_acts, config)
    for index, spec in enumerate(specs()):
        [alone] = train([spec], toy_acts, config)
        assert alone.steps == together[index].steps == 32
        assert alone.history == together[index].history
        assert_same_weights(alone.sae, together[index].sae)


def test_same_seeds_give_bitwise_identical_weights(make_sae, toy_acts):
    first = train([SAESpec("a", make_sae())], toy_acts, small_config())[0].sae
    second = train([SAESpec("a", make_sae())], toy_acts, small_config())[0].sae
    assert_same_weights(first, second)

    other_order = train([SAESpec("a", make_sae())], toy_acts, small_config(seed=1))[0].sae
    assert not torch.equal(first.W_dec, other_order.W_dec)


class Interrupt(Exception):
    pass


def crash_at_step_12(info: StepInfo) -> None:
    if info.step == 12:
        raise Interrupt


def test_resume_after_interruption_matches_uninterrupted_run(make_sae, toy_acts, tmp_path):
    def sae():  # wide with k=2: some latents go dead, so the AuxK state must be restored too
        return make_sae(d_sae=128, k=2)

    config = small_config(checkpoint_every=5, warmup_steps=4, lr_schedule="linear")
    [reference] = train([SAESpec("sae", sae())], toy_acts, config, tmp_path / "a")
    assert any(entry["dead_fraction"] > 0 for entry in reference.history[10:])

    folder = tmp_path / "b"
    with pytest.raises(Interrupt):
        train([SAESpec("sae", sae())], toy_acts, config, folder, hooks=[crash_at_step_12])
    assert json.loads((folder / "sae" / "config.json").read_text())["trained_steps"] == 10

    [resumed] = train([SAESpec("sae", sae())], toy_acts, config, folder, resume=True)
    assert resumed.steps == reference.steps == 32
    assert_same_weights(resumed.sae, reference.sae)
    assert resumed.history == reference.history
    assert sorted(path.name for path in folder.iterdir()) == ["sae"]  # no .tmp or .old left
    assert_same_weights(load_sae(resumed.checkpoint), reference.sae)


@dataclass
class NaNAtStep:
    """TopKLoss whose total turns NaN at one training step."""

    step: int
    inner: TopKLoss = field(default_factory=TopKLoss)

    def __call__(self, sae, x, output, state):
        terms = self.inner(sae, x, output, state)
        if state.step == self.step:
            terms["total"] = terms["total"] * float("nan")
        return terms


def test_a_nan_sae_stops_alone_and_keeps_its_last_good_weights(make_sae, toy_acts, tmp_path):
    specs = [SAESpec("nan-sae", make_sae(), NaNAtStep(step=12)), SAESpec("fine", make_sae())]
    with pytest.warns(UserWarning, match="'nan-sae' diverged at step 12"):
        broken, fine = train(specs, toy_acts, small_config(checkpoint_every=5), tmp_path)
    # back at the weights before the update that led to the bad loss: those after 11 updates
    assert (broken.status, broken.steps) == ("diverged", 11)
    assert "not finite" in broken.message and str(tmp_path / "nan-sae") in broken.message
    assert (fine.status, fine.steps) == ("complete", 32)  # the other SAE finished
    [eleven] = train([SAESpec("eleven", make_sae())], toy_acts, small_config(max_tokens=11 * 64))
    assert eleven.steps == 11
    assert_same_weights(broken.sae, eleven.sae)
    stored = json.loads((tmp_path / "nan-sae" / "config.json").read_text())
    assert (stored["trained_steps"], stored["train_status"]) == (11, "diverged")
    assert_same_weights(load_sae(tmp_path / "nan-sae"), broken.sae)
    # a resume leaves it diverged and trains nothing more
    again = SAESpec("nan-sae", make_sae(), NaNAtStep(step=12))
    [resumed] = train([again], toy_acts, small_config(checkpoint_every=5), tmp_path)
    assert (resumed.status, resumed.steps) == ("diverged", 11)
    assert_same_weights(resumed.sae, broken.sae)


def test_divergence_is_kept_in_memory_without_a_checkpoint_dir(make_sae, toy_acts):
    with pytest.warns(UserWarning, match="diverged"):
        [result] = train([SAESpec("a", make_sae(), NaNAtStep(step=3))], toy_acts, small_config())
    assert (result.status, result.steps, result.checkpoint) == ("diverged", 2, None)
    assert "last good weights in" not in result.message


def test_finite_blow_up_counts_as_divergence(make_sae, toy_acts):
    config = small_config(lr=100.0)  # finite garbage: the loss grows ~1e9-fold, never inf
    with pytest.warns(UserWarning, match="over 100 times its first value"):
        [result] = train([SAESpec("wild", make_sae())], toy_acts, config)
    # the first update already blew it up: it is back at its initial weights
    assert (result.status, result.steps) == ("diverged", 0)
    assert torch.equal(result.sae.W_dec, make_sae().W_dec)
    assert all(math.isfinite(entry["recon"]) for entry in result.history)
    calm = train([SAESpec("calm", make_sae())], toy_acts, small_config())[0]
    assert calm.status == "complete"


def test_resume_refuses_a_checkpoint_trained_on_something_else(make_sae, toy_acts, tmp_path):
    config = small_config(epochs=0.5)
    train([SAESpec("sae", make_sae())], toy_acts, config, tmp_path)
    changes = {
        "other data": dict(acts=toy_acts.flip(0)),
        "lr": dict(config=small_config(epochs=0.5, lr=0.5)),
        "other SAE": dict(spec=SAESpec("sae", make_sae(k=2))),
        "other loss": dict(spec=SAESpec("sae", make_sae(), TopKLoss(reconstruction="fvu"))),
    }
    for what, change in changes.items():
        spec = change.get("spec", SAESpec("sae", make_sae()))
        arguments = (change.get("acts", toy_acts), change.get("config", config), tmp_path)
        with pytest.raises(CheckpointMismatchError, match=r"checkpoint .*sae was trained on"):
            train([spec], *arguments)
            pytest.fail(f"{what}: resumed from a checkpoint trained on something else")
    # the same setup resumes (nothing left to do); logging settings may differ
    relogged = small_config(epochs=0.5, log_every=3)
    [again] = train([SAESpec("sae", make_sae())], toy_acts, relogged, tmp_path)
    assert (again.status, again.steps) == ("complete", 8)


def test_stale_swap_leftovers_neither_break_saves_nor_survive(make_sae, toy_acts, tmp_path):
    (tmp_path / ".sae.0123456789ab.old").mkdir(parents=True)  # as a crash mid-swap leaves them
    (tmp_path / ".sae.ba9876543210.tmp").mkdir()
    [result] = train(
        [SAESpec("sae", make_sae())], toy_acts, small_config(checkpoint_every=5), tmp_path
    )
    assert result.status == "complete"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sae"]


def test_a_checkpoint_swapped_out_by_a_crash_is_restored(make_sae, toy_acts, tmp_path):
    config = small_config(epochs=0.5)
    [first] = train([SAESpec("sae", make_sae())], toy_acts, config, tmp_path)
    (tmp_path / "sae").rename(tmp_path / ".sae.00000000beef.old")  # crash between the renames
    [resumed] = train([SAESpec("sae", make_sae())], toy_acts, config, tmp_path)
    assert resumed.steps == first.steps and resumed.seconds == first.seconds
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sae"]


def test_resume_restores_the_orthogonality_ema(make_sae, toy_acts, tmp_path):
    def spec():
        loss = OrthogonalTopKLoss(make_penalty("run5"), TopKLoss(auxk_alpha=0.0))
        return SAESpec("ortho", make_sae(d_sae=64, k=8), loss)

    config = small_config(checkpoint_every=5)
    [reference] = train([spec()], toy_acts, config, tmp_path / "a")

    with pytest.raises(Interrupt):
        train([spec()], toy_acts, config, tmp_path / "b", hooks=[crash_at_step_12])
    [resumed] = train([spec()], toy_acts, config, tmp_path / "b")
    assert any(entry["ortho"] > 0 for entry in reference.history)
    assert resumed.history == reference.history
    assert_same_weights(resumed.sae, reference.sae)


def test_spec_errors(make_sae, toy_acts):
    config = small_config()
    with pytest.raises(ValueError, match="d_in=8"):
        train([SAESpec("narrow", make_sae(d_in=8))], toy_acts, config)
    with pytest.raises(ValueError, match="unique"):
        train([SAESpec("x", make_sae()), SAESpec("x", make_sae(seed=1))], toy_acts, config)
    with pytest.raises(ValueError, match="at least one"):
        train([], toy_acts, config)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        train([SAESpec("x", make_sae())], toy_acts[0], config)


def test_total_steps():
    assert TrainConfig(batch_size=64, epochs=2).total_steps(1000) == 32  # 16 batches per epoch
    assert TrainConfig(batch_size=64, epochs=0.5).total_steps(1000) == 8
    assert TrainConfig(batch_size=64, max_tokens=650).total_steps(10) == 11


def test_lr_schedule_shapes():
    total = 20
    warmup = _lr_lambda(TrainConfig(warmup_steps=4), total)
    assert [warmup(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup(total - 1) == 1.0

    linear = _lr_lambda(TrainConfig(lr_schedule="linear", decay_start=0.5), total)
    assert [linear(step) for step in (0, 10, 15, 19)] == pytest.approx([1.0, 1.0, 0.5, 0.1])

    cosine = _lr_lambda(TrainConfig(lr_schedule="cosine", decay_start=0.5), total)
    factors = [cosine(step) for step in range(total)]
    assert factors[:11] == [1.0] * 11
    assert factors[15] == pytest.approx(0.5)
    assert factors[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(later < earlier for earlier, later in zip(factors[10:], factors[11:], strict=False))


def test_history_logs_the_rate_each_step_used(make_sae, toy_acts):
    config = small_config(lr=0.01, warmup_steps=4, lr_schedule="linear", decay_start=0.5)
    [result] = train([SAESpec("a", make_sae())], toy_acts, config)
    factor = _lr_lambda(config, 32)
    assert [entry["step"] for entry in result.history] == list(range(32))
    for entry in result.history:
        assert entry["lr"] == pytest.approx(0.01 * factor(entry["step"]))
    assert result.history[-1]["lr"] > 0  # the last step still updates the weights


@dataclass
class ResampleLatents:
    """At step ``at``: point some latents' encoder rows along their decoder directions again and
    reset their Adam moments (as a resampling of dead latents would); one step later, check that
    the update started from those weights and zero moments."""

    at: int
    n_latents: int = 8  # latents 0..n_latents-1
    checked: list = field(default_factory=list)
    _after_reset: torch.Tensor | None = None

    @property
    def latents(self) -> slice:
        return slice(self.n_latents)

    def __call__(self, info: StepInfo) -> None:
        [result] = info.results
        sae, optimizer = result.model, result.optimizer
        state = optimizer.state[sae.W_enc]
        if info.step == self.at:
            with torch.no_grad():
                sae.W_enc[self.latents] = sae.W_dec[self.latents]
            for parameter in (sae.W_enc, sae.b_enc):
                optimizer.state[parameter]["exp_avg"][self.latents] = 0.0
                optimizer.state[parameter]["exp_avg_sq"][self.latents] = 0.0
            self._after_reset = sae.W_enc[self.latents].detach().clone()
        elif info.step == self.at + 1 and self._after_reset is not None:
            # Adam from zero moments: m = (1 - b1) g, v = (1 - b2) g^2, then bias-corrected
            (beta1, beta2), lr = optimizer.defaults["betas"], optimizer.param_groups[0]["lr"]
            grad, t = sae.W_enc.grad[self.latents], float(state["step"])
            assert grad.abs().sum() > 0  # some of them took part in this step
            m_hat = (1 - beta1) * grad / (1 - beta1**t)
            v_hat = (1 - beta2) * grad.pow(2) / (1 - beta2**t)
            expected = self._after_reset - lr * m_hat / (v_hat.sqrt() + 1e-8)
            torch.testing.assert_close(state["exp_avg"][self.latents], (1 - beta1) * grad)
            torch.testing.assert_close(sae.W_enc[self.latents].detach(), expected)
            others = slice(self.n_latents, None)  # not reset: their moments remember more
            moved = sae.W_enc.grad[others].abs().sum(dim=1) > 0
            kept = state["exp_avg"][others][moved] - (1 - beta1) * sae.W_enc.grad[others][moved]
            assert kept.abs().max() > 1e-6
            self.checked.append(info.step)


def test_a_hook_can_change_weights_and_optimizer_state(make_sae, toy_acts, tmp_path):
    config = small_config(checkpoint_every=5)
    hook = ResampleLatents(at=9)  # the step just before the checkpoint at 10 steps
    [reference] = train(
        [SAESpec("sae", make_sae())], toy_acts, config, tmp_path / "a", hooks=[hook]
    )
    assert hook.checked == [10]  # the next step started from the hook's weights and moments
    [untouched] = train([SAESpec("sae", make_sae())], toy_acts, config)
    assert not torch.equal(untouched.sae.W_enc, reference.sae.W_enc)

    # the checkpoint at 10 steps holds the change: a run interrupted after it resumes exactly
    folder = tmp_path / "b"
    with pytest.raises(Interrupt):
        train([SAESpec("sae", make_sae())], toy_acts, config, folder,
              hooks=[ResampleLatents(at=9), crash_at_step_12])  # fmt: skip
    [resumed] = train([SAESpec("sae", make_sae())], toy_acts, config, folder)
    assert resumed.history == reference.history
    assert_same_weights(resumed.sae, reference.sae)
    for name in ("exp_avg", "exp_avg_sq"):
        for mine, theirs in zip(resumed.sae.parameters(), reference.sae.parameters(), strict=True):
            assert torch.equal(
                resumed.optimizer.state[mine][name], reference.optimizer.state[theirs][name]
            )


def test_specs_labels_and_what_hooks_see(make_sae, toy_acts, tmp_path):
    sae = make_sae()
    labels = {"k": 4, "latent_dim": 64, "seed": 0}
    spec = SAESpec("sae", sae=sae, labels=labels)
    assert spec.model is spec.sae is sae and spec.loss == TopKLoss()
    assert SAESpec("sae", model=sae, labels=labels) == spec == SAESpec("sae", sae, None, {}, labels)
    with pytest.raises(TypeError, match="once"):
        SAESpec("sae")

    seen: list[StepInfo] = []
    [result] = train([spec], toy_acts, small_config(epochs=0.5), tmp_path, hooks=[seen.append])
    assert [info.step for info in seen] == list(range(8))
    assert [info.progress for info in seen] == [(step + 1) / 8 for step in range(8)]
    assert [info.results[0].status for info in seen] == ["training"] * 7 + ["complete"]
    assert result.model is result.sae is sae and result.labels == labels
    assert isinstance(result.optimizer, torch.optim.Adam)
    assert result.optimizer.state[sae.W_enc]["exp_avg"].abs().sum() > 0
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["labels"] == labels
    assert load_sae(tmp_path / "sae").metadata["labels"] == labels


def test_a_hook_sees_the_loss_and_the_dead_latent_counter(make_sae, toy_acts):
    """A hook that marks every latent silent for long makes the next step see them all dead,
    and reaches the loss object whose state it would have to permute with the latents."""

    def silence_all(info: StepInfo) -> None:
        [result] = info.results
        assert result.loss is spec.loss and result.tokens_since_fired.shape == (64,)
        if info.step == 0:
            result.tokens_since_fired.fill_(10**9)  # in place: the loop keeps it

    config = small_config(epochs=0.25, log_every=1, dead_after_tokens=10**6)
    spec = SAESpec("sae", make_sae())
    [result] = train([spec], toy_acts, config, hooks=[silence_all])
    assert result.history[0]["dead_fraction"] == 0.0
    assert result.history[1]["dead_fraction"] == 1.0  # the step after the hook


def test_training_from_a_streamed_cache_resumes_exactly(make_sae, toy_acts, tmp_path):
    rows = torch.arange(len(toy_acts))
    columns = {"acts": toy_acts, "doc_index": rows // 8, "position": rows % 8, "token_id": rows}
    write_cache(tmp_path / "cache", [columns], HarvestConfig(max_tokens=1024, shard_size=200))

    def source() -> ShardedSource:
        return ShardedSource(tmp_path / "cache", shards_in_memory=2)

    config = small_config(checkpoint_every=5)
    [reference] = train([SAESpec("sae", make_sae())], source(), config, tmp_path / "a")
    assert reference.steps == 32
    with pytest.raises(Interrupt):
        train([SAESpec("sae", make_sae())], source(), config, tmp_path / "b",
              hooks=[crash_at_step_12])  # fmt: skip
    [resumed] = train([SAESpec("sae", make_sae())], source(), config, tmp_path / "b")
    assert resumed.history == reference.history
    assert_same_weights(resumed.sae, reference.sae)


def test_a_hook_for_some_models_sees_only_them(make_sae, toy_acts):
    seen: list[list[str]] = []
    hook = for_models(["b"], lambda info: seen.append([r.name for r in info.results]))
    specs = [SAESpec("a", make_sae()), SAESpec("b", make_sae(seed=1))]
    train(specs, toy_acts, small_config(epochs=0.125), hooks=[hook])
    assert seen == [["b"], ["b"]]
