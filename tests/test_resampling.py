"""Dead-latent resampling: exactly the resampled latents change (weights and Adam moments), as
the recipe says; nothing changes without dead latents; training with it revives latents."""

from __future__ import annotations

import pytest
import torch

from saelib.saes import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from saelib.training import (
    SAESpec,
    StepInfo,
    TrainConfig,
    TrainResult,
    for_models,
    make_optimizer,
    train_saes,
)
from saelib.training.l1 import L1Loss
from saelib.training.losses import TopKLoss, TrainState
from saelib.training.resampling import ResampleDead, firing_fraction, input_losses

D_IN, D_SAE = 8, 16
DEAD = [2, 5, 11]


def data(n: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 0.5


def make_sae(arch: str, seed: int = 0) -> ReLUSAE | TopKSAE:
    """An SAE whose latents DEAD never fire (a very negative encoder bias)."""
    generator = torch.Generator().manual_seed(seed)
    if arch == "relu":
        sae = ReLUSAE(ReLUConfig(D_IN, D_SAE), generator)
    else:
        sae = TopKSAE(TopKConfig(D_IN, D_SAE, k=3), generator)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
        sae.b_enc[DEAD] = -100.0
        sae.b_dec.copy_(torch.linspace(-0.2, 0.2, D_IN))
    return sae


def trained_result(arch: str, x: torch.Tensor) -> TrainResult:
    """The SAE after a few real Adam steps (so that every moment is non-zero), as a hook sees it."""
    sae = make_sae(arch)
    optimizer = make_optimizer(sae, TrainConfig(lr=1e-3), torch.device("cpu"))
    loss = L1Loss(0.1) if arch == "relu" else TopKLoss(auxk_alpha=0)
    for step in range(3):
        batch = x[64 * step : 64 * (step + 1)]
        optimizer.zero_grad()
        loss(sae, batch, sae(batch), TrainState(step, 3))["total"].backward()
        with torch.no_grad():  # a dead latent's rows would otherwise have zero moments
            for parameter in sae.parameters():
                parameter.grad += 1e-3
        optimizer.step()
    counter = torch.full((D_SAE,), 7, dtype=torch.long)
    return TrainResult(arch, sae, [], 3, 0.0, None, "training", "", {}, optimizer, loss, counter)


def snapshot(result: TrainResult) -> dict[str, torch.Tensor]:
    tensors = {name: p.detach().clone() for name, p in result.model.named_parameters()}
    for name, parameter in result.model.named_parameters():
        for key, value in result.optimizer.state[parameter].items():
            tensors[f"{name}.{key}"] = value.clone()
    return tensors


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_exactly_the_dead_latents_are_reinitialised_from_high_loss_inputs(arch):
    x = data()
    result = trained_result(arch, x)
    sae, before = result.model, snapshot(result)
    firing = firing_fraction(sae, x, 100)
    assert set((firing < 0.01).nonzero().flatten().tolist()) == set(DEAD)
    alive_norm = sae.W_enc.detach()[[i for i in range(D_SAE) if i not in DEAD]].norm(dim=1).mean()
    losses = input_losses(sae, x, 100)

    hook = ResampleDead(x, every=4, threshold=0.01, seed=3, batch_size=100)
    hook(StepInfo(2, 10, [result]))  # not a resampling step
    assert hook.records == [] and all(
        torch.equal(v, snapshot(result)[k]) for k, v in before.items()
    )
    hook(StepInfo(3, 10, [result]))

    after = snapshot(result)
    (record,) = hook.records
    assert (record.step, record.name, record.n_resampled, record.latents) == (
        3,
        arch,
        3,
        (2, 5, 11),
    )
    rows = torch.zeros(D_SAE, dtype=torch.bool)
    rows[DEAD] = True
    for name, value in before.items():
        if name.startswith(("W_enc", "b_enc", "W_dec")) and not name.endswith(".step"):
            assert torch.equal(after[name][~rows], value[~rows]), name  # others untouched
            assert not torch.equal(after[name][rows], value[rows]), name
        else:
            assert torch.equal(after[name], value), name  # b_dec, step counts
    for key in ("exp_avg", "exp_avg_sq"):
        for name in ("W_enc", "b_enc", "W_dec"):
            assert torch.count_nonzero(after[f"{name}.{key}"][rows]) == 0

    new_dec = sae.W_dec.detach()[DEAD]
    torch.testing.assert_close(new_dec.norm(dim=1), torch.ones(3))
    directions = (x - sae.b_dec.detach()) / (x - sae.b_dec.detach()).norm(dim=1, keepdim=True)
    cosines = new_dec @ directions.T
    chosen = cosines.argmax(dim=1)
    torch.testing.assert_close(cosines.max(dim=1).values, torch.ones(3))
    assert len(set(chosen.tolist())) == 3  # distinct inputs
    assert losses[chosen].min() > losses.median()  # drawn by loss^2: the badly reconstructed
    torch.testing.assert_close(sae.W_enc.detach()[DEAD], new_dec * 0.2 * alive_norm)
    assert torch.count_nonzero(sae.b_enc.detach()[DEAD]) == 0
    assert result.tokens_since_fired[DEAD].eq(0).all() and result.tokens_since_fired.sum() == 7 * 13


def test_resampling_is_deterministic_for_a_seed():
    x = data()
    results = [trained_result("relu", x) for _ in range(3)]
    for result, seed in zip(results, (0, 0, 1), strict=True):
        ResampleDead(x, every=1, seed=seed)(StepInfo(0, 1, [result]))
    weights = [result.model.W_dec.detach() for result in results]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_nothing_happens_when_every_latent_fires_often_enough():
    x = data()
    result = trained_result("relu", x)
    with torch.no_grad():
        result.model.b_enc.fill_(0.5)
    assert firing_fraction(result.model, x, 512).min() >= 0.01
    before = snapshot(result)
    hook = ResampleDead(x, every=1)
    hook(StepInfo(0, 1, [result]))
    assert [(r.n_resampled, r.latents) for r in hook.records] == [(0, ())]
    assert all(torch.equal(value, snapshot(result)[name]) for name, value in before.items())


def test_training_with_resampling_revives_dead_latents(one_thread):
    x = data(1024, seed=5)
    saes = {name: make_sae("relu") for name in ("plain", "resampled")}
    specs = [SAESpec(name, sae, loss=L1Loss(0.05)) for name, sae in saes.items()]
    hook = ResampleDead(x[:256], every=10, threshold=0.01)
    config = TrainConfig(lr=3e-3, batch_size=64, max_tokens=64 * 40, device="cpu", seed=1)
    results = train_saes(specs, x, config, hooks=[for_models(["resampled"], hook)], progress=False)
    assert all(result.status == "complete" for result in results)
    dead = {name: int((firing_fraction(sae, x, 1024) < 0.01).sum()) for name, sae in saes.items()}
    assert [(r.step, r.name) for r in hook.records] == [(s, "resampled") for s in (9, 19, 29, 39)]
    assert hook.records[0].n_resampled == len(DEAD)
    assert dead["plain"] == len(DEAD) and dead["resampled"] == 0, dead


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        ResampleDead(data(), every=0)
