"""The sparse orthogonality penalty against a dense d_sae x d_sae reference."""

from __future__ import annotations

import pytest
import torch

from saelib.saes import ReLUConfig, ReLUSAE
from saelib.saes.coactivation import count_pairs, ordered_pairs
from saelib.training.losses import TrainState
from saelib.training.orthogonality import (
    SCHEDULES,
    DensePairEMA,
    OrthogonalityPenalty,
    OrthoSchedule,
    PairEMA,
    make_penalty,
    static_schedule,
)


def dense_ratio(f: torch.Tensor) -> torch.Tensor:
    """n_ij = #(i and j active) / #(j active), NaN (j never active) set to 0."""
    active = (f > 0).float()
    together = active.T @ active
    return torch.nan_to_num(together / together.diagonal()[None, :], nan=0.0)


def dense_penalty(f, ratio, tau, weight, include_diagonal, W_dec=None):
    coefficient = ((ratio - tau) / tau).clamp(0, 1)
    if not include_diagonal:
        coefficient.fill_diagonal_(0)
    magnitude = (f.T @ f / len(f)) if W_dec is None else (W_dec @ W_dec.T)
    return weight * (coefficient * magnitude.abs()).sum()


def state(step=50, total=100, d_sae=48):
    return TrainState(step, total, torch.zeros(d_sae, dtype=torch.bool))


def relu_sae(d_in: int = 16, d_sae: int = 48) -> ReLUSAE:
    """A ReLU SAE whose rows have different numbers of active latents (a padded code)."""
    sae = ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae), torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    return sae


@pytest.mark.parametrize("include_diagonal", [False, True])
@pytest.mark.parametrize("kind", ["activation", "decoder"])
@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_penalty_and_gradient_match_dense_reference(make_sae, include_diagonal, kind, architecture):
    sae = make_sae(d_in=16, d_sae=48, k=6) if architecture == "topk" else relu_sae()
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    if architecture == "relu":
        l0 = sae(x).l0()
        assert l0.min() < l0.max(), "the case should have a varying number of active latents"
    penalty = OrthogonalityPenalty(
        static_schedule(0.3, 0.7), include_diagonal=include_diagonal, penalty=kind
    )
    sparse_value = penalty(sae, sae(x), state())
    sparse_value.backward()
    parameters = (sae.W_enc, sae.b_enc, sae.W_dec)
    sparse_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters]
    sae.zero_grad()

    f = sae(x).dense()
    W_dec = sae.W_dec if kind == "decoder" else None
    dense_value = dense_penalty(f, dense_ratio(f.detach()), 0.3, 0.7, include_diagonal, W_dec)
    dense_value.backward()
    assert sparse_value.item() > 0
    torch.testing.assert_close(sparse_value, dense_value, rtol=1e-5, atol=1e-6)
    for sparse_grad, param in zip(sparse_grads, parameters, strict=True):
        dense_grad = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in sparse_grads)


def test_ema_of_ratios_matches_dense_ema(make_sae):
    sae = make_sae(d_in=16, d_sae=32, k=4)
    schedule = SCHEDULES["run5"]  # EMA 0.95
    penalty = OrthogonalityPenalty(schedule, ema_floor=0.0)
    generator = torch.Generator().manual_seed(1)
    ema = None
    for step in range(5):
        x = torch.randn(64, 16, generator=generator)
        output = sae(x)
        value = penalty(sae, output, state(step=20 + step, total=100, d_sae=32))
        f = output.dense().detach()
        ratio = dense_ratio(f)
        ratio.fill_diagonal_(0)
        ema = ratio if ema is None else 0.95 * ema + 0.05 * ratio
        p = (20 + step) / 100
        expected = dense_penalty(
            f, ema, schedule.tau(p), schedule.weight(p, 1.0), include_diagonal=False
        )
        torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-7)


def test_schedules_follow_the_spec():
    assert SCHEDULES["run1"].tau(0.5) == pytest.approx(0.4)
    assert SCHEDULES["run1"].weight(0.5, 1.0) == pytest.approx(0.025)
    assert SCHEDULES["run6"].tau(1.0) == pytest.approx(0.81)
    assert SCHEDULES["run7"].tau(0.75) == pytest.approx(0.001)
    assert SCHEDULES["run7"].weight(0.0, 0.5) == pytest.approx(0.2)  # warmup halves it
    assert SCHEDULES["run7"].ema_start * 2441 == pytest.approx(100)  # the original's step 100
    assert make_penalty("none") is None
    with pytest.raises(ValueError, match="unknown schedule 'run9'"):
        make_penalty("run9")


