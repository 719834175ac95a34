"""Triton kernels for a LoRA adapter's first product with its input dropout drawn inside it.

Used by src/tunesmith/train/adapter_dropout.py (read its docstring first). With ``s = 1 / (1 − p)``:

    forward    h  = (x ⊙ keep · s) @ Aᵀ          x [T, K] (bf16/fp16), A [R, K] (the fp32 adapter weight), h [T, R]
    backward   dA = dhᵀ @ (x ⊙ keep · s)          fp32, summed over T in a few partial sums
               dx = (dh @ A) ⊙ keep · s

``keep`` is one Bernoulli(1 − p) draw per element of x and a pure function of (seed, row, column): Philox-4×32-10
(Triton's) keyed by the seed, with the counter (column group, row). One Philox call yields four 32-bit words; they
serve four columns ``LANE`` apart, so each call draws four elements' bits. Columns are walked in blocks of
``BLOCK = 4 × LANE``; the mapping (element → word) is fixed by these two constants, which forward, backward and
``keep_mask`` share. Nothing the size of x is written in forward or kept for backward: backward reads x again and
redraws the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

LANE = 32
"""Columns per Philox word lane; a block of ``4 × LANE`` columns takes one Philox call per row."""
BLOCK = 4 * LANE
ROWS = 64
"""Rows of x per tile."""


def forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float,
            launch: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """h = dropout(x) @ weightᵀ. ``x`` [T, K] contiguous; ``weight`` [R, K], any float dtype (cast to x's for the
    product); ``seed`` an int64 tensor of one element on x's device; ``launch`` wraps kernels for torch.library
    (``wrap_triton``) when called inside a custom op."""
    rows, cols = x.shape
    rank = weight.shape[0]
    h = torch.empty((rows, rank), device=x.device, dtype=x.dtype)
    if rows == 0:
        return h
    kernel = launch(_forward_kernel) if launch is not None else _forward_kernel
    kernel[(triton.cdiv(rows, ROWS),)](
        x, weight, h, seed, rows, cols, rank, x.stride(0), weight.stride(0), h.stride(0), p, 1.0 / (1.0 - p),
        ROWS=ROWS, RANK=_padded_rank(rank), LANE=LANE, num_warps=4)
    return h


def backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float,
             launch: Callable[[Any], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) for ``forward``'s output gradient ``grad`` [T, R]: dx in x's dtype, dweight in weight's.

    One pass over x: each program owns one block of columns and a share of the rows, redraws the keep bits once and
    uses them for both gradients. Its dweight share is a partial sum; the few partials (fixed in number, so the
    result is deterministic) are added at the end in fp32."""
    rows, cols = x.shape
    rank = weight.shape[0]
    dx = torch.empty_like(x)
    blocks = triton.cdiv(cols, BLOCK)
    splits = max(1, triton.cdiv(4 * _processors(x.device), blocks))
    tiles_per_split = triton.cdiv(triton.cdiv(rows, ROWS), splits)
    partial = torch.empty((splits, rank, cols), device=x.device, dtype=torch.float32)
    kernel = launch(_backward_kernel) if launch is not None else _backward_kernel
    kernel[(blocks, splits)](
        grad, x, weight, dx, partial, seed, rows, cols, rank, grad.stride(0), x.stride(0), weight.stride(0),
        p, 1.0 / (1.0 - p), tiles_per_split, ROWS=ROWS, RANK=_padded_rank(rank), LANE=LANE, num_warps=4)
    return dx, partial.sum(0).to(weight.dtype)


