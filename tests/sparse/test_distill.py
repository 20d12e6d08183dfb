"""Self-distillation from an EMA teacher: the alpha schedule, the EMA of masked weights, the KL
term, and a resumed run that ends bit-for-bit where an uninterrupted one does."""

from __future__ import annotations

import io
import math

import pytest
import torch

from saelib.sparse import (
    LMConfig,
    NextTokenLoss,
    TextConfig,
    TransformerLM,
    load_text,
    mask_linears,
    masked_layers,
    random_masks,
)
from saelib.sparse.distill import DistillationLoss, EMATeacherUpdate
from saelib.training import StepInfo, TrainConfig, TrainResult, TrainSpec, TrainState, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LMConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, d_mlp=64, context=16)


def masked_lm(seed: int = 0, density: float | None = 0.5) -> TransformerLM:
    model = mask_linears(TransformerLM(TINY, seed=seed))
    if density is not None:
        random_masks(model, density, seed=seed)
    return model


def token_rows(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 257, (n, TINY.context + 1), generator=torch.Generator().manual_seed(seed)
    )


def call(loss: DistillationLoss, model, rows, step: int = 0, total: int = 100):
    return loss(model, rows, model(loss.model_input(rows)), TrainState(step, total))


@torch.no_grad()
def perturb(model, seed: int = 1, scale: float = 0.05) -> None:
    """Move every weight, masked ones too (so an update that forgot the mask would show)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def test_alpha_is_zero_in_warmup_then_cosine_from_start_to_end():
    loss = DistillationLoss(warmup_steps=10, alpha_start=0.5, alpha_end=0.1, anneal_fraction=0.7)
    total = 100
    alphas = [loss.alpha(step, total) for step in range(total)]
    assert alphas[:10] == [0.0] * 10
    assert alphas[10] == pytest.approx(0.5)
    assert alphas[69] > 0.1
    assert alphas[70:] == [0.1] * 30
    assert all(a >= b for a, b in zip(alphas[10:], alphas[11:], strict=False))  # monotone
    assert alphas[40] == pytest.approx(0.3)  # halfway from step 10 to step 70: cos(pi/2) = 0
    hand = 0.1 + (0.5 - 0.1) * 0.5 * (1 + math.cos(math.pi * (25 - 10) / (70 - 10)))
    assert alphas[25] == pytest.approx(hand, rel=1e-12)


def test_warmup_fraction_overrides_steps_and_a_short_anneal_goes_straight_to_the_end():
    loss = DistillationLoss(warmup_steps=500, warmup_fraction=0.1)
    assert loss.warmup_length(200) == 20
    assert loss.alpha(19, 200) == 0.0 and loss.alpha(20, 200) == pytest.approx(0.5)
    late = DistillationLoss(warmup_steps=80, anneal_fraction=0.5)
    assert late.alpha(79, 100) == 0.0 and late.alpha(80, 100) == 0.1
    for bad in ({"beta": 1.5}, {"warmup_fraction": 2.0}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            DistillationLoss(**bad)


def test_the_teacher_starts_as_the_masked_student_with_dense_masks():
    model, loss = masked_lm(), DistillationLoss(warmup_steps=0)
    assert loss.teacher is None and loss.state_dict() == {"teacher": None}
    call(loss, model, token_rows())
    teacher = loss.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, layer in masked_layers(teacher).items():
        student = masked_layers(model)[name]
        assert bool(layer.mask.all()) and not bool(student.mask.all())
        assert torch.equal(layer.weight, student.weight * student.mask)


def test_the_ema_update_matches_a_hand_computation_on_masked_weights():
    model, loss = masked_lm(), DistillationLoss(beta=0.9, warmup_steps=0)
    call(loss, model, token_rows())
    perturb(model)  # the student's masked weights are no longer zero: the update must mask them
    old = {name: p.clone() for name, p in loss.teacher.named_parameters()}
    loss.update_teacher(model)
    layers = masked_layers(model)
    for name, parameter in model.named_parameters():
        layer = layers.get(name.removesuffix(".weight"))
        student = parameter * layer.mask if layer is not None else parameter
        expected = 0.9 * old[name] + (1 - 0.9) * student
        teacher = dict(loss.teacher.named_parameters())[name]
        torch.testing.assert_close(teacher, expected, rtol=1e-6, atol=1e-8)
    for name, layer in masked_layers(loss.teacher).items():
        assert bool(layer.mask.all())
        assert not bool(layer.weight[~layers[name].mask].any())  # still the EMA of zeros there


@pytest.mark.parametrize("density", [None, 0.4])
def test_kl_is_zero_when_the_teacher_is_the_student_and_its_gradient_reaches_the_student_only(
    density,
):
    model, loss = masked_lm(density=density), DistillationLoss(warmup_steps=0)
    rows = token_rows()
    terms = call(loss, model, rows)
    assert float(terms["alpha"]) == 0.5
    assert abs(float(terms["kl"].detach())) < 1e-6
    torch.testing.assert_close(terms["total"], terms["ce"], rtol=0, atol=1e-6)
    perturb(model, scale=0.02)
    model.after_optimizer_step()  # masked weights back to zero, as after a real update
    terms = call(loss, model, rows)
    assert float(terms["kl"].detach()) > 1e-6
    terms["kl"].backward()
    assert any(p.grad is not None and bool(p.grad.any()) for p in model.parameters())
    assert all(p.grad is None for p in loss.teacher.parameters())


def test_in_warmup_the_loss_is_the_next_token_loss_exactly():
    model, loss = masked_lm(), DistillationLoss(warmup_steps=5)
    rows = token_rows()
    logits = model(loss.model_input(rows))
    state = TrainState(2, 100)
    terms = loss(model, rows, logits, state)
    assert torch.equal(terms["total"], NextTokenLoss()(model, rows, logits, state)["total"])
    assert float(terms["kl"]) == 0.0 and float(terms["alpha"]) == 0.0
    assert loss.teacher is not None  # made anyway: the EMA runs through warm-up


def test_the_teacher_state_survives_torch_load_weights_only_into_a_fresh_loss():
    model, loss = masked_lm(), DistillationLoss(beta=0.5, warmup_steps=0)
    call(loss, model, token_rows())
    perturb(model)
    loss.update_teacher(model)
    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    fresh = DistillationLoss(beta=0.5, warmup_steps=0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.teacher is None  # pending until a student to copy from is seen
    saved = loss.state_dict()["teacher"]
    assert all(torch.equal(fresh.state_dict()["teacher"][k], v) for k, v in saved.items())
    call(fresh, masked_lm(seed=3), token_rows())  # another student: the saved teacher wins
    for name, value in fresh.teacher.state_dict().items():
        assert torch.equal(value, saved[name])


def test_the_hook_skips_diverged_models_and_models_not_trained_at_this_step():
    model, loss = masked_lm(), DistillationLoss(beta=0.5, warmup_steps=0)
    call(loss, model, token_rows(), step=3)
    perturb(model)
    before = {name: p.clone() for name, p in loss.teacher.named_parameters()}

    def result(status: str) -> TrainResult:
        return TrainResult("lm", model, [], 4, 0.0, None, status, loss=loss)

    def unchanged() -> bool:
        return all(torch.equal(p, before[n]) for n, p in loss.teacher.named_parameters())

    EMATeacherUpdate()(StepInfo(3, 10, [result("diverged")]))
    EMATeacherUpdate()(StepInfo(2, 10, [result("training")]))  # the loss last ran at step 3
    assert unchanged()
    EMATeacherUpdate()(StepInfo(3, 10, [result("training")]))
    assert not unchanged()


class _Stop(Exception):
    pass


def test_a_resumed_run_ends_with_the_same_student_and_teacher_bit_for_bit(tmp_path):
    data = load_text(TextConfig(context=16, max_documents=20, seed=0)).train
    steps, half = 12, 6
    config = TrainConfig(lr=3e-3, batch_size=8, max_tokens=8 * steps, device="cpu",
                         checkpoint_every=half, log_every=1)  # fmt: skip

    def train(folder, hooks, model=None, loss=None):
        model = model if model is not None else masked_lm(seed=4)
        loss = loss if loss is not None else DistillationLoss(beta=0.9, warmup_steps=3)
        [result] = train_saes([TrainSpec("lm", model, loss)], data, config, folder,
                              hooks=hooks, progress=False)  # fmt: skip
        return result

    def stop_after_half(info: StepInfo) -> None:
        if info.step == half:  # the checkpoint after `half` steps is already written
            raise _Stop

    straight = train(tmp_path / "a", [EMATeacherUpdate()])
    with pytest.raises(_Stop):
        train(tmp_path / "b", [EMATeacherUpdate(), stop_after_half])
    resumed = train(tmp_path / "b", [EMATeacherUpdate()])  # a fresh model and loss

    assert straight.status == resumed.status == "complete" and resumed.steps == steps
    assert resumed.history[-1]["kl"] > 0 and resumed.history[-1]["alpha"] > 0
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    teacher, resumed_teacher = straight.loss.state_dict()["teacher"], resumed.loss.state_dict()
    for name, value in teacher.items():
        assert torch.equal(value, resumed_teacher["teacher"][name]), name
    start = masked_lm(seed=4).state_dict()  # the teacher moved away from the start
    assert not torch.equal(teacher["blocks.0.mlp.up.weight"], start["blocks.0.mlp.up.weight"])
