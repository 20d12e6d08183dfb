"""Mask updaters and FLOPs in real training of a tiny LM on wiki text: every updater keeps each
layer's active count exactly; SET regrows exactly what it drops; RigL's drop counts follow the
cosine schedule and it grows where the dense gradient is largest; static magnitude pruning keeps
the largest weights; new connections start at zero with zeroed Adam moments; a killed and
resumed run equals an uninterrupted one; FLOPs count unmasked weights only."""

from __future__ import annotations

import math

import pytest
import torch

from saelib.sparse import (
    SET,
    FlopCounter,
    LMConfig,
    NextTokenLoss,
    RigL,
    StaticMagnitude,
    TextConfig,
    TransformerLM,
    drop_and_grow,
    flops_per_token,
    layer_counts,
    load_text,
    mask_linears,
    masked_layers,
    random_masks,
    track_dense_grads,
)
from saelib.training import StepInfo, TrainConfig, TrainSpec, for_models, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LMConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, d_mlp=64, context=16)
DENSITY = 0.2
STEPS = 40


@pytest.fixture(scope="module")
def rows() -> torch.Tensor:
    return load_text(TextConfig(context=TINY.context, max_documents=60, seed=0)).train


def sparse_model(seed: int = 0, rigl: bool = False) -> TransformerLM:
    model = mask_linears(TransformerLM(TINY, seed=seed))
    random_masks(model, DENSITY, seed=seed)
    if rigl:
        track_dense_grads(model)
    return model


def config(**changes) -> TrainConfig:
    fields = {"lr": 3e-3, "batch_size": 8, "max_tokens": 8 * STEPS, "device": "cpu"}
    return TrainConfig(**(fields | changes))


def counts(model) -> dict[str, int]:
    return {name: layer.nnz for name, layer in masked_layers(model).items()}


def masks(model) -> dict[str, torch.Tensor]:
    return {name: layer.mask.clone() for name, layer in masked_layers(model).items()}


class Recorder:
    """Masks before and after each step's updater (put one hook before, one after)."""

    def __init__(self):
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def snap(self, into: dict):
        def hook(info: StepInfo) -> None:
            into[info.step] = masks(info.results[0].model)

        return hook


@pytest.mark.parametrize("updater", ["set", "rigl"])
def test_dynamic_updaters_keep_counts_and_swap_exactly_what_they_log(rows, updater):
    model = sparse_model(rigl=updater == "rigl")
    start = counts(model)
    hook = SET(update_every=10, seed=3) if updater == "set" else RigL(update_every=10, seed=3)
    recorder = Recorder()
    hooks = [recorder.snap(recorder.before), hook, recorder.snap(recorder.after)]
    [result] = train_saes([TrainSpec("lm", model, NextTokenLoss())], rows, config(),
                          hooks=hooks, progress=False)  # fmt: skip
    assert counts(result.model) == start
    updates = [entry["step"] for entry in hook.log]
    assert updates == [9, 19]  # t = 10, 20 < T_end = 0.75 * 40 = 30
    for entry in hook.log:
        before, after = recorder.before[entry["step"]], recorder.after[entry["step"]]
        for name, changed in entry["changed"].items():
            grown = int((after[name] & ~before[name]).sum())
            dropped = int((before[name] & ~after[name]).sum())
            assert grown == dropped == changed  # regrows exactly what it drops
            nnz = start[name]
            if updater == "set":
                assert changed <= int(0.3 * nnz) and changed >= int(0.3 * nnz) // 2
            else:
                fraction = hook.drop_fraction(entry["step"], STEPS)
                assert changed <= int(fraction * nnz)


def test_rigl_drop_fraction_follows_the_cosine_schedule():
    rigl = RigL(update_every=10, alpha=0.3, t_end=0.75)
    assert rigl.drop_fraction(-1, 100) == pytest.approx(0.3)  # t = 0
    assert rigl.drop_fraction(74, 100) == pytest.approx(0.0, abs=1e-12)  # t = T_end
    t, t_end = 30, 75
    expected = 0.15 * (1 + math.cos(math.pi * t / t_end))
    assert rigl.drop_fraction(t - 1, 100) == pytest.approx(expected)
    assert rigl.is_update(29, 100) and not rigl.is_update(30, 100) and not rigl.is_update(79, 100)