def keep_mask(rows: int, cols: int, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The [rows, cols] keep mask (bool) that ``forward``/``backward`` draw for ``seed`` — for tests."""
    out = torch.empty((rows, cols), device=seed.device, dtype=torch.int8)
    _mask_kernel[(triton.cdiv(rows, ROWS), triton.cdiv(cols, BLOCK))](
        out, seed, rows, cols, out.stride(0), p, ROWS=ROWS, LANE=LANE)
    return out.bool()


def _padded_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot wants every dimension ≥ 16


def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # Triton's interpreter (tests): a few splits, so the partial sums are exercised


@triton.jit
def _uniforms(seed, rows, block, LANE: tl.constexpr):
    """Four [rows, LANE] tensors of uniform [0, 1) draws for column block ``block``: one Philox call per element of
    the [rows, LANE] grid, counter (block · LANE + column, row)."""
    group = block * LANE + tl.arange(0, LANE)
    c0 = (group[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + group[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    return (tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1), tl.uint_to_uniform_float(r2),
            tl.uint_to_uniform_float(r3))


@triton.jit
def _dropped(x_ptr, stride_x, rows, row_ok, cols, n_cols, uniform, p, scale):
    """x[rows, cols] with dropped elements zeroed and kept ones scaled, in x's dtype; and the keep mask."""
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    keep = uniform >= p
    return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype), keep


@triton.jit
def _weight_columns(w_ptr, stride_w, ranks, n_ranks, cols, n_cols, dtype):
    """weight[ranks, cols] transposed to [cols, ranks], zero outside the matrix, in ``dtype``."""
    ok = (ranks < n_ranks)[None, :] & (cols < n_cols)[:, None]
    return tl.load(w_ptr + ranks[None, :] * stride_w + cols[:, None], mask=ok, other=0.0).to(dtype)


