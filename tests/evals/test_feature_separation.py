"""Feature separation: co-activation and decoder cosines against brute force, the recorder."""

from __future__ import annotations

import copy
import json
import math
import resource
import time

import numpy as np
import pytest
import torch

from saelib.evals.feature_separation import (
    SeparationRecorder,
    _PairCounter,
    coactivation_pairs,
    coactivation_stats,
    decoder_cosine_stats,
)
from saelib.saes import TopKConfig, TopKSAE
from saelib.saes.sparse_ops import dense_latents
from saelib.training import SAESpec, StepInfo, TrainConfig, train_saes


@pytest.fixture
def sparse_sae(make_sae) -> TopKSAE:
    """A TopK SAE whose negative encoder bias leaves some of the k kept latents at zero, and
    three latents that never fire."""
    sae = make_sae(d_in=8, d_sae=40, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(-0.8)
        sae.b_enc[:3] = -100.0
    return sae


def brute_force_n_ij(sae: TopKSAE, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (d_sae, d_sae) n_ij and the mask of pairs i != j that co-occur at least once."""
    with torch.no_grad():
        output = sae(acts)
    active = (dense_latents(output.acts, output.indices, sae.d_sae) > 0).double()
    together = active.T @ active
    n_ij = together / torch.diag(together).clamp_min(1)[None, :]
    return n_ij, (together > 0) & ~torch.eye(sae.d_sae, dtype=torch.bool)


@pytest.mark.parametrize("table", ["dense", "sparse"])
def test_n_ij_matches_a_dense_computation(sparse_sae, table, monkeypatch):
    if table == "sparse":  # the counting used when a d_sae x d_sae table would be too large
        monkeypatch.setattr(_PairCounter, "DENSE_MAX_ENTRIES", 0)
    acts = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (sparse_sae(acts).acts == 0).any(), "the case should include inactive top-k slots"
    dense, mask = brute_force_n_ij(sparse_sae, acts)
    i, j, n_ij, _ = coactivation_pairs(sparse_sae, acts, batch_size=64, max_pair_entries=100)
    expected_i, expected_j = torch.nonzero(mask, as_tuple=True)  # row-major, as keys sort
    assert torch.equal(i, expected_i) and torch.equal(j, expected_j)
    torch.testing.assert_close(n_ij.double(), dense[expected_i, expected_j])

    stats = coactivation_stats(sparse_sae, acts, bins=10)
    values = dense[mask].numpy()
    assert stats.n_pairs == len(values)
    assert stats.hist_counts == np.histogram(values, bins=10, range=(0, 1))[0].tolist()
    assert stats.frac_pairs_above[0.5] == pytest.approx((values > 0.5).mean())
    assert stats.mean_n_ij == pytest.approx(values.mean())
    fired = torch.diag(dense) > 0  # n_jj = 1 exactly when j is active at least once
    assert stats.n_active_latents == int(fired.sum()) == 37
    assert stats.mean_partners == pytest.approx(float(mask.sum(0)[fired].double().mean()))


def test_decoder_cosine_histogram_matches_brute_force(make_sae):
    sae = make_sae(d_in=8, d_sae=50)
    with torch.no_grad():
        sae.W_dec[7] = -sae.W_dec[3]  # |cos| = 1 must land in the last bin, not be dropped
    stats = decoder_cosine_stats(sae, bins=20, max_block_elements=120)  # 2 rows per block
    cos = (sae.W_dec @ sae.W_dec.T).detach().abs().clamp(max=1.0)
    upper = cos[tuple(torch.triu_indices(50, 50, offset=1))].numpy()
    assert stats.n_blocks == 25 and stats.n_pairs == len(upper) == 50 * 49 // 2
    assert stats.hist_counts == np.histogram(upper, bins=20, range=(0, 1))[0].tolist()
    assert stats.hist_counts[-1] >= 1
    assert stats.mean_abs_cos == pytest.approx(upper.mean(), rel=1e-5)
    assert stats.frac_pairs_above[0.5] == pytest.approx((upper > 0.5).mean())
    max_cos = cos.fill_diagonal_(0).amax(dim=1)
    assert stats.max_cos_mean == pytest.approx(float(max_cos.mean()), rel=1e-5)
    assert stats.max_cos_quantiles[1.0] == pytest.approx(1.0, abs=1e-6)
    assert sum(stats.max_cos_hist_counts) == 50


def test_decoder_cosine_samples_latents_with_a_seed_when_large(make_sae):
    sae = make_sae(d_in=8, d_sae=60)
    stats = decoder_cosine_stats(sae, max_latents=20, seed=3)
    assert stats.sampled and stats.n_latents_used == 20 and stats.n_pairs == 190
    assert decoder_cosine_stats(sae, max_latents=20, seed=3) == stats
    full = decoder_cosine_stats(sae)
    assert not full.sampled and full.n_pairs == 60 * 59 // 2
    assert stats.max_cos_quantiles[1.0] <= full.max_cos_quantiles[1.0] + 1e-6


def test_recorder_fires_exactly_at_the_progress_points(toy_acts, make_sae):
    config = TrainConfig(lr=1e-2, batch_size=64, epochs=1, device="cpu", log_every=1)
    acts = toy_acts[:640]
    total = config.total_steps(len(acts))
    recorder = SeparationRecorder(toy_acts[-256:], total_steps=total)
    seen, copies = [], {}

    def spy(info: StepInfo):
        seen.append((info.step, {name: len(snaps) for name, snaps in recorder.snapshots.items()}))
        if info.step + 1 in (3, 8):
            copies[info.step + 1] = copy.deepcopy(info.results[0].model)

    specs = [SAESpec("a", make_sae(seed=0)), SAESpec("b", make_sae(seed=1))]
    train_saes(specs, acts, config, hooks=[recorder, spy], progress=False)

    assert total == 10 and recorder.target_steps == {0.25: 3, 0.5: 5, 0.75: 8, 1.0: 10}
    counts = [sum(per_sae.values()) for _, per_sae in seen]
    before = [0, *counts[:-1]]
    grew = [step + 1 for (step, _), n, b in zip(seen, counts, before, strict=True) if n > b]
    assert grew == [3, 5, 8, 10] and counts[-1] == 8  # two SAEs, four points each
    for name in ("a", "b"):
        snapshots = recorder.snapshots[name]
        assert [s.step for s in snapshots] == [3, 5, 8, 10]
        assert [s.progress for s in snapshots] == [0.25, 0.5, 0.75, 1.0]
    for steps, sae in copies.items():
        snapshot = next(s for s in recorder.snapshots["a"] if s.step == steps)
        assert snapshot.decoder_cosine == decoder_cosine_stats(sae)
        assert snapshot.coactivation == coactivation_stats(sae, toy_acts[-256:])


def test_recorder_saves_finite_values(tmp_path, toy_acts, make_sae):
    config = TrainConfig(lr=1e-2, batch_size=128, epochs=1, device="cpu")
    recorder = SeparationRecorder(toy_acts[:200], (0.5, 1.0), total_steps=8)
    specs = [SAESpec("sae", make_sae())]
    train_saes(specs, toy_acts, config, hooks=[recorder], progress=False)
    saved = json.loads(recorder.save(tmp_path / "separation.json").read_text())
    snapshots = saved["snapshots"]["sae"]
    assert [s["step"] for s in snapshots] == [4, 8]
    numbers = _numbers(snapshots)
    assert len(numbers) > 100 and all(math.isfinite(x) for x in numbers)
    assert snapshots[0]["coactivation"]["n_samples"] == 200


def test_recorder_with_a_path_survives_an_interrupted_run(tmp_path, toy_acts, make_sae):
    config = TrainConfig(lr=1e-2, batch_size=128, epochs=1, device="cpu", checkpoint_every=2)
    path, checkpoints = tmp_path / "separation.json", tmp_path / "checkpoints"

    def stop_after_step_6(info: StepInfo):
        if info.step == 5:
            raise KeyboardInterrupt

    first = SeparationRecorder(toy_acts[:200], (0.25, 0.5, 1.0), total_steps=8, path=path)
    with pytest.raises(KeyboardInterrupt):
        train_saes([SAESpec("sae", make_sae())], toy_acts, config, checkpoints,
                   hooks=[first, stop_after_step_6], progress=False)  # fmt: skip
    assert [s.step for s in first.snapshots["sae"]] == [2, 4]

    again = SeparationRecorder(toy_acts[:200], (0.25, 0.5, 1.0), total_steps=8, path=path)
    assert again.snapshots == first.snapshots  # read back from the file, equal to the originals
    train_saes([SAESpec("sae", make_sae())], toy_acts, config, checkpoints,
               hooks=[again], progress=False)  # fmt: skip
    assert [s.step for s in again.snapshots["sae"]] == [2, 4, 8]
    with pytest.raises(ValueError, match="8-step run"):
        SeparationRecorder(toy_acts[:200], total_steps=16, path=path)


def test_recorder_snapshots_come_back_from_the_checkpoints(tmp_path, toy_acts, make_sae):
    """What another process's recorder took (SAE parallel): read back with the finished SAE."""
    config = TrainConfig(lr=1e-2, batch_size=128, epochs=1, device="cpu")
    checkpoints = tmp_path / "checkpoints"
    trained = SeparationRecorder(toy_acts[:200], (0.5, 1.0), total_steps=8)
    train_saes([SAESpec("sae", make_sae())], toy_acts, config, checkpoints,
               hooks=[trained], progress=False)  # fmt: skip
    elsewhere = SeparationRecorder(toy_acts[:200], (0.5, 1.0), total_steps=8)
    [result] = train_saes([SAESpec("sae", make_sae())], toy_acts, config, checkpoints,
                          hooks=[elsewhere], progress=False)  # fmt: skip
    assert result.status == "complete"  # loaded, not trained again
    assert [s.step for s in elsewhere.snapshots["sae"]] == [4, 8]
    assert elsewhere.snapshots == trained.snapshots


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for item in value.values() for x in _numbers(item)]
    if isinstance(value, list):
        return [x for item in value for x in _numbers(item)]
    return [float(value)] if isinstance(value, int | float) else []


def test_decoder_cosine_on_16k_latents_is_blockwise_and_quick():
    sae = TopKSAE(TopKConfig(d_in=576, d_sae=16_384), generator=torch.Generator().manual_seed(0))
    rss_before = _current_rss_bytes()
    peak_before = _peak_rss_bytes()
    started = time.perf_counter()
    stats = decoder_cosine_stats(sae)
    seconds = time.perf_counter() - started
    dense_matrix = 16_384**2 * 4  # 1 GiB: what a full float32 cosine matrix would take
    assert _peak_rss_bytes() <= max(peak_before, rss_before + dense_matrix // 2)
    assert stats.n_blocks == 16 and stats.block_rows * 16_384 <= 1 << 24
    assert not stats.sampled and stats.n_pairs == 16_384 * 16_383 // 2
    assert sum(stats.hist_counts) == stats.n_pairs
    assert 0.02 < stats.mean_abs_cos < 0.05  # random directions in 576 dims: about 0.033
    assert seconds < 60, f"took {seconds:.1f} s"  # ~4 s on an idle 2-core machine


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
