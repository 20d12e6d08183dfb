"""The BSA autoencoder and loss: every estimator and metric against a hand computation,
gradients included; annealing, evaluation-mode bits, training, checkpoints and resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saelib.evals.metrics import evaluate
from saelib.saes import BinaryConfig, BinarySAE, TopKConfig, TopKSAE, load_sae, topk_target
from saelib.saes.binary import logistic_noise
from saelib.training import BSALoss, SAESpec, StepInfo, TrainConfig, TrainState, anneal_progress
from saelib.training import train_saes as train
from saelib.training.bsa import alignment_term, reconstruction_term

pytestmark = pytest.mark.usefixtures("one_thread")
ESTIMATORS = ("passthrough", "ste_sigmoid", "ste_identity", "gumbel", "soft_quant", "topk")
STATE = TrainState(step=0, total_steps=1)


def make_bsa(estimator: str = "passthrough", d_in=16, d_sae=48, k=4, seed=0, **options):
    config = BinaryConfig(d_in=d_in, d_sae=d_sae, k=k, estimator=estimator, **options)
    sae = BinarySAE(config, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # logits of both signs and a few units wide, as after some training
        sae.W_enc.mul_(3.0)
        sae.b_enc.copy_(torch.linspace(-1.0, 0.5, d_sae))
    return sae


def inputs(n=64, d=16, seed=1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 0.2


def synthetic_embeddings(n=1024, d=16, n_atoms=48, seed=2) -> torch.Tensor:
    """Unit vectors made of a few of ``n_atoms`` random directions: data a sparse code fits."""
    generator = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, d, generator=generator), dim=1)
    active = (torch.rand(n, n_atoms, generator=generator) < 0.08).float()
    noise = 0.02 * torch.randn(n, d, generator=generator)
    return F.normalize(active @ atoms + noise, dim=1)


def hand_logits(sae: BinarySAE, x: torch.Tensor) -> torch.Tensor:
    return x @ sae.W_enc.T + sae.b_enc


def code_gradients(sae: BinarySAE, x: torch.Tensor, upstream: torch.Tensor):
    """Backpropagate ``upstream`` from the code alone; return (output, d/ds, d/dz)."""
    output = sae(x)
    output.probs.retain_grad()
    output.logits.retain_grad()
    (output.dense() * upstream).sum().backward()
    return output, output.probs.grad, output.logits.grad


# --- forward pass and estimators -----------------------------------------------------------


def test_forward_is_the_original_formula():
    sae, x = make_bsa(), inputs()
    output = sae(x)
    z = hand_logits(sae, x).detach()
    bits = torch.round(torch.sigmoid(z))
    assert torch.equal(output.dense(), bits)
    torch.testing.assert_close(output.probs, torch.sigmoid(z))
    torch.testing.assert_close(output.recon, bits @ sae.W_dec + sae.b_dec)
    assert torch.equal(output.l0(), bits.sum(dim=1).long())
    assert not output.pre_acts.requires_grad
    assert 0 < float(bits.mean()) < 1  # the test inputs give bits of both values


def test_passthrough_backward_is_the_identity_wrt_s():
    sae, x = make_bsa("passthrough"), inputs()
    upstream = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    _, grad_s, _ = code_gradients(sae, x, upstream)
    torch.testing.assert_close(grad_s, upstream)


def test_ste_sigmoid_backward_is_the_sigmoid_derivative_and_equals_the_passthrough():
    x = inputs()
    upstream = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    output, grad_s, grad_z = code_gradients(make_bsa("ste_sigmoid"), x, upstream)
    s = output.probs.detach()
    assert torch.equal(output.dense(), (output.logits > 0).float())
    assert grad_s is None  # the code's gradient goes to the logits directly
    torch.testing.assert_close(grad_z, upstream * s * (1 - s))
    _, _, passthrough_grad_z = code_gradients(make_bsa("passthrough"), x, upstream)
    torch.testing.assert_close(grad_z, passthrough_grad_z)


def test_ste_identity_backward_is_the_identity_wrt_the_logit():
    upstream = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    output, _, grad_z = code_gradients(make_bsa("ste_identity"), inputs(), upstream)
    assert torch.equal(output.dense(), (output.logits > 0).float())
    torch.testing.assert_close(grad_z, upstream)


def test_topk_control_has_exactly_k_bits_and_identity_backward_wrt_s():
    sae, x = make_bsa("topk", k=5), inputs()
    upstream = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    output, grad_s, _ = code_gradients(sae, x, upstream)
    assert torch.equal(output.dense(), topk_target(hand_logits(sae, x), 5))
    assert torch.equal(output.l0(), torch.full((64,), 5))
    torch.testing.assert_close(grad_s, upstream)
    sae.eval()
    assert torch.equal(sae(x).l0(), torch.full((64,), 5))


def test_topk_target_is_the_one_hot_of_the_k_largest_and_carries_no_gradient():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.1]], requires_grad=True)
    t = topk_target(s, 2)
    assert torch.equal(t, torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]))
    assert not t.requires_grad and t.grad_fn is None


def test_fixed_topk_reconstruction_decodes_the_target():
    sae, x = make_bsa(k=3), inputs()
    target = topk_target(torch.sigmoid(hand_logits(sae, x)), 3)
    torch.testing.assert_close(sae.topk_recon(x), target @ sae.W_dec + sae.b_dec)


def fixed_temperature(tau: float, hard: bool) -> BinarySAE:
    return make_bsa("gumbel", tau_start=tau, tau_end=tau, hard=hard)


def test_gumbel_samples_approach_hard_bits_as_the_temperature_falls():
    x = inputs()
    distances = []
    for tau in (2.0, 0.5, 0.1, 1e-3):
        bits = fixed_temperature(tau, hard=False)(x).dense().detach()
        distances.append(float(torch.minimum(bits, 1 - bits).mean()))
    assert distances == sorted(distances, reverse=True)
    assert distances[0] > 0.1 and distances[-1] < 1e-3


def test_gumbel_sample_matches_the_binary_concrete_formula_with_its_gradient():
    x, tau = inputs(), 0.5
    upstream = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    for hard in (False, True):
        sae = fixed_temperature(tau, hard)
        output, _, grad_z = code_gradients(sae, x, upstream)
        z = output.logits.detach()
        generator = torch.Generator().manual_seed(0)  # noise_seed 0, no update done yet
        noisy = z + logistic_noise(z.shape, generator, z.device, z.dtype)
        y = torch.sigmoid(noisy / tau)
        torch.testing.assert_close(output.dense().detach(), (noisy > 0).float() if hard else y)
        torch.testing.assert_close(grad_z, upstream * y * (1 - y) / tau)


def test_gumbel_bits_are_on_with_probability_s():
    sae = make_bsa("gumbel")
    x = inputs(n=1).expand(4000, -1)  # one input: every row draws from the same s
    bits = sae(x).dense().detach()
    s = torch.sigmoid(hand_logits(sae, x[:1]))[0].detach()
    standard_error = (s * (1 - s) / len(x)).sqrt().clamp_min(1e-4)
    assert float(((bits.mean(dim=0) - s) / standard_error).abs().max()) < 5


def test_gumbel_noise_is_reproducible_and_changes_with_each_update():
    sae, x = make_bsa("gumbel"), inputs()
    first = sae(x).dense().detach()
    assert torch.equal(sae(x).dense().detach(), first)
    sae.after_optimizer_step()
    assert not torch.equal(sae(x).dense().detach(), first)


def test_soft_quantisation_tends_to_the_step_as_the_slope_rises():
    x = inputs()
    z = hand_logits(make_bsa(), x).detach()
    clear = z.abs() > 0.05
    step = (z > 0).float()
    gaps = []
    for slope in (1.0, 10.0, 1000.0):
        code = make_bsa("soft_quant", slope_start=slope, slope_end=slope)(x).dense().detach()
        torch.testing.assert_close(code, torch.sigmoid(slope * z))
        gaps.append(float((code - step)[clear].abs().max()))
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-6


def test_soft_quantisation_gradient_is_the_sharpened_sigmoid_derivative():
    upstream = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    sae = make_bsa("soft_quant", slope_start=4.0, slope_end=4.0)
    output, _, grad_z = code_gradients(sae, inputs(), upstream)
    code = output.dense().detach()
    torch.testing.assert_close(grad_z, upstream * 4.0 * code * (1 - code))


def test_annealing_is_geometric_in_the_progress_it_is_told():
    sae = make_bsa("gumbel", tau_start=1.0, tau_end=0.01, slope_start=1.0, slope_end=100.0)
    expected = {0.0: (1.0, 1.0), 0.5: (0.1, 10.0), 1.0: (0.01, 100.0)}
    for progress, (tau, slope) in expected.items():
        sae.set_progress(progress)
        assert math.isclose(sae.temperature(), tau) and math.isclose(sae.slope(), slope)
    with pytest.raises(ValueError, match="progress"):
        sae.set_progress(1.5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_evaluation_mode_always_gives_hard_bits(estimator):
    sae, x = make_bsa(estimator, hard=False), inputs()
    sae.eval()
    code = sae(x).dense()
    z = hand_logits(sae, x)
    expected = topk_target(z, 4) if estimator == "topk" else (z > 0).float()
    assert torch.equal(code, expected)
    assert torch.equal(sae.encode(x), expected)


def test_config_validation_names_the_parameter():
    for bad, name in [
        ({"estimator": "round"}, "estimator"),
        ({"k": 49}, "k must"),
        ({"tau_end": 0.0}, "tau_end"),
        ({"slope_start": float("inf")}, "slope_start"),
    ]:
        with pytest.raises(ValueError, match=name):
            BinaryConfig(d_in=16, d_sae=48, **bad).validate()


# --- loss metrics --------------------------------------------------------------------------


def softmax(v: torch.Tensor, temperature: float) -> torch.Tensor:
    e = torch.exp(v / temperature)
    return e / e.sum(dim=1, keepdim=True)


def hand_reconstruction(x, r, metric, temperature):
    if metric == "cosine":
        return (1 - (x * r).sum(1) / (x.norm(dim=1) * r.norm(dim=1))).mean()
    if metric == "mse":
        return ((r - x) ** 2).sum() / x.numel()
    p, q = softmax(x, temperature), softmax(r, temperature)
    if metric == "kl":
        return (p * (p.log() - q.log())).sum(1).mean()
    return -(p * q.log()).sum(1).mean()


def hand_alignment(s, t, metric):
    if metric == "cosine":
        return (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))).mean()
    if metric == "mse":
        return ((s - t) ** 2).sum() / s.numel()
    if metric == "bce":
        return -(t * s.log() + (1 - t) * (1 - s).log()).mean()
    t_hat, s_hat = t / t.sum(1, keepdim=True), s / s.sum(1, keepdim=True)
    on = t_hat > 0
    return (t_hat[on] * (t_hat[on].log() - s_hat[on].log())).sum() / len(s)


@pytest.mark.parametrize("metric", ["cosine", "mse", "kl", "ce"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_reconstruction_metric_and_gradient_match_a_hand_computation(metric, temperature):
    x = inputs(n=8)
    recon = (x + 0.3 * inputs(n=8, seed=7)).requires_grad_()
    value = reconstruction_term(x, recon, metric, temperature)
    (grad,) = torch.autograd.grad(value, recon)
    reference = hand_reconstruction(x.double(), recon.double(), metric, temperature)
    (reference_grad,) = torch.autograd.grad(reference, recon)
    torch.testing.assert_close(value.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad.float(), rtol=1e-4, atol=1e-6)


def test_kl_and_cross_entropy_differ_by_a_constant():
    x = inputs(n=8)
    recon = (x + 0.3 * inputs(n=8, seed=7)).requires_grad_()
    kl, ce = (reconstruction_term(x, recon, metric) for metric in ("kl", "ce"))
    entropy = -(softmax(x, 1.0) * softmax(x, 1.0).log()).sum(1).mean()
    torch.testing.assert_close(ce - kl, entropy.detach())
    (kl_grad,) = torch.autograd.grad(kl, recon, retain_graph=True)
    (ce_grad,) = torch.autograd.grad(ce, recon)
    torch.testing.assert_close(kl_grad, ce_grad)


@pytest.mark.parametrize("metric", ["cosine", "mse", "kl", "bce"])
def test_alignment_metric_and_gradient_match_a_hand_computation(metric):
    logits = (2 * inputs(n=8, d=24, seed=3)).requires_grad_()
    target = topk_target(logits, 5)
    value = alignment_term(logits, target, metric)
    (grad,) = torch.autograd.grad(value, logits)
    reference = hand_alignment(torch.sigmoid(logits.double()), target.double(), metric)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(value.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad.float(), rtol=1e-4, atol=1e-6)


def test_bsa_loss_is_the_original_cosine_objective_with_display_terms():
    sae, x = make_bsa(k=6), inputs()
    output = sae(x)
    terms = BSALoss(alpha=0.5)(sae, x, output, STATE)
    s, recon = output.probs, output.recon
    t = topk_target(s, 6)
    expected_recon = (1 - F.cosine_similarity(x, recon, dim=1)).mean()
    expected_align = (1 - F.cosine_similarity(s, t, dim=1)).mean()
    torch.testing.assert_close(terms["recon"], expected_recon)
    torch.testing.assert_close(terms["align"], expected_align)
    torch.testing.assert_close(terms["total"], expected_recon + 0.5 * expected_align)
    torch.testing.assert_close(terms["cosine_loss"], expected_recon.detach())
    torch.testing.assert_close(terms["mse"], ((recon - x) ** 2).mean().detach())
    assert float(terms["active_bits"]) == float(output.l0().float().mean())
    assert not any(terms[name].requires_grad for name in ("cosine_loss", "mse", "active_bits"))


def test_display_terms_do_not_depend_on_the_training_metric():
    sae, x = make_bsa(), inputs()
    output = sae(x)
    cosine = BSALoss()(sae, x, output, STATE)
    other = BSALoss(recon_metric="kl", align_metric="bce")(sae, x, output, STATE)
    assert float(other["recon"].detach()) != float(cosine["recon"].detach())
    for name in ("cosine_loss", "mse", "active_bits"):
        assert float(other[name]) == float(cosine[name])


def test_the_target_passes_no_gradient_to_the_encoder():
    sae, x = make_bsa(k=6), inputs()
    output = sae(x)
    terms = BSALoss(recon_metric="mse")(sae, x, output, STATE)
    (grad,) = torch.autograd.grad(terms["align"], output.logits)
    t = topk_target(output.logits, 6)  # a constant: only s = sigmoid(z) is differentiated
    s = torch.sigmoid(output.logits)
    (expected,) = torch.autograd.grad((1 - F.cosine_similarity(s, t, dim=1)).mean(), output.logits)
    torch.testing.assert_close(grad, expected)


def test_loss_options_are_checked_in_one_line_naming_the_parameter():
    for bad, name in [
        ({"recon_metric": "l1"}, "recon_metric"),
        ({"align_metric": "ce"}, "align_metric"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"softmax_temperature": 0.0}, "softmax_temperature"),
    ]:
        with pytest.raises(ValueError, match=name) as raised:
            BSALoss(**bad)
        assert "\n" not in str(raised.value)
    topk = TopKSAE(TopKConfig(d_in=16, d_sae=48, k=4))
    with pytest.raises(TypeError, match="BSALoss needs a binary SAE"):
        BSALoss().check(topk)


# --- training, checkpoints -----------------------------------------------------------------


def small_config(**changes) -> TrainConfig:
    settings = {"lr": 3e-3, "batch_size": 64, "epochs": 2, "log_every": 1} | changes
    return TrainConfig(**settings)


@torch.no_grad()
def eval_cosine_loss(sae: BinarySAE, x: torch.Tensor) -> float:
    sae.eval()
    loss = float((1 - F.cosine_similarity(x, sae(x).recon, dim=1)).mean())
    sae.train()
    return loss


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_training_lowers_the_loss(estimator):
    data = synthetic_embeddings()
    sae = make_bsa(estimator, hard=False, seed=3)
    before = eval_cosine_loss(sae, data)
    spec = SAESpec("bsa", sae, BSALoss())
    [result] = train([spec], data, small_config(epochs=3), hooks=[anneal_progress], progress=False)
    assert result.status == "complete"
    assert result.history[-1]["total"] < result.history[0]["total"]
    assert eval_cosine_loss(sae, data) < 0.8 * before
    assert float(sae.progress) == 1.0 and int(sae.updates) == result.steps


def test_an_annealed_estimator_without_the_progress_hook_is_refused():
    spec = SAESpec("bsa", make_bsa("gumbel"), BSALoss())
    with pytest.raises(RuntimeError, match="anneal_progress"):
        train([spec], synthetic_embeddings(), small_config(), progress=False)


def test_binary_codes_work_with_the_generic_evals():
    sae = make_bsa()
    sae.eval()
    metrics = evaluate(sae, synthetic_embeddings())
    assert 0 < metrics.l0 < sae.d_sae
    assert metrics.max_activation == 1.0  # bits: every active value is 1


def test_save_and_load_round_trip(tmp_path):
    sae = make_bsa("soft_quant", slope_end=20.0, k=3)
    sae.set_progress(0.25)
    sae.after_optimizer_step()
    loaded = load_sae(sae.save(tmp_path / "bsa", extra={"dataset": "synthetic"}))
    assert isinstance(loaded, BinarySAE) and loaded.config == sae.config
    assert loaded.metadata == {"dataset": "synthetic"}
    assert float(loaded.progress) == 0.25 and int(loaded.updates) == 1
    x = inputs()
    torch.testing.assert_close(loaded(x).recon, sae(x).recon)  # the training (soft) code
    loaded.eval(), sae.eval()
    assert torch.equal(loaded(x).dense(), sae(x).dense())


class Interrupt(Exception):
    pass


def crash_at_step_12(info: StepInfo) -> None:
    if info.step == 12:
        raise Interrupt


def test_a_resumed_gumbel_run_matches_an_uninterrupted_one(tmp_path):
    data, config = synthetic_embeddings(n=512), small_config(epochs=4, checkpoint_every=5)

    def spec():
        return SAESpec("bsa", make_bsa("gumbel", seed=4), BSALoss(align_metric="bce"))

    [reference] = train([spec()], data, config, tmp_path / "a", hooks=[anneal_progress])
    hooks = [anneal_progress, crash_at_step_12]
    with pytest.raises(Interrupt):
        train([spec()], data, config, tmp_path / "b", hooks=hooks, progress=False)
    [resumed] = train([spec()], data, config, tmp_path / "b", hooks=[anneal_progress])
    assert resumed.history == reference.history
    for name, value in reference.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