def test_warmup_scales_the_weight(make_sae):
    sae = make_sae(d_in=16, d_sae=48, k=6)
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(2))
    schedule = OrthoSchedule(lambda p: 0.2, lambda p, warmup: 1.0 * warmup)
    output = sae(x)
    during = OrthogonalityPenalty(schedule)(sae, output, state(step=5, total=100)).item()
    after = OrthogonalityPenalty(schedule)(sae, output, state(step=10, total=100)).item()
    assert after > 0
    assert during == pytest.approx(0.5 * after)  # warmup = step / (0.1 * total steps)


def test_pair_ema_with_lazy_decay_matches_a_dense_ema():
    generator = torch.Generator().manual_seed(3)
    ema, dense = PairEMA(decay=0.9, floor=0.0, device=torch.device("cpu")), torch.zeros(50)
    for step in range(40):
        keys = torch.randperm(50, generator=generator)[:12]  # pairs present at this step
        ratio = torch.rand(12, generator=generator)
        observed = torch.zeros(50).index_copy_(0, keys, ratio)
        dense = 0.9 * dense + 0.1 * observed  # absent pairs count as 0
        torch.testing.assert_close(ema.update(keys, 0.1 * ratio, step), dense[keys])


def test_dense_pair_ema_matches_a_dense_ema_and_skipped_steps_decay():
    generator = torch.Generator().manual_seed(4)
    ema, dense = DensePairEMA(decay=0.9, size=50, device=torch.device("cpu")), torch.zeros(50)
    previous = -1
    for step in (*range(10), 13, 14, 20):  # steps without an update still decay every pair
        keys = torch.randperm(50, generator=generator)[:12]
        ratio = torch.rand(12, generator=generator)
        observed = torch.zeros(50).index_copy_(0, keys, ratio)
        dense = 0.9 ** (step - previous - 1) * dense  # the skipped steps
        dense = 0.9 * dense + 0.1 * observed
        previous = step
        torch.testing.assert_close(ema.update(keys, 0.1 * ratio, step), dense[keys])
    restored = DensePairEMA.from_state_dict(0.9, 0.0, ema.state_dict())
    assert restored.last_step == 20 and torch.equal(restored.matrix, ema.matrix)


@pytest.mark.parametrize("schedule", ["run4", "run7"])
def test_dense_and_sparse_ema_storage_give_the_same_penalty(make_sae, schedule):
    sae = make_sae(d_in=16, d_sae=32, k=4)
    dense = OrthogonalityPenalty(SCHEDULES[schedule], ema_floor=0.0)
    sparse = OrthogonalityPenalty(SCHEDULES[schedule], ema_floor=0.0, dense_max_mib=0.0)
    generator = torch.Generator().manual_seed(5)
    for step in range(100, 112):
        output = sae(torch.randn(64, 16, generator=generator))
        at = state(step=step, total=200, d_sae=32)
        torch.testing.assert_close(dense(sae, output, at), sparse(sae, output, at))
    assert isinstance(dense._ema, DensePairEMA) and isinstance(sparse._ema, PairEMA)


def test_pairs_are_counted_once_from_the_active_slots_of_a_padded_code():
    acts = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    indices = torch.tensor([[0, 2, 5], [2, 0, 1], [5, 0, 2]])  # zeros: inactive or padding
    counts = count_pairs(acts, indices, d_sae=6)
    assert counts.keys.tolist() == [0 * 6 + 2, 0 * 6 + 5, 2 * 6 + 5]
    assert counts.counts.tolist() == [2, 1, 1]
    first, second, together, unordered = ordered_pairs(counts.keys, counts.counts, 6)
    assert list(zip(first.tolist(), second.tolist(), strict=True)) == [
        (0, 2), (0, 5), (2, 5), (2, 0), (5, 0), (5, 2)
    ]  # fmt: skip
    assert together.tolist() == [2, 1, 1, 2, 1, 1] and unordered.tolist() == [0, 1, 2, 0, 1, 2]
    diagonal = count_pairs(acts, indices, d_sae=6, include_diagonal=True)
    fires = {0: 2, 2: 3, 5: 1}
    assert dict(zip(diagonal.keys.tolist(), diagonal.counts.tolist(), strict=True)) == {
        **{latent * 6 + latent: n for latent, n in fires.items()},
        2: 2,
        5: 1,
        17: 1,
    }
