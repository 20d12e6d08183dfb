"""Sparse building blocks for TopK-style SAEs.

A TopK SAE keeps k of d_sae latents per row. Only the dense encoder product is unavoidable; the
decoder and every backward pass need just the k selected latents, which makes them
O(batch * k * d_in) instead of O(batch * d_sae * d_in).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

# top_k's chunk length: on CPU (d_sae 2048..32768, k 16..128) 8 was about the best of 4..32
TOP_K_CHUNK = 8


def top_k(pre_acts: Tensor, k: int, chunk: int = TOP_K_CHUNK) -> tuple[Tensor, Tensor]:
    """``pre_acts.topk(k, dim=-1, sorted=False)`` for a (batch, d) matrix: the same values (the
    indices may differ only among tied values), on CPU by selections over fewer values.

    Each row's d values fall into d / chunk strided chunks (columns j, j + d / chunk, ...); take
    the k chunks with the largest maxima (recursively), then the k largest of their k * chunk
    values. Those are the row's k largest: with t the k-th largest chunk maximum, every value
    above t lies in a chosen chunk (its chunk's maximum is above t), and the row's k-th largest
    value is at least t (the k chosen maxima are k of the row's values), so the chosen chunks
    hold all of the row's top k values, or, when that k-th value equals t, k values >= it.
    torch.topk costs 3-7 ns per value on CPU; a max over strided chunks is a vectorised pass.
    """
    batch, d = pre_acts.shape
    quick_already = k < 8 and d <= 2048  # torch.topk: up to 2x faster there (batch 256..1024)
    if pre_acts.device.type != "cpu" or d % chunk or 2 * k * chunk > d or quick_already:
        return pre_acts.topk(k, dim=-1, sorted=False)
    n_chunks = d // chunk
    maxima = pre_acts.reshape(batch, chunk, n_chunks).amax(dim=1)
    chosen = top_k(maxima, k, chunk)[1]
    offsets = torch.arange(0, d, n_chunks, device=pre_acts.device)
    columns = (chosen[:, :, None] + offsets).view(batch, k * chunk)
    values, picked = pre_acts.gather(1, columns).topk(k, dim=-1, sorted=False)
    return values, columns.gather(1, picked)


class LatentBags:
    """The entries of a (batch, k) ``indices`` grouped by latent: a bag of batch rows per latent,
    in embedding_bag's form. Made on first use (one sort) and then shared: the encoder's and the
    decoder's weight gradients of a TopK step group the same entries."""

    def __init__(self, indices: Tensor, n_latents: int):
        self.indices, self.n_latents = indices, n_latents
        self._bags: tuple[Tensor, Tensor, Tensor] | None = None

    def get(self) -> tuple[Tensor, Tensor, Tensor]:
        """(batch row of each entry grouped by latent, each latent's first position, the order
        of the flattened entries that groups them)."""
        if self._bags is None:
            sorted_latents, order = self.indices.reshape(-1).sort()
            latents = torch.arange(self.n_latents, device=self.indices.device)
            starts = torch.searchsorted(sorted_latents, latents)
            self._bags = (order // self.indices.shape[1], starts, order)
        return self._bags


class _GatherPreacts(torch.autograd.Function):
    """Pre-activations at chosen latents, with a backward that touches only those latents.

    The forward receives the values already computed by the dense encoder product (under
    no_grad) and just passes them through; the backward builds the encoder gradients from the
    k selected latents of each row. The input enters as ``x`` and ``b_dec`` (pre = (x - b_dec)
    W_enc^T + b_enc): b_dec's gradient is then -(b_enc's gradient) W_enc, a vector times the
    encoder, and the input's own gradient is only formed when ``x`` requires one.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, values, indices, bags: LatentBags):
        ctx.save_for_backward(x, b_dec, W_enc, indices)
        ctx.bags = bags
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, b_dec, W_enc, indices = ctx.saved_tensors
        grad = grad.to(W_enc.dtype)  # bf16 under autocast; embedding_bag needs the weight's dtype
        needs_x, needs_b_dec, needs_W, needs_b = ctx.needs_input_grad[:4]
        grad_x = grad_b_dec = grad_W = grad_b = None
        if needs_x:
            grad_x = F.embedding_bag(indices, W_enc, per_sample_weights=grad, mode="sum")
        if needs_W:
            grad_W = _sparse_transpose_matmul(grad, ctx.bags, x - b_dec)
        if needs_b or needs_b_dec:  # per-latent sums bag by bag: no atomic adds (CUDA-stable)
            per_latent = _sparse_transpose_matmul(grad, ctx.bags, grad.new_ones(len(x), 1))
            grad_b = per_latent.squeeze(1)
            grad_b_dec = -(grad_b @ W_enc) if needs_b_dec else None
        return grad_x, grad_b_dec, grad_W, grad_b if needs_b else None, None, None, None


class _PreactColumns(torch.autograd.Function):
    """Some columns of the pre-activations, given their values, with the gradients of
    pre = (x - b_dec) W^T + b, where W and b are those columns' encoder rows and bias.

    The forward passes the values through (they are columns of the dense encoder product
    already computed under no_grad): no second encoder product. The backward is the dense one.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W, b, values):
        ctx.save_for_backward(x, b_dec, W)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, b_dec, W = ctx.saved_tensors
        grad = grad.to(W.dtype)  # bf16 under autocast
        needs_x, needs_b_dec, needs_W, needs_b = ctx.needs_input_grad[:4]
        grad_b = grad.sum(dim=0)
        grad_x = grad @ W if needs_x else None
        grad_W = torch.addr(grad.T @ x, grad_b, b_dec, alpha=-1) if needs_W else None
        grad_b_dec = -(grad_b @ W) if needs_b_dec else None  # a vector times W, as above
        return grad_x, grad_b_dec, grad_W, grad_b if needs_b else None, None


def preact_columns(x: Tensor, b_dec: Tensor, W: Tensor, b: Tensor, values: Tensor) -> Tensor:
    """Differentiable ``(x - b_dec) @ W.T + b`` given its ``values`` (W, b: some latents'
    encoder rows and biases)."""
    return _PreactColumns.apply(x, b_dec, W, b, values)


def _sparse_transpose_matmul(values: Tensor, bags: LatentBags, x: Tensor) -> Tensor:
    """G^T @ x where G is (batch, n_latents) with ``values`` at the bags' indices, else zeros.

    Row l of the result is sum over the (row b, slot j) with indices[b, j] == l of
    values[b, j] * x[b]: with the entries grouped by latent that is one embedding_bag over x
    with a bag per latent (empty bags give zero rows). This beats both torch.sparse.mm and the
    sort inside embedding_bag's own weight backward by about 2x on CPU.
    """
    rows, starts, order = bags.get()
    weights = values.reshape(-1)[order].to(x.dtype)
    return F.embedding_bag(rows, x, starts, per_sample_weights=weights, mode="sum")


def gather_preacts(
    x: Tensor,
    b_dec: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    values: Tensor,
    indices: Tensor,
    bags: LatentBags | None = None,
) -> Tensor:
    """Differentiable ``((x - b_dec) @ W_enc.T + b_enc).gather(1, indices)`` given its
    ``values``."""
    bags = bags or LatentBags(indices, W_enc.shape[0])
    return _GatherPreacts.apply(x, b_dec, W_enc, b_enc, values, indices, bags)


def sparse_decode(
    acts: Tensor, indices: Tensor, W_dec: Tensor, bags: LatentBags | None = None
) -> Tensor:
    """sum_j acts[:, j] * W_dec[indices[:, j]], without forming the dense latent matrix.

    The gradient for ``acts`` comes from embedding_bag's own backward; the one for ``W_dec`` from
    :func:`_sparse_transpose_matmul` (faster than embedding_bag's weight backward).
    """
    recon = F.embedding_bag(
        indices, W_dec.detach(), per_sample_weights=acts.to(W_dec.dtype), mode="sum"
    )
    bags = bags or LatentBags(indices, W_dec.shape[0])
    return _DecoderWeightGrad.apply(recon, W_dec, acts.detach(), bags)


class _DecoderWeightGrad(torch.autograd.Function):
    """Identity on the reconstruction that routes its gradient into the decoder weights.

    :func:`sparse_decode` runs embedding_bag on a detached ``W_dec``; this node gives ``W_dec``
    the gradient it would have had: G^T @ grad, G the (batch, d_sae) matrix of ``acts``.
    """

    @staticmethod
    def forward(ctx, recon: Tensor, W_dec: Tensor, acts: Tensor, bags: LatentBags):
        ctx.save_for_backward(acts)
        ctx.bags = bags
        return recon.view_as(recon)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (acts,) = ctx.saved_tensors
        grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = _sparse_transpose_matmul(acts, ctx.bags, grad)
        return grad, grad_W, None, None


def dense_latents(acts: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """Scatter sparse (acts, indices) into a dense (batch, d_sae) matrix."""
    return acts.new_zeros(acts.shape[0], d_sae).scatter_(1, indices, acts)
