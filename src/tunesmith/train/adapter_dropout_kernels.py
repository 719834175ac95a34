"""Triton kernels for a LoRA adapter's first product with its input dropout drawn inside it.

Used by src/tunesmith/train/adapter_dropout.py (read its docstring first). With ``s = 1 / (1 − p)``:

    forward    h  = s · (x ⊙ keep) @ Aᵀ           x [T, K] (bf16/fp16), A [R, K] (the fp32 adapter weight), h [T, R]
    backward   dA = s · dhᵀ @ (x ⊙ keep)          fp32, summed over T in a few partial sums
               dx = s · (dh @ A) ⊙ keep

``keep`` is one Bernoulli(1 − p) draw per element of x, a pure function of (seed, row, column): Philox-4×32 keyed by
that seed with the counter (column group, row) gives four 32-bit words, i.e. eight 16-bit draws, for eight columns
``LANE`` apart; an element is kept when its draw is ≥ round(p · 2¹⁶) — p is used rounded to a multiple of 2⁻¹⁶
(0.05 → 0.0500031) and ``s`` is computed from the rounded value, so E[x ⊙ keep · s] = x exactly. 7 Philox rounds:
the smallest count its authors found to pass the BigCrush battery with no failures (Salmon et al., SC'11, "Parallel
random numbers: as easy as 1, 2, 3"); 10 is their safety margin for general use. A first version (10 rounds, one
draw per 32-bit word, the scale applied per element, a backward that spilled registers) made the 8B LoRA step 2–3%
slower than PEFT's dropout; this one makes it 3.6% faster (bench/results/fast_engine.md, "Seventh run").

Columns are walked in blocks of ``BLOCK = 8 × LANE``; the mapping (element → word, half) is fixed by these
constants, which forward, backward and ``keep_mask`` share. Nothing the size of x is written in forward or kept for
backward: backward reads x again and redraws the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl

LANE = 32
"""Columns one 16-bit half of a Philox word serves; a block of ``8 × LANE`` columns takes one Philox call per row."""
BLOCK = 8 * LANE
ROUNDS = 7
"""Philox rounds (see the module docstring)."""
FORWARD_ROWS, FORWARD_WARPS = 32, 4
"""Rows of x per forward program (~T / 32 programs: every SM busy on packed rows of a few thousand tokens)."""
BACKWARD_ROWS, BACKWARD_WARPS = 64, 8
"""Rows per backward tile; 8 warps hold its eight lanes' accumulators and Philox words without spilling (ptxas -v
on sm_90a: 245 registers, no spills; with 4 warps it spilled)."""


def threshold(p: float) -> int:
    """Draws (16-bit) below this are dropped: p rounded to a multiple of 2⁻¹⁶."""
    return min(65535, round(p * 65536))


def effective_p(p: float) -> float:
    """The dropout probability the kernels apply for ``p``."""
    return threshold(p) / 65536


def forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float,
            launch: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """h = dropout(x) @ weightᵀ. ``x`` [T, K] contiguous; ``weight`` [R, K] (R ≤ adapter_dropout.MAX_RANK), any
    float dtype (cast to x's for the product); ``seed`` an int64 tensor of one element on x's device; ``launch``
    wraps kernels for torch.library (``wrap_triton``) when called inside a custom op."""
    rows, cols = x.shape
    rank = weight.shape[0]
    h = torch.empty((rows, rank), device=x.device, dtype=x.dtype)
    if rows == 0:
        return h
    kernel = launch(_forward_kernel) if launch is not None else _forward_kernel
    kernel[(triton.cdiv(rows, FORWARD_ROWS),)](
        x, weight, h, seed, rows, cols, rank, x.stride(0), weight.stride(0), h.stride(0), threshold(p),
        1.0 / (1.0 - effective_p(p)), ROWS=FORWARD_ROWS, RANK=_padded_rank(rank), LANE=LANE, ROUNDS=ROUNDS,
        num_warps=FORWARD_WARPS)
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
    tiles_per_split = triton.cdiv(triton.cdiv(rows, BACKWARD_ROWS), splits)
    partial = torch.empty((splits, rank, cols), device=x.device, dtype=torch.float32)
    kernel = launch(_backward_kernel) if launch is not None else _backward_kernel
    kernel[(blocks, splits)](
        grad, x, weight, dx, partial, seed, rows, cols, rank, grad.stride(0), x.stride(0), weight.stride(0),
        threshold(p), 1.0 / (1.0 - effective_p(p)), tiles_per_split, ROWS=BACKWARD_ROWS, RANK=_padded_rank(rank),
        LANE=LANE, ROUNDS=ROUNDS, num_warps=BACKWARD_WARPS)
    return dx, partial.sum(0).to(weight.dtype)


def keep_mask(rows: int, cols: int, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The [rows, cols] keep mask (bool) that ``forward``/``backward`` draw for ``seed`` — for tests."""
    out = torch.empty((rows, cols), device=seed.device, dtype=torch.int8)
    _mask_kernel[(triton.cdiv(rows, BACKWARD_ROWS), triton.cdiv(cols, BLOCK))](
        out, seed, rows, cols, out.stride(0), threshold(p), ROWS=BACKWARD_ROWS, LANE=LANE, ROUNDS=ROUNDS)
    return out.bool()


def _padded_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot wants every dimension ≥ 16


@cache
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # Triton's interpreter (tests): a few splits, so the partial sums are exercised


@triton.jit
def _words(seed, rows, block, LANE: tl.constexpr, ROUNDS: tl.constexpr):
    """Philox's four 32-bit words for each (row, column group) of column block ``block``: [rows, LANE] each."""
    group = block * LANE + tl.arange(0, LANE)
    c0 = (group[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + group[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, c1, zero, zero, ROUNDS)


@triton.jit
def _keep(word, HIGH: tl.constexpr, threshold):
    """The keep decisions in one 16-bit half of ``word``."""
    bits = word >> 16 if HIGH else word & 0xFFFF
    return bits.to(tl.int32) >= threshold


@triton.jit
def _masked_x(x_ptr, stride_x, rows, row_ok, cols, n_cols, keep):
    """x[rows, cols] with dropped elements zeroed (unscaled), in x's dtype."""
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    return tl.where(keep, x, 0.0)


@triton.jit
def _weight_columns(w_ptr, stride_w, ranks, n_ranks, cols, n_cols, dtype):
    """weight[ranks, cols] transposed to [cols, ranks], zero outside the matrix, in ``dtype``."""
    ok = (ranks < n_ranks)[None, :] & (cols < n_cols)[:, None]
    return tl.load(w_ptr + ranks[None, :] * stride_w + cols[:, None], mask=ok, other=0.0).to(dtype)


@triton.jit
def _forward_lane(acc, x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0, n_cols, keep,
                  LANE: tl.constexpr):
    cols = col0 + tl.arange(0, LANE)
    xk = _masked_x(x_ptr, stride_x, rows, row_ok, cols, n_cols, keep)
    return tl.dot(xk, _weight_columns(w_ptr, stride_w, ranks, n_ranks, cols, n_cols, xk.dtype), acc)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, h_ptr, seed_ptr, n_rows, n_cols, n_ranks, stride_x, stride_w, stride_h, threshold,
                    scale, ROWS: tl.constexpr, RANK: tl.constexpr, LANE: tl.constexpr, ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((ROWS, RANK), dtype=tl.float32)
    args = (x_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks)
    for block in tl.range(0, tl.cdiv(n_cols, 8 * LANE)):
        r0, r1, r2, r3 = _words(seed, rows, block, LANE, ROUNDS)
        col0 = block * 8 * LANE
        acc = _forward_lane(acc, *args, col0, n_cols, _keep(r0, False, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + LANE, n_cols, _keep(r0, True, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + 2 * LANE, n_cols, _keep(r1, False, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + 3 * LANE, n_cols, _keep(r1, True, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + 4 * LANE, n_cols, _keep(r2, False, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + 5 * LANE, n_cols, _keep(r2, True, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + 6 * LANE, n_cols, _keep(r3, False, threshold), LANE)
        acc = _forward_lane(acc, *args, col0 + 7 * LANE, n_cols, _keep(r3, True, threshold), LANE)
    ok = row_ok[:, None] & (ranks < n_ranks)[None, :]
    out = (acc * scale).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_h + ranks[None, :], out, mask=ok)


@triton.jit
def _backward_lane(acc, grad, x_ptr, dx_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks, col0, n_cols,
                   keep, scale, LANE: tl.constexpr):
    """One lane of a tile: accumulate dweight[:, cols] += gradᵀ @ (x ⊙ keep) (scaled at the end); write dx. The
    weight's columns are re-read (from cache) rather than held: registers go to the accumulators."""
    cols = col0 + tl.arange(0, LANE)
    acc = tl.dot(tl.trans(grad), _masked_x(x_ptr, stride_x, rows, row_ok, cols, n_cols, keep), acc)
    w_t = _weight_columns(w_ptr, stride_w, ranks, n_ranks, cols, n_cols, grad.dtype)
    dx = tl.where(keep, tl.dot(grad, tl.trans(w_t)) * scale, 0.0)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    return acc


@triton.jit
def _store_partial(partial_ptr, split, n_ranks, n_cols, ranks, col0, acc, scale, LANE: tl.constexpr):
    cols = col0 + tl.arange(0, LANE)
    ok = (ranks < n_ranks)[:, None] & (cols < n_cols)[None, :]
    offset = split.to(tl.int64) * n_ranks * n_cols + ranks[:, None] * n_cols + cols[None, :]
    tl.store(partial_ptr + offset, acc * scale, mask=ok)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, w_ptr, dx_ptr, partial_ptr, seed_ptr, n_rows, n_cols, n_ranks, stride_g,
                     stride_x, stride_w, threshold, scale, tiles_per_split,
                     ROWS: tl.constexpr, RANK: tl.constexpr, LANE: tl.constexpr, ROUNDS: tl.constexpr):
    block = tl.program_id(0)
    split = tl.program_id(1)
    ranks = tl.arange(0, RANK)
    seed = tl.load(seed_ptr)
    col0 = block * 8 * LANE
    dtype = x_ptr.dtype.element_ty
    a0 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a1 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a2 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a3 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a4 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a5 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a6 = tl.zeros((RANK, LANE), dtype=tl.float32)
    a7 = tl.zeros((RANK, LANE), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_rows, ROWS))
    for tile in tl.range(first, last):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        g_ok = row_ok[:, None] & (ranks < n_ranks)[None, :]
        grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_g + ranks[None, :], mask=g_ok, other=0.0)
        grad = grad.to(dtype)
        r0, r1, r2, r3 = _words(seed, rows, block, LANE, ROUNDS)
        x = (x_ptr, dx_ptr, w_ptr, stride_x, stride_w, rows, row_ok, ranks, n_ranks)
        a0 = _backward_lane(a0, grad, *x, col0, n_cols, _keep(r0, False, threshold), scale, LANE)
        a1 = _backward_lane(a1, grad, *x, col0 + LANE, n_cols, _keep(r0, True, threshold), scale, LANE)
        a2 = _backward_lane(a2, grad, *x, col0 + 2 * LANE, n_cols, _keep(r1, False, threshold), scale, LANE)
        a3 = _backward_lane(a3, grad, *x, col0 + 3 * LANE, n_cols, _keep(r1, True, threshold), scale, LANE)
        a4 = _backward_lane(a4, grad, *x, col0 + 4 * LANE, n_cols, _keep(r2, False, threshold), scale, LANE)
        a5 = _backward_lane(a5, grad, *x, col0 + 5 * LANE, n_cols, _keep(r2, True, threshold), scale, LANE)
        a6 = _backward_lane(a6, grad, *x, col0 + 6 * LANE, n_cols, _keep(r3, False, threshold), scale, LANE)
        a7 = _backward_lane(a7, grad, *x, col0 + 7 * LANE, n_cols, _keep(r3, True, threshold), scale, LANE)
    out = (partial_ptr, split, n_ranks, n_cols, ranks)
    _store_partial(*out, col0, a0, scale, LANE)
    _store_partial(*out, col0 + LANE, a1, scale, LANE)
    _store_partial(*out, col0 + 2 * LANE, a2, scale, LANE)
    _store_partial(*out, col0 + 3 * LANE, a3, scale, LANE)
    _store_partial(*out, col0 + 4 * LANE, a4, scale, LANE)
    _store_partial(*out, col0 + 5 * LANE, a5, scale, LANE)
    _store_partial(*out, col0 + 6 * LANE, a6, scale, LANE)
    _store_partial(*out, col0 + 7 * LANE, a7, scale, LANE)


@triton.jit
def _mask_kernel(out_ptr, seed_ptr, n_rows, n_cols, stride_o, threshold, ROWS: tl.constexpr, LANE: tl.constexpr,
                 ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    block = tl.program_id(1)
    seed = tl.load(seed_ptr)
    r0, r1, r2, r3 = _words(seed, rows, block, LANE, ROUNDS)
    col0 = block * 8 * LANE
    out = (out_ptr, stride_o, rows, n_rows)
    _store_keep(*out, col0, n_cols, _keep(r0, False, threshold), LANE)
    _store_keep(*out, col0 + LANE, n_cols, _keep(r0, True, threshold), LANE)
    _store_keep(*out, col0 + 2 * LANE, n_cols, _keep(r1, False, threshold), LANE)
    _store_keep(*out, col0 + 3 * LANE, n_cols, _keep(r1, True, threshold), LANE)
    _store_keep(*out, col0 + 4 * LANE, n_cols, _keep(r2, False, threshold), LANE)
    _store_keep(*out, col0 + 5 * LANE, n_cols, _keep(r2, True, threshold), LANE)
    _store_keep(*out, col0 + 6 * LANE, n_cols, _keep(r3, False, threshold), LANE)
    _store_keep(*out, col0 + 7 * LANE, n_cols, _keep(r3, True, threshold), LANE)


@triton.jit
def _store_keep(out_ptr, stride_o, rows, n_rows, col0, n_cols, keep, LANE: tl.constexpr):
    cols = col0 + tl.arange(0, LANE)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], keep.to(tl.int8), mask=ok)
