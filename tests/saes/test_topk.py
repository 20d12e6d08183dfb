"""TopK SAE: the sparse kernels against dense formulas, decoder constraints, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from saelib.saes import TopKConfig, TopKSAE, geometric_median, load_sae
from saelib.saes.sparse_ops import dense_latents, top_k

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _randomise_biases(sae: TopKSAE, seed: int = 1) -> TopKSAE:
    """Give b_enc and b_dec non-trivial values (both start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(sae.d_sae, generator=generator))
        sae.b_dec.copy_(0.3 * torch.randn(sae.d_in, generator=generator))
    return sae


def _dense_reference(params: dict[str, torch.Tensor], x: torch.Tensor, k: int):
    """The TopK SAE written densely: every op is plain autograd over (batch, d_sae)."""
    pre = (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    latents = torch.zeros_like(pre).scatter(1, indices, torch.relu(values))
    return latents @ params["W_dec"] + params["b_dec"], indices


def test_sparse_decode_equals_dense_formula(make_sae):
    sae = _randomise_biases(make_sae(d_in=16, d_sae=64, k=6))
    generator = torch.Generator().manual_seed(2)
    indices = torch.rand(32, 64, generator=generator).argsort(dim=1)[:, :6]
    acts = torch.relu(torch.randn(32, 6, generator=generator))  # some exact zeros
    dense = dense_latents(acts, indices, sae.d_sae) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae.decode(acts, indices), dense, rtol=0, atol=1e-5)


# k=40 of 64 selects many negative pre-activations; k=6 of 256 takes top_k's chunked path
@pytest.mark.parametrize(("d_sae", "k"), [(64, 4), (64, 40), (256, 6)])
def test_sparse_gradients_match_dense_reference(make_sae, d_sae, k):
    sae = _randomise_biases(make_sae(d_in=16, d_sae=d_sae, k=k))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(48, 16, generator=generator)
    target = torch.randn(48, 16, generator=generator)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    params = {name: getattr(sae, name).detach().clone().requires_grad_() for name in names}

    x_sparse = x.clone().requires_grad_()
    out = sae(x_sparse)
    (out.recon - target).pow(2).mean().backward()

    x_dense = x.clone().requires_grad_()
    recon, indices = _dense_reference(params, x_dense, k)
    (recon - target).pow(2).mean().backward()

    assert torch.equal(out.indices.sort(dim=1).values, indices.sort(dim=1).values)
    torch.testing.assert_close(out.recon, recon, rtol=0, atol=1e-5)
    for name in names:
        torch.testing.assert_close(getattr(sae, name).grad, params[name].grad, **TOL)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, **TOL)


@pytest.mark.parametrize("ties", [False, True])
# chunked on two levels (8 of 1024), on one (16 of 256); torch.topk itself for 5 of 256
@pytest.mark.parametrize(("k", "d"), [(8, 1024), (16, 256), (5, 256)])
def test_top_k_selects_the_k_largest_values(k, d, ties):
    pre = torch.randn(64, d, generator=torch.Generator().manual_seed(4))
    if ties:  # few distinct values: ties at every row's k-th largest
        pre = pre.mul(2).round()
    values, indices = top_k(pre, k)
    expected = pre.topk(k, dim=-1).values
    assert torch.equal(values.sort(dim=1).values, expected.sort(dim=1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct latents per row


@pytest.mark.parametrize("k", [0, 65])
def test_k_outside_range_is_rejected(k):
    with pytest.raises(ValueError, match=f"k={k}"):
        TopKConfig(d_in=16, d_sae=64, k=k).validate()
    with pytest.raises(ValueError, match=f"k={k}"):
        TopKSAE(TopKConfig(d_in=16, d_sae=64, k=k))


def test_normalize_decoder_gives_unit_rows_same_directions(make_sae):
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.1, 5.0, sae.d_sae)[:, None])
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder()
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    cosine = torch.nn.functional.cosine_similarity(before, sae.W_dec.detach(), dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_remove_parallel_decoder_grad_leaves_orthogonal_gradient(make_sae):
    sae = make_sae()
    sae.W_dec.grad = torch.randn(sae.W_dec.shape, generator=torch.Generator().manual_seed(4))
    original = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    along_rows = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(along_rows, torch.zeros_like(along_rows), rtol=0, atol=1e-6)
    # only the parallel part is removed: what was taken away is a multiple of each row
    rows = sae.W_dec.detach()
    removed = original - sae.W_dec.grad
    off_row = removed - (removed * rows).sum(dim=1, keepdim=True) * rows
    torch.testing.assert_close(off_row, torch.zeros_like(off_row), rtol=0, atol=1e-5)
    assert (sae.W_dec.grad - original).abs().max() > 1e-3  # it did change something


def _distance_sum(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    return (points - centre).norm(dim=-1).sum(dim=-1)


def test_geometric_median_beats_mean_perturbations_and_grid():
    generator = torch.Generator().manual_seed(5)
    points = torch.cat([torch.randn(40, 2, generator=generator), torch.tensor([[30.0, -20.0]])])
    median = geometric_median(points)
    best = _distance_sum(points, median)
    mean = points.mean(dim=0)
    assert best < _distance_sum(points, mean) - 1.0  # the outlier drags the mean away
    for direction in torch.randn(16, 2, generator=generator):
        assert best <= _distance_sum(points, median + 1e-2 * direction) + 1e-4
    # brute force: no point of a fine grid around the data does better
    axis = torch.linspace(-3, 3, 301)
    grid = torch.cartesian_prod(axis, axis)
    grid_sums = (grid[:, None, :] - points[None]).norm(dim=-1).sum(dim=1)
    assert best <= grid_sums.min() + 1e-4


def test_geometric_median_of_symmetric_set_is_its_centre():
    centre = torch.tensor([1.0, -2.0, 3.0])
    offsets = torch.cat([torch.eye(3), -torch.eye(3), 2 * torch.eye(3), -2 * torch.eye(3)])
    torch.testing.assert_close(geometric_median(centre + offsets), centre)
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])  # odd count: the middle point
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("use_decoder_bias", [True, False])
def test_save_load_round_trip(make_sae, tmp_path, use_decoder_bias):
    sae = make_sae(k=5, use_decoder_bias=use_decoder_bias)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    folder = sae.save(tmp_path / "sae", extra={"trained_steps": 7})
    assert json.loads((folder / "config.json").read_text())["trained_steps"] == 7

    loaded = load_sae(folder)
    assert isinstance(loaded, TopKSAE)
    assert loaded.config == sae.config
    state, loaded_state = sae.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[name], loaded_state[name]) for name in state)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    expected, actual = sae(x), loaded(x)
    assert torch.equal(expected.recon, actual.recon)
    assert torch.equal(expected.indices, actual.indices)


def test_load_without_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sae(tmp_path)


def test_load_unknown_architecture_raises(make_sae, tmp_path):
    folder = make_sae().save(tmp_path / "sae")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architecture": "nope"}))
    with pytest.raises(ValueError, match="nope"):
        load_sae(folder)
