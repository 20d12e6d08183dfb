"""Frequency ordering: the published penalty changes nothing, the soft one orders latents, the
re-sort permutes a model (and its Adam moments) without changing it, and the metrics agree with
hand computations and scipy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy.stats import spearmanr

from saelib.evals.ordering import (
    average_ranks,
    fraction_out_of_order,
    index_frequency_spearman,
    latent_frequency,
)
from saelib.saes import ReLUConfig, ReLUSAE, SAEOutput, TopKConfig, TopKSAE
from saelib.training import (
    SAESpec,
    StepInfo,
    TrainConfig,
    TrainResult,
    make_optimizer,
    train_saes,
)
from saelib.training.l1 import L1Loss
from saelib.training.losses import TopKLoss, TrainState
from saelib.training.ordering import (
    FrequencyTracker,
    OrderingLoss,
    ResortByFrequency,
    find_tracker,
    firing_margin,
    latent_axes,
    pair_violations,
    permute_latents,
    soft_frequency,
)

D_IN, N_COMPONENTS, D_SAE = 16, 12, 12


def synthetic(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Sums of orthogonal directions, component j present with probability 0.6 -> 0.03 (falling
    with j), magnitude uniform in [1, 2]: a dictionary with a known frequency spectrum."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=generator))[0][:N_COMPONENTS]
    present = torch.rand(n, N_COMPONENTS, generator=generator) < torch.linspace(0.6, 0.03, 12)
    magnitude = 1 + torch.rand(n, N_COMPONENTS, generator=generator)
    return (present * magnitude) @ directions


def relu_sae(seed: int = 0, **options) -> ReLUSAE:
    return ReLUSAE(ReLUConfig(D_IN, D_SAE, **options), torch.Generator().manual_seed(seed))


def test_published_penalty_has_no_gradient_and_leaves_training_bit_identical():
    x = synthetic(1024)
    sae = relu_sae()
    output = sae(x[:128])
    terms = OrderingLoss(L1Loss(0.5), "published", weight=10.0)(
        sae, x[:128], output, TrainState(0, 1)
    )
    assert not terms["ordering"].requires_grad

    specs = [
        SAESpec("base", relu_sae(), L1Loss(0.5)),
        SAESpec("published", relu_sae(), OrderingLoss(L1Loss(0.5), "published", weight=10.0)),
        SAESpec("topk", TopKSAE(TopKConfig(D_IN, D_SAE, k=3), torch.Generator().manual_seed(0))),
        SAESpec(
            "topk_published",
            TopKSAE(TopKConfig(D_IN, D_SAE, k=3), torch.Generator().manual_seed(0)),
            OrderingLoss(TopKLoss(), "published", weight=10.0),
        ),
    ]
    config = TrainConfig(lr=3e-3, batch_size=64, max_tokens=64 * 40)
    base, published, topk, topk_published = train_saes(specs, x, config, progress=False)
    assert max(entry["ordering"] for entry in published.history) > 0  # the term is not zero
    for plain, ordered in ((base, published), (topk, topk_published)):
        for (name, value), other in zip(
            plain.model.state_dict().items(), ordered.model.state_dict().values(), strict=True
        ):
            assert torch.equal(value, other), name
        assert [e["recon"] for e in plain.history] == [e["recon"] for e in ordered.history]


def test_soft_penalty_orders_latents_where_the_published_one_does_not():
    x = synthetic()
    specs = [
        SAESpec(kind, relu_sae(), OrderingLoss(L1Loss(0.5), kind, weight=10.0))
        for kind in ("published", "soft")
    ]
    config = TrainConfig(lr=3e-3, batch_size=128, max_tokens=128 * 600)
    published, soft = train_saes(specs, x, config, progress=False)
    frequencies = [latent_frequency(result.model, x) for result in (published, soft)]
    rho_published, rho_soft = (index_frequency_spearman(f) for f in frequencies)
    out_published, out_soft = (fraction_out_of_order(f) for f in frequencies)
    assert rho_soft < rho_published - 0.2, (rho_published, rho_soft)  # -0.86 vs -0.62
    assert out_soft < out_published, (out_published, out_soft)  # 4/11 vs 5/11
    assert soft.history[-1]["mse"] < 1.2 * published.history[-1]["mse"]


def test_ordering_weight_ramps_linearly():
    loss = OrderingLoss(L1Loss(0.1), weight=0.5, ramp_steps=1000)
    assert [loss.weight_at(s) for s in (0, 250, 1000, 5000)] == [0.0, 0.125, 0.5, 0.5]
    assert OrderingLoss(L1Loss(0.1), weight=0.3).weight_at(0) == 0.3


def test_pair_violations_match_a_hand_computation():
    q = torch.tensor([0.2, 0.5, 0.1])
    # pairs (0, 1), (0, 2), (1, 2): only q_1 > q_0 is out of order, by 0.3
    torch.testing.assert_close(pair_violations(q), torch.tensor(0.3 / 3))
    torch.testing.assert_close(pair_violations(q, margin=0.05), torch.tensor(0.35 / 3))
    torch.testing.assert_close(pair_violations(q, pairs="adjacent"), torch.tensor(0.3 / 2))
    assert pair_violations(torch.tensor([0.5, 0.3, 0.1])) == 0


def test_firing_margin_is_positive_exactly_where_a_latent_fires():
    x = synthetic(256)
    relu = relu_sae()
    topk = TopKSAE(TopKConfig(D_IN, D_SAE, k=3), torch.Generator().manual_seed(0))
    for model in (relu, topk):
        with torch.no_grad():
            fired = model(x).dense() > 1e-4
            margin = firing_margin(model, x)
        assert torch.equal(margin > 0, fired), type(model).__name__
    per_row = (firing_margin(topk, x) > 0).sum(dim=1)  # k, or fewer where top values are <= 0
    assert per_row.max() == 3 and per_row.le(3).all()


def test_soft_penalty_is_the_weighted_pair_violations_and_reaches_silent_latents():
    x = synthetic(256)
    sae = relu_sae()
    with torch.no_grad():  # silence latent 5 just below firing on every row of this batch
        sae.b_enc[5] -= sae.pre_acts(x)[:, 5].max() + 0.05
    output = sae(x)
    base = L1Loss(0.5)
    state = TrainState(0, 1)
    terms = OrderingLoss(base, "soft", weight=2.0, temperature=0.5)(sae, x, output, state)
    q = soft_frequency(firing_margin(sae, x).detach(), 0.5)
    expected = 2.0 * pair_violations(q) * base(sae, x, output, state)["recon"]
    torch.testing.assert_close(terms["ordering"], expected.detach())
    torch.testing.assert_close(terms["total"], terms["recon"] + 0.5 * terms["l1"] + expected)
    sae.zero_grad()
    terms["ordering"].backward()
    assert not output.fired()[5]
    assert sae.W_enc.grad[5].abs().sum() > 0  # a ReLU'd-away latent is still pushed


def test_tracker_counts_fractions_and_resumes_from_its_state():
    def output(codes):
        return SAEOutput.from_dense(codes.sum(dim=1, keepdim=True), codes)

    batches = [torch.rand(8, 5, generator=torch.Generator().manual_seed(s)) - 0.5 for s in range(4)]
    tracker = FrequencyTracker(decay=0.9)
    for batch in batches[:2]:
        tracker.update(output(batch.clamp_min(0)))
    fractions = [(b > 1e-4).double().mean(dim=0) for b in batches]
    torch.testing.assert_close(tracker.ema, 0.9 * fractions[0] + 0.1 * fractions[1])
    torch.testing.assert_close(tracker.mean, (fractions[0] + fractions[1]) / 2)

    resumed = FrequencyTracker(decay=0.9)
    resumed.load_state_dict(tracker.state_dict())
    for batch in batches[2:]:
        tracker.update(output(batch.clamp_min(0)))
        resumed.update(output(batch.clamp_min(0)))
    for key, value in tracker.state_dict().items():
        assert (
            torch.equal(value, resumed.state_dict()[key])
            if isinstance(value, torch.Tensor)
            else value == resumed.state_dict()[key]
        )
    order = torch.tensor([4, 0, 3, 1, 2])
    ema = tracker.ema.clone()
    tracker.permute(order)
    assert torch.equal(tracker.ema, ema[order])

    loss = OrderingLoss(L1Loss(0.1), "published")
    loss.tracker.load_state_dict(resumed.state_dict())
    other = OrderingLoss(L1Loss(0.1), "published")
    other.load_state_dict(loss.state_dict())
    assert torch.equal(other.tracker.fired, resumed.fired) and other.tracker.samples == 32


MODELS = {
    "relu": lambda: relu_sae(),
    "relu_options": lambda: relu_sae(layer_norm=True, skip="encoder", attention=True),
    "relu_output_skip": lambda: relu_sae(skip="output"),
    "topk": lambda: TopKSAE(TopKConfig(D_IN, D_SAE, k=3), torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_permuting_latents_keeps_the_models_function(name):
    sae, x = MODELS[name](), synthetic(256)
    with torch.no_grad():
        for parameter in sae.parameters():  # break the tied init's symmetries
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator()))
    before = sae(x)
    order = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))
    permute_latents(sae, order)
    after = sae(x)
    torch.testing.assert_close(after.recon, before.recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.dense(), before.dense()[:, order], atol=1e-5, rtol=1e-5)
    expected = {"W_enc", "b_enc", "W_dec"} | (
        {"layer_norm.weight", "layer_norm.bias", "skip.weight", "skip.bias"}
        | {"attention.v.weight", "attention.v.bias"}
        if name == "relu_options"
        else set()
    )
    assert set(latent_axes(sae)) == expected


def trained(sae, loss, x, steps=3):
    optimizer = make_optimizer(sae, TrainConfig(lr=1e-2), torch.device("cpu"))
    for step in range(steps):
        batch = x[64 * step : 64 * (step + 1)]
        optimizer.zero_grad()
        loss(sae, batch, sae(batch), TrainState(step, 10))["total"].backward()
        optimizer.step()
    return optimizer


def one_step(sae, optimizer, loss, batch):
    optimizer.zero_grad()
    loss(sae, batch, sae(batch), TrainState(5, 10))["total"].backward()
    optimizer.step()


@pytest.mark.parametrize("permute_moments", [True, False])
def test_resort_moves_adam_moments_with_their_latents(permute_moments):
    """Re-sort then step == step then re-sort: only when the moments move with the latents."""
    x, loss = synthetic(512), OrderingLoss(L1Loss(0.5), "published", weight=0.0)
    sae = relu_sae(layer_norm=True, skip="encoder")
    optimizer = trained(sae, loss, x)
    twin = relu_sae(layer_norm=True, skip="encoder")
    twin.load_state_dict(sae.state_dict())
    twin_optimizer = make_optimizer(twin, TrainConfig(lr=1e-2), torch.device("cpu"))
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # own moments

    counter = torch.arange(D_SAE) * 10
    result = TrainResult("m", sae, [], 3, 0.0, None, "training", "", {}, optimizer, loss, counter)
    order = torch.argsort(loss.tracker.ema, descending=True, stable=True)
    if permute_moments:
        ResortByFrequency(every=1)(StepInfo(2, 10, [result]))
        assert torch.equal(counter, (torch.arange(D_SAE) * 10)[order])
    else:
        permute_latents(sae, order)  # weights only
    batch = x[300:364]
    one_step(sae, optimizer, loss, batch)
    one_step(twin, twin_optimizer, loss, batch)
    permute_latents(twin, order, twin_optimizer)
    same = all(
        torch.allclose(a, b, atol=1e-6)
        for a, b in zip(sae.parameters(), twin.parameters(), strict=True)
    )
    assert same == permute_moments


def test_training_with_the_resort_sorts_latents_by_frequency():
    x = synthetic()
    hook = ResortByFrequency(every=50)
    loss = OrderingLoss(L1Loss(0.5), "published", weight=0.0)
    assert find_tracker(loss) is loss.tracker
    config = TrainConfig(lr=3e-3, batch_size=128, max_tokens=128 * 300)
    (result,) = train_saes(
        [SAESpec("m", relu_sae(), loss)], x, config, hooks=[hook], progress=False
    )
    assert len(hook.records) == 6 and hook.records[0].moved > 0
    frequency = latent_frequency(result.model, x)
    assert index_frequency_spearman(frequency) < -0.9
    assert torch.all(loss.tracker.ema[1:] <= loss.tracker.ema[:-1])


def test_metrics_match_hand_computations_and_scipy():
    assert index_frequency_spearman(torch.tensor([0.5, 0.3, 0.2, 0.1])) == pytest.approx(-1.0)
    assert index_frequency_spearman(torch.tensor([0.1, 0.2, 0.3])) == pytest.approx(1.0)
    assert math.isnan(index_frequency_spearman(torch.zeros(4)))
    frequency = torch.tensor([0.3, 0.0, 0.5, 0.0, 0.3, 0.1, 0.0])
    torch.testing.assert_close(
        average_ranks(frequency), torch.tensor([5.5, 2.0, 7.0, 2.0, 5.5, 4.0, 2.0]).double()
    )
    expected = spearmanr(range(7), frequency.numpy()).statistic
    assert index_frequency_spearman(frequency) == pytest.approx(expected)
    assert fraction_out_of_order(frequency) == pytest.approx(2 / 6)  # 0 -> 0.5, 0 -> 0.3
    assert fraction_out_of_order(torch.tensor([0.2, 0.2, 0.1])) == 0.0


def test_latent_frequency_counts_rows_above_eps():
    sae = relu_sae()
    x = synthetic(300)
    expected = (sae.encode(x) > 1e-4).double().mean(dim=0)
    torch.testing.assert_close(latent_frequency(sae, x, batch_size=64), expected.detach())


class Interrupt(Exception):
    pass


def test_a_resumed_run_with_ordering_and_resort_equals_an_uninterrupted_one(tmp_path):
    x = synthetic(1024)
    config = TrainConfig(lr=3e-3, batch_size=64, max_tokens=64 * 40, checkpoint_every=20)

    def run(folder, hooks):
        loss = OrderingLoss(L1Loss(0.5), "soft", weight=1.0)
        spec = SAESpec("m", relu_sae(), loss)
        return train_saes([spec], x, config, folder, hooks=hooks, progress=False)[0], loss

    def stop_at_25(info):
        if info.step == 25:
            raise Interrupt

    whole, whole_loss = run(tmp_path / "a", [ResortByFrequency(every=15)])
    with pytest.raises(Interrupt):
        run(tmp_path / "b", [ResortByFrequency(every=15), stop_at_25])
    resumed, resumed_loss = run(tmp_path / "b", [ResortByFrequency(every=15)])
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert torch.equal(whole_loss.tracker.ema, resumed_loss.tracker.ema)
    assert torch.equal(whole_loss.tracker.fired, resumed_loss.tracker.fired)