@triton.jit
def _forward_lane(acc, x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0, n_cols, uniform, p,
                  scale, LANE: tl.constexpr):
    cols = col0 + tl.arange(0, LANE)
    xd, _ = _dropped(x_ptr, stride_x, rows, row_ok, cols, n_cols, uniform, p, scale)
    w = _weight_columns(w_ptr, stride_w, ranks, n_ranks, cols, n_cols, xd.dtype)
    return tl.dot(xd, w, acc)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, h_ptr, seed_ptr, n_rows, n_cols, n_ranks, stride_x, stride_w, stride_h, p, scale,
                    ROWS: tl.constexpr, RANK: tl.constexpr, LANE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((ROWS, RANK), dtype=tl.float32)
    for block in tl.range(0, tl.cdiv(n_cols, 4 * LANE)):
        u0, u1, u2, u3 = _uniforms(seed, rows, block, LANE)
        col0 = block * 4 * LANE
        acc = _forward_lane(acc, x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0, n_cols, u0,
                            p, scale, LANE)
        acc = _forward_lane(acc, x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0 + LANE, n_cols,
                            u1, p, scale, LANE)
        acc = _forward_lane(acc, x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0 + 2 * LANE,
                            n_cols, u2, p, scale, LANE)
        acc = _forward_lane(acc, x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0 + 3 * LANE,
                            n_cols, u3, p, scale, LANE)
    ok = row_ok[:, None] & (ranks < n_ranks)[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_h + ranks[None, :], acc.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_lane(acc, grad, w_t, x_ptr, dx_ptr, stride_x, rows, row_ok, col0, n_cols, uniform, p, scale,
                   LANE: tl.constexpr):
    """One lane of a tile: accumulate dweight[:, cols] += gradᵀ @ dropped x; write dx[rows, cols]."""
    cols = col0 + tl.arange(0, LANE)
    xd, keep = _dropped(x_ptr, stride_x, rows, row_ok, cols, n_cols, uniform, p, scale)
    acc = tl.dot(tl.trans(grad), xd, acc)
    dx = tl.dot(grad, tl.trans(w_t))
    dx = tl.where(keep, dx * scale, 0.0)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    return acc


@triton.jit
def _store_partial(partial_ptr, split, n_ranks, n_cols, ranks, col0, acc, LANE: tl.constexpr):
    cols = col0 + tl.arange(0, LANE)
    ok = (ranks < n_ranks)[:, None] & (cols < n_cols)[None, :]
    offset = split.to(tl.int64) * n_ranks * n_cols + ranks[:, None] * n_cols + cols[None, :]
    tl.store(partial_ptr + offset, acc, mask=ok)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, w_ptr, dx_ptr, partial_ptr, seed_ptr, n_rows, n_cols, n_ranks, stride_g,
                     stride_x, stride_w, p, scale, tiles_per_split,
                     ROWS: tl.constexpr, RANK: tl.constexpr, LANE: tl.constexpr):
    block = tl.program_id(0)
    split = tl.program_id(1)
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    col0 = block * 4 * LANE
    dtype = x_ptr.dtype.element_ty
    lane = tl.arange(0, LANE)
    w0 = _weight_columns(w_ptr, stride_w, ranks, n_ranks, col0 + lane, n_cols, dtype)
    w1 = _weight_columns(w_ptr, stride_w, ranks, n_ranks, col0 + LANE + lane, n_cols, dtype)
    w2 = _weight_columns(w_ptr, stride_w, ranks, n_ranks, col0 + 2 * LANE + lane, n_cols, dtype)
    w3 = _weight_columns(w_ptr, stride_w, ranks, n_ranks, col0 + 3 * LANE + lane, n_cols, dtype)
    a0 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a1 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a2 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a3 = tl.zeros((RANK, LANE), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_rows, ROWS))
    for tile in tl.range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        g_ok = row_ok[:, None] & (ranks < n_ranks)[None, :]
        grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_g + ranks[None, :], mask=g_ok, other=0.0)
        grad = grad.to(dtype)
        u0, u1, u2, u3 = _uniforms(seed, rows, block, LANE)
        a0 = _backward_lane(a0, grad, w0, x_ptr, dx_ptr, stride_x, rows, row_ok, col0, n_cols, u0, p, scale, LANE)
        a1 = _backward_lane(a1, grad, w1, x_ptr, dx_ptr, stride_x, rows, row_ok, col0 + LANE, n_cols, u1, p, scale,
                            LANE)
        a2 = _backward_lane(a2, grad, w2, x_ptr, dx_ptr, stride_x, rows, row_ok, col0 + 2 * LANE, n_cols, u2, p,
                            scale, LANE)
        a3 = _backward_lane(a3, grad, w3, x_ptr, dx_ptr, stride_x, rows, row_ok, col0 + 3 * LANE, n_cols, u3, p,
                            scale, LANE)
    _store_partial(partial_ptr, split, n_ranks, n_cols, ranks, col0, a0, LANE)
    _store_partial(partial_ptr, split, n_ranks, n_cols, ranks, col0 + LANE, a1, LANE)
    _store_partial(partial_ptr, split, n_ranks, n_cols, ranks, col0 + 2 * LANE, a2, LANE)
    _store_partial(partial_ptr, split, n_ranks, n_cols, ranks, col0 + 3 * LANE, a3, LANE)


@triton.jit
def _mask_kernel(out_ptr, seed_ptr, n_rows, n_cols, stride_o, p, ROWS: tl.constexpr, LANE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    block = tl.program_id(1)
    seed = tl.load(seed_ptr)
    u0, u1, u2, u3 = _uniforms(seed, rows, block, LANE)
    col0 = block * 4 * LANE
    _store_keep(out_ptr, stride_o, rows, n_rows, col0, n_cols, u0, p, LANE)
    _store_keep(out_ptr, stride_o, rows, n_rows, col0 + LANE, n_cols, u1, p, LANE)
    _store_keep(out_ptr, stride_o, rows, n_rows, col0 + 2 * LANE, n_cols, u2, p, LANE)
    _store_keep(out_ptr, stride_o, rows, n_rows, col0 + 3 * LANE, n_cols, u3, p, LANE)


@triton.jit
def _store_keep(out_ptr, stride_o, rows, n_rows, col0, n_cols, uniform, p, LANE: tl.constexpr):
    cols = col0 + tl.arange(0, LANE)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], (uniform >= p).to(tl.int8), mask=ok)
