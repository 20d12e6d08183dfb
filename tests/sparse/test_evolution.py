"""SparsAE's evolution strategy over masks on a tiny LM trained on real wiki text: the swap
mutation's exact counts and per-layer bounds, scoring that leaves the model bit-identical, the
proxy P by hand, Kaiming regrowth with reset Adam state, the 1.5x burn-in, the exact global
density through training, and a bit-identical resume."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch.nn import functional as F

from saelib.sparse import (
    LMConfig,
    NextTokenLoss,
    TextConfig,
    TransformerLM,
    load_text,
    mask_linears,
    masked_layers,
    random_masks,
    track_dense_grads,
)
from saelib.sparse.evolution import (
    RunningStats,
    SparsAE,
    _ModelState,
    proxy_scores,
    score_candidate,
    swap_mutation,
)
from saelib.training import StepInfo, TrainConfig, TrainResult, TrainSpec, for_models, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LMConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, d_mlp=64, context=16)
TIMING = {"search_seconds", "validation_seconds"}


@pytest.fixture(scope="module")
def text():
    return load_text(TextConfig(context=16, max_documents=60, seed=0))


def make_hook(text, **kwargs) -> SparsAE:
    pool = text.train[-32:].reshape(4, 8, 17)  # 4 micro-batches of 8 rows
    return SparsAE(pool=pool, val_rows=text.val[:32], **kwargs)


def sparse_model(density: float = 0.2, seed: int = 0) -> TransformerLM:
    model = mask_linears(TransformerLM(TINY, seed=seed))
    random_masks(model, density, seed=seed + 1)
    return model


def train_step(model, optimizer, rows) -> None:
    """One step as the loop makes it (no clipping): loss, backward, Adam, re-zero masked."""
    loss = NextTokenLoss()
    optimizer.zero_grad(set_to_none=True)
    loss(model, rows, model(loss.model_input(rows)), None)["total"].backward()
    optimizer.step()
    model.after_optimizer_step()


def trained(text, steps: int = 3, density: float = 0.2):
    """A masked model after a few Adam steps (so gradients and Adam moments exist)."""
    model = sparse_model(density)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        train_step(model, optimizer, text.train[16 * step : 16 * (step + 1)])
    return model, optimizer


def info(step: int, model, optimizer, total: int = 1000) -> StepInfo:
    result = TrainResult("lm", model, [], step + 1, 0.0, None, "training", optimizer=optimizer)
    return StepInfo(step, total, [result])


def first_win(text, model, optimizer, **kwargs):
    """A copy of the model after an update (step 49 of 1000) that a candidate won, with its
    hook and the winning candidate as generated before the update."""
    for seed in range(10):
        trial_model, trial_optimizer = copy.deepcopy((model, optimizer))
        hook = make_hook(text, seed=seed, update_every=50, reset_probability=0.0, **kwargs)
        candidates = hook.candidates(trial_model, 49)
        hook(info(49, trial_model, trial_optimizer))
        if hook.log[-1]["winner"]:
            return hook, trial_model, trial_optimizer, candidates[hook.log[-1]["winner"]]
    raise AssertionError("the parent won every update of 10 seeds")


def counts(masks) -> dict[str, int]:
    return {name: int(mask.sum()) for name, mask in masks.items()}


def snapshot(model, optimizer) -> dict:
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        "dense": {name: m.dense_grad.clone() for name, m in masked_layers(model).items()},
        "adam": copy.deepcopy(optimizer.state_dict()["state"]),
        "training": model.training,
    }


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# -- the swap mutation ---------------------------------------------------------------------


def test_swap_keeps_the_global_count_and_each_layers_bounds_on_erk_masks():
    model = sparse_model(density=0.45)  # ERK: attn.out starts at 0.6, above the 0.5 bound
    masks = {name: layer.mask.clone() for name, layer in masked_layers(model).items()}
    start = counts(masks)
    assert start["blocks.0.attn.out"] / masks["blocks.0.attn.out"].numel() > 0.5
    for seed in range(20):
        n = 400  # about 11% of the active weights: the caps bind
        new = swap_mutation(masks, n, (0.05, 0.5), torch.Generator().manual_seed(seed))
        after = counts(new)
        assert sum(after.values()) == sum(start.values())
        assert sum(int((new[k] & ~masks[k]).sum()) for k in masks) == n  # n grown
        assert sum(int((masks[k] & ~new[k]).sum()) for k in masks) == n  # n dropped
        for name, mask in new.items():
            size = mask.numel()
            assert after[name] >= math.ceil(0.05 * size)
            assert after[name] <= max(size // 2, start[name])
        assert after["blocks.0.attn.out"] <= start["blocks.0.attn.out"]  # never pushed higher


def test_swap_leaves_layers_at_a_bound_there_or_inside():
    shapes = {"low": (40, 50), "high": (40, 50), "free": (40, 50), "dense": (10, 10)}
    fill = {"low": 100, "high": 1000, "free": 600, "dense": 100}  # 5%, 50%, 30%, 100%
    generator = torch.Generator().manual_seed(0)
    masks = {}
    for name, shape in shapes.items():
        mask = torch.zeros(math.prod(shape), dtype=torch.bool)
        mask[torch.randperm(mask.numel(), generator=generator)[: fill[name]]] = True
        masks[name] = mask.view(shape)
    for seed in range(20):
        new = counts(swap_mutation(masks, 300, (0.05, 0.5), torch.Generator().manual_seed(seed)))
        assert sum(new.values()) == sum(fill.values())
        assert new["low"] >= 100 and new["high"] <= 1000 and new["dense"] <= 100
    # one dense layer has nowhere to grow: the mutation gives its drops back
    dense = {"dense": torch.ones(8, 8, dtype=torch.bool)}
    assert torch.equal(swap_mutation(dense, 5, (0.05, 0.5))["dense"], dense["dense"])


# -- scoring -------------------------------------------------------------------------------


def test_scoring_every_candidate_leaves_the_model_and_adam_bit_identical(text):
    model = sparse_model()
    track_dense_grads(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(3):
        train_step(model, optimizer, text.train[16 * step : 16 * (step + 1)])
    before = snapshot(model, optimizer)
    hook = make_hook(text)
    rows = hook.pool[0]
    candidates = hook.candidates(model, 999)
    terms = hook.score(model, candidates, rows)
    assert_same(snapshot(model, optimizer), before)
    assert all(math.isfinite(t["ce"]) and t["g"] > 0 and t["d"] > 0 for t in terms)
    assert len({t["ce"] for t in terms}) == len(terms)  # the candidates differ
    # the parent scores as the model itself does
    with torch.no_grad():
        logits = model(rows[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    assert terms[0]["ce"] == pytest.approx(float(ce), rel=1e-6)
    # eval mode is kept, and still nothing changes
    model.eval()
    before = snapshot(model, optimizer)
    score_candidate(model, candidates[1], rows)
    assert_same(snapshot(model, optimizer), before)


# -- the proxy -----------------------------------------------------------------------------


def test_proxy_matches_a_hand_computation():
    earlier = {"ce": [5.0, 4.0], "d": [0.02, 0.03], "g": [0.1, 0.3]}
    stats = {term: RunningStats() for term in earlier}
    for term, values in earlier.items():
        for value in values:
            stats[term].add(value)
    terms = [
        {"ce": 3.9, "d": 0.025, "g": 0.2},
        {"ce": 3.8, "d": 0.030, "g": 0.1},
        {"ce": 4.1, "d": 0.020, "g": 0.4},
    ]
    weights = {"ce": 1.0, "d": 0.01 * 0.25, "g": 0.005 * 0.25}
    scores = proxy_scores(terms, stats, weights)
    for values, score in zip(terms, scores, strict=True):
        expected = 0.0
        for term, sign in (("ce", 1), ("d", 1), ("g", -1)):
            seen = earlier[term] + [t[term] for t in terms]
            z = (values[term] - statistics.mean(seen)) / statistics.stdev(seen)
            expected += sign * weights[term] * z
        assert score == pytest.approx(expected, rel=1e-12)
    assert stats["ce"].count == 5
    # a single value normalises to 0
    assert proxy_scores([{"ce": 7.0}], {}, {"ce": 1.0}) == [0.0]


def test_annealing_reaches_zero_at_70_percent_and_ce_proxy_ignores_d_and_g(text):
    hook = make_hook(text, update_every=10)
    assert hook.n_updates(100) == 7  # after 10, 20, ..., 70 steps: t < 0.75 * 100
    assert hook.n_updates(100) == sum(hook.is_update(step, 100) for step in range(100))
    assert hook.term_weights(0, 10) == {"ce": 1.0, "d": 0.01, "g": 0.005}
    middle = hook.term_weights(3, 10)  # r = 3 / 7
    assert middle["d"] == pytest.approx(0.01 * (4 / 7) ** 2)
    assert middle["g"] == pytest.approx(0.005 * (4 / 7) ** 2)
    assert hook.term_weights(7, 10) == {"ce": 1.0, "d": 0.0, "g": 0.0}
    assert hook.term_weights(9, 10) == {"ce": 1.0, "d": 0.0, "g": 0.0}
    assert make_hook(text, proxy="ce+diversity").term_weights(0, 10)["g"] == 0.0
    ce_only = make_hook(text, proxy="ce")
    weights = ce_only.term_weights(0, 10)
    assert weights == {"ce": 1.0, "d": 0.0, "g": 0.0}
    terms = [{"ce": 4.0, "d": 0.0, "g": 9.0}, {"ce": 4.0, "d": 0.5, "g": 0.0}]
    first, second = proxy_scores(terms, {}, weights)
    assert first == second
    with pytest.raises(ValueError, match="proxy"):
        make_hook(text, proxy="gradient")


def test_a_stalled_validation_loss_raises_the_reset_probability_for_two_updates(text):
    hook = make_hook(text, patience=2, stalled_updates=2)
    state = _ModelState()
    losses = [3.0, 3.1, 3.2, 3.3, 3.4, 2.0, 2.1]
    seen = [hook._reset_probability(state, loss) for loss in losses]
    # stalled after updates 2 and 4 (2 in a row without a new best): the next two are raised
    assert seen == [0.01, 0.01, 0.01, 0.1, 0.1, 0.1, 0.1]
    assert (state.best_val, state.boost) == (2.0, 0)


# -- the winner, its Kaiming values and burn-in ----------------------------------------------


def test_the_winner_gets_its_scored_kaiming_values_and_zeroed_adam_state(text):
    model, optimizer = trained(text)
    hook, model, optimizer, winner = first_win(text, model, optimizer)
    grown_total = 0
    for name, layer in masked_layers(model).items():
        assert torch.equal(layer.mask, winner.masks[name])
        grown = winner.grown[name]
        grown_total += len(grown)
        values = layer.weight.detach().view(-1)[grown]
        assert torch.equal(values, winner.values[name])
        assert bool((values != 0).all())
        bound = 1 / math.sqrt(layer.in_features)
        assert bool((values.abs() <= bound).all())
        for moment in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[layer.weight][moment].view(-1)[grown].any()
    assert grown_total > 0
    # the model now scores what the winner was scored at (update 0 uses pool[0])
    rows = hook.pool[0]
    with torch.no_grad():
        logits = model(rows[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    assert hook.log[-1]["ce"] == pytest.approx(float(ce), rel=1e-6)


def test_burn_in_scales_only_the_regrown_weights_updates_by_1_5_for_5_steps(text):
    model, optimizer = trained(text)
    hook, model, optimizer, winner = first_win(text, model, optimizer)
    weights = {f"{name}.weight": name for name in masked_layers(model)}
    moved = 0
    for k in range(hook.burn_in_steps + 1):
        plain_model, plain_optimizer = copy.deepcopy((model, optimizer))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        rows = text.train[16 * (k + 3) : 16 * (k + 4)]
        train_step(model, optimizer, rows)
        train_step(plain_model, plain_optimizer, rows)
        hook(info(50 + k, model, optimizer))  # not an update step
        plain = dict(plain_model.named_parameters())
        for name, parameter in model.named_parameters():
            expected = plain[name].detach().clone()
            if name in weights and k < hook.burn_in_steps:
                grown = winner.grown[weights[name]]
                previous = before[name].view(-1)[grown]
                update = expected.view(-1)[grown] - previous
                expected.view(-1)[grown] = previous + 1.5 * update
                moved += int((update != 0).sum())
            assert torch.equal(parameter.detach(), expected), (k, name)
    assert moved > 0
    assert hook.hook_state("lm")["burn_in"] == {}  # over after 5 steps


# -- training with the hook, and resuming -----------------------------------------------------


def test_training_with_the_hook_keeps_the_exact_global_density(text):
    model = sparse_model()
    layers = masked_layers(model)
    active = sum(layer.nnz for layer in layers.values())
    start = {name: layer.nnz for name, layer in layers.items()}
    hook = make_hook(text, update_every=4, reset_probability=0.5)
    seen = []

    def check(info: StepInfo) -> None:
        seen.append(sum(layer.nnz for layer in layers.values()))

    config = TrainConfig(lr=3e-3, batch_size=16, max_tokens=16 * 40, device="cpu")
    [result] = train_saes([TrainSpec("lm", model, NextTokenLoss())], text.train, config,
                          hooks=[hook, check], progress=False)  # fmt: skip
    assert result.status == "complete"
    assert seen == [active] * 40
    assert len(hook.log) == hook.n_updates(40) == 7
    assert any(entry["winner"] for entry in hook.log)
    assert any(entry["reset"] for entry in hook.log)
    for entry in hook.log:
        assert len(entry["p"]) == 4 and 0 < entry["stability"] <= 1
        assert math.isfinite(entry["val_loss"]) and entry["search_seconds"] > 0
    for name, layer in layers.items():
        size = layer.mask.numel()
        assert math.ceil(0.05 * size) <= layer.nnz <= max(size // 2, start[name])
    seconds = hook.seconds("lm")
    overhead = (seconds["search_seconds"] + seconds["validation_seconds"]) / result.seconds
    print(f"mask search overhead, an update every 4 steps: {100 * overhead:.0f}% of step time")


def test_a_resumed_run_matches_an_uninterrupted_one_bit_for_bit(text, tmp_path):
    config = TrainConfig(lr=3e-3, batch_size=16, max_tokens=16 * 24, device="cpu",
                         checkpoint_every=12)  # fmt: skip
    settings = {"update_every": 4, "reset_probability": 0.5, "patience": 1, "t_end": 1.0}

    def run(folder, extra_hooks=()):
        model = sparse_model()
        hook = make_hook(text, **settings)
        hooks = [for_models(["lm"], hook), *extra_hooks]
        train_saes([TrainSpec("lm", model, NextTokenLoss())], text.train, config,
                   checkpoint_dir=folder, hooks=hooks, progress=False)  # fmt: skip
        return model, hook

    def kill(info: StepInfo) -> None:
        if info.step == 12:  # after the checkpoint of 12 steps
            raise RuntimeError("killed")

    whole_model, whole_hook = run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed", [kill])
    resumed_model, resumed_hook = run(tmp_path / "resumed")
    assert_same(resumed_model.state_dict(), whole_model.state_dict())
    assert len(whole_hook.log) == 5 and any(entry["reset"] for entry in whole_hook.log)
    assert any(entry["step"] == 11 for entry in resumed_hook.log)  # from the checkpoint
    strip = [{k: v for k, v in entry.items() if k not in TIMING} for entry in whole_hook.log]
    again = [{k: v for k, v in entry.items() if k not in TIMING} for entry in resumed_hook.log]
    assert again == strip