def test_drop_and_grow_drops_smallest_grows_highest_and_resets_adam_state():
    layer = masked_layers(sparse_model())["blocks.0.mlp.up"]
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.weight.grad = torch.randn_like(layer.weight)
    optimizer.step()  # moments exist everywhere
    layer.after_optimizer_step()
    active = layer.mask.flatten().clone()
    weights = layer.weight.detach().flatten().clone()
    score = torch.rand(layer.weight.numel(), generator=torch.Generator().manual_seed(1))
    n = 20
    new = drop_and_grow(layer, n, score.view_as(layer.weight), optimizer)

    smallest = torch.topk(weights.abs().masked_fill(~active, math.inf), n, largest=False).indices
    kept = active.clone()
    kept[smallest] = False
    assert not layer.mask.flatten()[smallest[~new[smallest]]].any()  # dropped unless regrown
    grown = layer.mask.flatten() & ~kept
    best = torch.topk(score.masked_fill(kept, -math.inf), n).indices
    assert set(grown.nonzero().flatten().tolist()) == set(best.tolist())
    assert int(new.sum()) <= n and torch.equal(new, grown & ~active)
    assert (layer.weight.flatten()[new] == 0).all()
    state = optimizer.state[layer.weight]
    for moment in ("exp_avg", "exp_avg_sq"):
        assert (state[moment].flatten()[new] == 0).all()
        assert (state[moment].flatten()[~new] != 0).any()


def test_static_magnitude_keeps_the_largest_weights_per_layer_then_never_changes(rows):
    model = mask_linears(TransformerLM(TINY, seed=0))  # dense until the prune
    recorder = Recorder()
    hooks = [StaticMagnitude(DENSITY, at_step=4), recorder.snap(recorder.after)]
    weights = {}

    def before_prune(info: StepInfo) -> None:
        if info.step == 4:
            weights.update({n: m.weight.detach().clone() for n, m in masked_layers(model).items()})

    train_saes([TrainSpec("lm", model, NextTokenLoss())], rows, config(),
               hooks=[before_prune, *hooks], progress=False)  # fmt: skip
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    expected_counts = layer_counts(shapes, DENSITY)
    pruned = recorder.after[4]
    for name, mask in pruned.items():
        assert int(mask.sum()) == expected_counts[name]
        kept = weights[name].abs()[mask]
        dropped = weights[name].abs()[~mask]
        assert kept.min() >= dropped.max()
    assert all(torch.equal(recorder.after[STEPS - 1][n], pruned[n]) for n in pruned)
    assert all(int(recorder.after[3][n].sum()) == recorder.after[3][n].numel() for n in pruned)


def test_a_killed_and_resumed_rigl_run_equals_an_uninterrupted_one(rows, tmp_path):
    def run(folder, crash_at=None):
        def crash(info: StepInfo) -> None:
            if info.step == crash_at:
                raise KeyboardInterrupt

        specs = [TrainSpec("rigl", sparse_model(rigl=True), NextTokenLoss()),
                 TrainSpec("set", sparse_model(seed=1), NextTokenLoss())]  # fmt: skip
        hooks = [for_models(["rigl"], RigL(update_every=10, seed=2)),
                 for_models(["set"], SET(update_every=10, seed=2)), crash]  # fmt: skip
        return train_saes(specs, rows, config(checkpoint_every=15), folder, hooks=hooks,
                          progress=False)  # fmt: skip

    reference = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=22)  # after the checkpoint at 15 steps and an update at 19
    resumed = run(tmp_path / "b")
    for mine, theirs in zip(resumed, reference, strict=True):
        state, other = mine.model.state_dict(), theirs.model.state_dict()
        assert all(torch.equal(state[name], other[name]) for name in state), mine.name


def test_flops_count_unmasked_weights_and_rigl_updates_only_for_rigl_models(rows):
    dense = mask_linears(TransformerLM(TINY, seed=0))
    sparse = sparse_model()
    per_dense, per_sparse = flops_per_token(dense), flops_per_token(sparse)
    total = sum(layer.mask.numel() for layer in masked_layers(dense).values())
    nnz = sum(counts(sparse).values())
    assert (per_dense.forward, per_dense.backward) == (2 * total, 4 * total)
    assert (per_sparse.forward, per_sparse.backward) == (2 * nnz, 4 * nnz)
    assert per_sparse.dense == per_dense.dense > 0

    rigl = RigL(update_every=10)
    tokens = 8 * TINY.context
    counter = FlopCounter(tokens, rigl)
    specs = [TrainSpec("rigl", sparse_model(rigl=True), NextTokenLoss()),
             TrainSpec("set", sparse_model(), NextTokenLoss())]  # fmt: skip
    hooks = [counter, for_models(["rigl"], rigl), for_models(["set"], SET(update_every=10))]
    train_saes(specs, rows, config(), hooks=hooks, progress=False)
    plain = STEPS * tokens * per_sparse.sparse_training
    extra = 2 * tokens * 2 * (total - nnz)  # two updates, the gradient at masked positions
    assert counter.sparse["set"] == pytest.approx(plain)
    assert counter.sparse["rigl"] == pytest.approx(plain + extra)
    assert counter.total["set"] == pytest.approx(plain + STEPS * tokens * per_sparse.dense)
