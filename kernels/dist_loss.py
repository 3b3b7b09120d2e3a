"""Fused DIST loss kernels (Triton) and their launchers.

Notation (see docs/design.md): S, T are the student / teacher logits viewed as N rows x C classes
(for a 4-D (B, C, H, W) tensor, row n = b*H*W + h*W + w). With x = S/tau and y = T/tau,

    p = softmax(x),  q = softmax(y)                                  (row-wise, fp32, max-subtracted)

Row (inter) Pearson term, per kept row i:

    a = p_i - mean(p_i),  b = q_i - mean(q_i),  ab_i = <a, b>,  na_i = ||a||,  nb_i = ||b||
    D_i = na_i * nb_i + eps,  r_i = ab_i / D_i     (eps = 1e-8, passed in: fastdist.loss.stats.EPS)

Column (intra) statistics over the kept rows, per class j:

    mu_p[j], mu_q[j],  M2_p[j] = sum_i (p_ij - mu_p[j])^2,  M2_q[j] likewise,
    C_pq[j] = sum_i (p_ij - mu_p[j]) (q_ij - mu_q[j])

Forward: ``dist_forward_records`` (statistics kernel) writes one record per chunk of rows;
``dist_finalize`` (one-program finalize kernel) merges them and writes the loss, col_coef and
row_coef (formulas in fastdist.loss.stats). ``dist_forward_stats`` returns the merged statistics
row_stats = [sum_i r_i, M] (float64 (2,)) and col_stats = [mu_p, mu_q, M2_p, M2_q, C_pq]
(float64 (5, C)) instead (torch backend parity, ``intra_sync``).

Backward (``dist_backward``), closed form. With A = p - mu_p, B = q - mu_q and the coefficients
computed by the front-end (col_coef = [mu_p, mu_q, kB, kA_s, kA_t] (5, C), row_coef = [w_row]):

    G_ij = w_row * (b_ij / D_i - ab_i nb_i / (na_i D_i^2) a_ij) + kB_j B_ij - kA_s_j A_ij   (= dL/dp_ij)
    H_ij = w_row * (a_ij / D_i - ab_i na_i / (nb_i D_i^2) b_ij) + kB_j A_ij - kA_t_j B_ij   (= dL/dq_ij)
    dL/dS_ij = grad_out / tau * p_ij (G_ij - sum_k p_ik G_ik)
    dL/dT_ij = grad_out / tau * q_ij (H_ij - sum_k q_ik H_ik)

(the row term whose norm in the denominator is 0 is taken as 0); masked rows get exactly 0.

Memory access: the logits are read in place through strides, never copied. Element (n, c) of a
(N, C) tensor is at n*stride(0) + c*stride(1); of a (B, C, H, W) tensor (NCHW-contiguous or
channels-last) at b*stride(0) + hw*stride_hw + c*stride(1), with b = n // (H*W), hw = n % (H*W) and
stride_hw the single stride of the flattened (H, W) pair. A 4-D tensor whose H, W cannot be flattened
into one stride (e.g. a transposed H/W view) is made contiguous by the launcher (one copy); its
gradient is then copied back into a tensor with the input's strides. Row indices are int32
(N < 2^31 - 2^20 is checked); element offsets are int64.

Two layouts (``tile_params``, a fixed function of C, never tuned)
-----------------------------------------------------------------
* *Row layout* (C <= 21: the segmentation recipes). A group is [64, BLOCK_C] with one row per
  thread and all of its classes in that thread's registers (2 warps; the loads have contiguity 1 so
  that Triton's coalescer keeps this layout). C is a constexpr, so the padded classes of BLOCK_C are
  compile-time constants and fold away; the row reductions (max, sums, <a, b>, norms) stay inside the
  thread; loads use clamped row and class indices instead of masks. Each thread keeps Welford
  statistics of the rows it owns (fp32, at most MERGE_GROUPS <= 32 rows per record), reduced across
  the program once per record with the exact multi-set Chan form in a fixed tree.
* *Tile layout* (larger C). A group is a [GROUP_ROWS, BLOCK_C] tile with the classes spread over
  threads (about 4 elements per thread); row reductions are shuffles. For every group the kernel
  computes, in fp32 registers, the kept-row count, the column means and the *centred* sums of
  squares / co-moment (two passes over the tile in registers, so no catastrophic cancellation), and
  merges the groups of a chunk sequentially, in row order, with the exact Chan et al. update.
* Both: the softmax runs in base 2 (exp2 of x * log2(e)/tau minus the row max, log2(e)/tau from the
  host), one approximate reciprocal per row instead of a division per element, and the rows are
  centred before normalisation (a = p - mean(p) = (e - mean(e)) / sum(e): one FMA per element).

Determinism and accuracy scheme
-------------------------------
* All reductions use one fixed register layout per (C, dtypes, flags), i.e. one fixed summation order.
* Forward: a *chunk* (record) is MERGE_GROUPS consecutive groups (for large N 2048 rows in the row
  layout, 256 rows for C <= 128 down to 64 rows for C >= 512 in the tile layout; shorter for small N
  so that there are >= 132 programs, e.g. 64 rows at 16k rows and C=19: a fixed function of (N, C),
  ``_merge_groups``). Each chunk writes one partial record (fp32, [sum r, count] and
  [mu_p, mu_q, M2_p, M2_q, C_pq]) - no atomics. The partial buffer is 20 bytes per class per chunk
  (1-8% of bf16 logits for large N).
* The autotuned parameters are CHUNKS_PER_PROGRAM (forward) / GROUPS_PER_PROGRAM (backward), i.e.
  how many consecutive chunks / groups one program walks through. They change neither
  the tile, nor the chunk boundaries, nor any summation order, so every config produces bitwise
  identical partial records and gradients.
* Finalize: one program merges the chunk records in float64 (the multi-set form of the Chan merge:
  mu = sum n_k mu_k / n, M2 = sum M2_k + sum n_k (mu_k - mu)^2, C_pq = sum C_k + sum n_k dp_k dq_k),
  records accumulated in a fixed [BLOCK_R, BLOCK_C] tile then reduced, so the order depends on
  (R, C) only. Column statistics are thus accurate for N up to many
  millions of rows (fp32 error only within one chunk of <= 2048 rows, fp64 beyond).
* The backward has no cross-row reduction; its per-row sums use a fixed tile
  [BWD_GROUP_ROWS, BLOCK_C] in the same layout, again a function of C only, so gradients are also
  identical across configs.
* ONE_IMAGE (a constexpr the launcher derives from the shape: H*W % GROUP_ROWS == 0, or one image)
  lets a group compute its image index once, so that NCHW loads are seen as contiguous along rows
  and coalesced; it depends on the shape only, never on the tuned parameters.
* What "bitwise across configs" rests on, on a GPU: for a fixed tile shape, num_warps and flags,
  Triton's layout (hence reduction order) does not depend on num_stages or on the constexpr loop trip
  count. That holds by construction of Triton's passes; it was not measured on hardware here.

Conditioning note: when a column (or row) has (near) zero variance, D = nA*nB + 1e-8 ~ 1e-8 and the
closed form multiplies rounding noise in A, B by k/1e-8. That is a property of the loss definition
(fp64 shows it too); the coefficients must come from these kernels' own statistics.

Autotuning: a small in-module tuner (``_pick_config``) benchmarks the candidate configs once per key
with ``triton.testing.do_bench`` on CUDA, keyed on (C, dtypes, stride pattern, flags, N bucket).
Under TRITON_INTERPRET=1, with FASTDIST_AUTOTUNE=0, or while a CUDA graph is being captured, the
default config is used (no benchmarking); so is it for the row layout's forward, which has a single
candidate. Tests can run any config explicitly with the ``config=`` argument of the launchers, and
tests/aot compiles every candidate (``aot_kernel_specs``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "MAX_C",
    "FWD_CONFIGS",
    "BWD_CONFIGS",
    "tile_params",
    "dist_forward_records",
    "dist_merge_records",
    "dist_finalize",
    "dist_forward_stats",
    "dist_backward",
    "aot_kernel_specs",
    "report_specs",
    "program_plan",
]

# Largest number of classes supported: a whole row lives in registers.
MAX_C = 2048

# Autotune candidates: the rows-per-program multiplier; they never change the arithmetic. num_stages
# is 1: num_stages=2 gave byte-identical SASS for every variant (sm_90, C=19; the loops' loads are
# not pipelined), so those configs were dropped.
FWD_CONFIGS = tuple({"CHUNKS_PER_PROGRAM": c, "num_stages": 1} for c in (1, 4))
BWD_CONFIGS = tuple({"GROUPS_PER_PROGRAM": g, "num_stages": 1} for g in (1, 8))
# used without tuning (interpreter, FASTDIST_AUTOTUNE=0, CUDA graph capture)
_FWD_DEFAULT = FWD_CONFIGS[0]
# The row layout's forward is not tuned: its records are long for large N (2048 rows) and short for
# small N so that the grid fills the GPU, and the outer chunk loop of CHUNKS_PER_PROGRAM > 1 spilled
# (12 bytes, C=19 with mask, sm_80 / sm_90, 200 registers).
_ROW_FWD_CONFIGS = (_FWD_DEFAULT,)
_BWD_DEFAULT = BWD_CONFIGS[0]

# Default epsilon of the row term's denominator D_i = ||a|| ||b|| + eps, the DIST definition's 1e-8;
# fastdist.loss passes its own (fastdist.loss.stats.EPS) explicitly
ROW_EPS = 1e-8

# Largest C of the row layout (one row per thread, see ``tile_params``): its registers grow with C
# (~7C in the forward, ~9C in the backward); at C = 22 the sm_90 forward spilled (bf16, no mask,
# no divisibility hints, records of 2048 rows), up to 21 none does (tests/aot compiles C = 21).
# VOC's 21, Cityscapes' 19, CamVid's 11 classes.
_ROW_LAYOUT_MAX_C = 21

# Triton decides at decoration time whether kernels run in the interpreter.
_INTERPRET = bool(triton.knobs.runtime.interpret)


def tile_params(C: int) -> dict:
    """Fixed (never tuned) tile geometry for C classes: BLOCK_C, ROW_LAYOUT, GROUP_ROWS, MERGE_GROUPS,
    BWD_GROUP_ROWS, num_warps, maxnreg (forward) and bwd_maxnreg.

    C <= 21 (the segmentation recipes: 19, 21, 11 classes): the *row layout*, one logits row per
    thread with all of its classes in that thread's registers (64-row groups, 2 warps). Row
    reductions stay inside a thread, padded classes are compile-time constants that fold away (C is a
    constexpr), and the forward accumulates column statistics per thread, reducing them across the
    program once per record (2048 rows for large N). Larger C: a [GROUP_ROWS, BLOCK_C] tile with the
    classes spread over threads, about 4 fp32 elements per thread (row reductions are shuffles).
    Both fit their register budget without spilling (checked by tests/aot for sm_80 / sm_90).
    """
    if C < 2:
        raise ValueError(f"DIST loss needs at least 2 classes, got C={C}")
    if C > MAX_C:
        raise ValueError(f"fused DIST kernels support at most C={MAX_C} classes, got C={C}; "
                         "use the torch backend")
    block_c = max(2, triton.next_power_of_2(C))
    if C <= _ROW_LAYOUT_MAX_C:
        # registers per thread: 5 column accumulators and both rows' exps per class (forward), the
        # rows and 4 coefficients per class (backward); 200 / 232 registers: no spill for C <= 21
        # (tests/aot; at 168 the sm_90a forward spilled to the stack). 2 warps: 64-row groups, so
        # 16k rows still give 256 programs; records of up to 32 groups (2048 rows) amortise the
        # once-per-record reduction across threads (~2300 warp-instructions per warp, sm_90a).
        return {"BLOCK_C": block_c, "ROW_LAYOUT": True, "GROUP_ROWS": 64, "MERGE_GROUPS": 32,
                "BWD_GROUP_ROWS": 64, "num_warps": 2, "maxnreg": 200, "bwd_maxnreg": 232}
    if block_c <= 256:
        num_warps = 4
    elif block_c <= 1024:
        num_warps = 8
    else:
        num_warps = 16
    # 4 elements of a tile per thread: 8 spilled under a 128-register budget in some variants
    group_rows = max(1, 4 * 32 * num_warps // block_c)
    # rows merged in-kernel into one forward record for large N: 256 for C <= 128, down to 64 for
    # C >= 512 (a record is 20*C bytes; this keeps the partial buffer at ~1-8% of bf16 logits);
    # ``_merge_groups`` shortens records for small N so that the forward fills the GPU
    chunk_rows = min(256, max(64, 32768 // block_c))
    merge_groups = max(1, chunk_rows // group_rows)
    # An explicit register budget: without .maxnreg, ptxas (CUDA 12.8) capped some forward variants
    # at 80 registers and spilled a few bytes although more registers were free. 128 keeps at least
    # 16 warps per SM resident.
    return {"BLOCK_C": block_c, "ROW_LAYOUT": False, "GROUP_ROWS": group_rows, "MERGE_GROUPS": merge_groups,
            "BWD_GROUP_ROWS": group_rows, "num_warps": num_warps, "maxnreg": 128, "bwd_maxnreg": 128}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_exp(
    ptr,  # logits base pointer (any float dtype)
    row_base,  # [GROUP_ROWS] int64 element offset of each row (b*stride_b + hw*stride_hw)
    row_ok,  # [GROUP_ROWS] bool, row < N (ignored with ROW_LAYOUT: the rows are clamped in range)
    cols,  # [BLOCK_C] int32 class index
    stride_c,  # element stride between classes
    x_scale,  # log2(e) / tau (fp32, from the host): the softmax runs in base 2 (exp2)
    C: tl.constexpr,  # number of classes
    ROW_LAYOUT: tl.constexpr,  # one row per thread (see tile_params)
):
    col_ok = cols < C  # [BLOCK_C]
    if ROW_LAYOUT:
        # clamped class index instead of a mask: every load is in bounds (the rows are clamped by
        # _row_index), so no predicate is built, and the padded classes' loads, never used, are dead
        # code; contiguity 1 keeps the coalescer from vectorising along rows or classes, which would
        # spread one row over several threads
        offs = row_base[:, None] + tl.minimum(cols, C - 1)[None, :].to(tl.int64) * stride_c
        offs = tl.max_contiguous(offs, [1, 1])  # [GROUP_ROWS, BLOCK_C]
        x = tl.load(ptr + offs).to(tl.float32)  # [GROUP_ROWS, BLOCK_C]
    else:
        offs = row_base[:, None] + cols[None, :].to(tl.int64) * stride_c  # [GROUP_ROWS, BLOCK_C]
        ld_ok = row_ok[:, None] & col_ok[None, :]  # [GROUP_ROWS, BLOCK_C]
        x = tl.load(ptr + offs, mask=ld_ok, other=0.0).to(tl.float32)  # [GROUP_ROWS, BLOCK_C]
    # padded classes -> -inf and probability exactly 0 (with C a constexpr and a row per thread,
    # these are compile-time constants); padded rows stay finite
    x = tl.where(col_ok[None, :], x, float("-inf"))  # [GROUP_ROWS, BLOCK_C]
    # max of the raw logits (x_scale > 0, checked by the launchers): exp2(x * x_scale - max * x_scale)
    # is one FMA per element
    x_max = tl.max(x, axis=1) * x_scale  # [GROUP_ROWS]
    # [GROUP_ROWS, BLOCK_C] = exp((s - max s) / tau)
    e = tl.where(col_ok[None, :], tl.exp2(x * x_scale - x_max[:, None]), 0.0)
    sum_e = tl.sum(e, axis=1)  # [GROUP_ROWS], >= 1
    # softmax p = e * inv_sum: one approximate reciprocal per row, not a division per element
    return e, sum_e, tl.fdiv(1.0, sum_e)  # [GROUP_ROWS, BLOCK_C], [GROUP_ROWS], [GROUP_ROWS]


@triton.jit
def _row_index(
    first_row,  # int32 scalar: first row of the group
    r_off,  # [GROUP_ROWS] int32: 0 .. GROUP_ROWS-1
    N,  # number of rows
    HW,  # rows per image
    ONE_IMAGE: tl.constexpr,  # no group straddles two images (HW % GROUP_ROWS == 0, or one image)
    ROW_LAYOUT: tl.constexpr,  # clamp the rows into [0, N): loads without masks
):
    # Row indices are int32 (the launcher checks N < 2^31 - 2^20): a 64-bit division would be a
    # call to an emulation routine, whose ABI spills registers. Offsets are formed in int64 later.
    rows = first_row + r_off  # [GROUP_ROWS] int32
    if ONE_IMAGE:
        # image index is a scalar and hw = scalar + arange: in the tile layout the compiler sees rows
        # that are contiguous in memory for NCHW input (row stride 1) and coalesces the loads along
        # rows; the row layout clamps hw (so one row stays in one thread) and saves the division
        first = first_row
        if ROW_LAYOUT:  # rows past N read row N-1 (a group past N: the last row of the last image)
            first = tl.minimum(first_row, N - 1)
        b_idx = first // HW
        hw_idx = (first - b_idx * HW) + r_off  # [GROUP_ROWS]
        if ROW_LAYOUT:
            hw_idx = tl.minimum(hw_idx, HW - 1)
    else:
        in_range = rows
        if ROW_LAYOUT:
            in_range = tl.minimum(rows, N - 1)
        b_idx = in_range // HW  # [GROUP_ROWS]
        hw_idx = in_range - b_idx * HW  # [GROUP_ROWS]
    return rows, b_idx.to(tl.int64), hw_idx.to(tl.int64)


@triton.jit
def _row_pearson(
    e_s,  # [GROUP_ROWS, BLOCK_C] student exp (0 on padded classes), p = e_s * inv_s
    sum_s,  # [GROUP_ROWS] row sum of e_s
    inv_s,  # [GROUP_ROWS] 1 / sum_s
    e_t,  # [GROUP_ROWS, BLOCK_C] teacher exp, q = e_t * inv_t
    sum_t,  # [GROUP_ROWS] row sum of e_t
    inv_t,  # [GROUP_ROWS] 1 / sum_t
    cols,  # [BLOCK_C] int32 class index
    eps,  # epsilon of the row term's denominator D_i = ||a|| ||b|| + eps (fastdist.loss.stats.EPS)
    C: tl.constexpr,  # number of classes
):
    """(ea, eb, <a, b>, ||a||, ||b||, 1 / (||a|| ||b|| + eps)) of each row, with a = p - mean(p) =
    inv_s * ea and b = q - mean(q) = inv_t * eb: the rows are centred before normalisation (one FMA
    per element) and the per-row factors applied to the three sums."""
    col_ok = (cols < C)[None, :]  # [1, BLOCK_C]
    ea = tl.where(col_ok, e_s - (sum_s * (1.0 / C))[:, None], 0.0)  # [GROUP_ROWS, BLOCK_C]
    eb = tl.where(col_ok, e_t - (sum_t * (1.0 / C))[:, None], 0.0)  # [GROUP_ROWS, BLOCK_C]
    ab = tl.sum(ea * eb, axis=1) * (inv_s * inv_t)  # [GROUP_ROWS]
    na = tl.sqrt(tl.sum(ea * ea, axis=1)) * inv_s  # [GROUP_ROWS]
    nb = tl.sqrt(tl.sum(eb * eb, axis=1)) * inv_t  # [GROUP_ROWS]
    # approximate reciprocal: the denominator is >= eps (1e-8), far from the denormal range
    return ea, eb, ab, na, nb, tl.fdiv(1.0, na * nb + eps)


@triton.jit
def _kept_rows(
    m_ptr,  # keep-mask, uint8 (N,)
    rows,  # [GROUP_ROWS] int32 row index (may be >= N)
    N,  # number of rows
    HAS_MASK: tl.constexpr,  # whether m_ptr is read
):
    kept = rows < N  # [GROUP_ROWS]
    if HAS_MASK:
        kept = kept & (tl.load(m_ptr + tl.minimum(rows, N - 1)) != 0)
    return kept


@triton.jit
def _store_record(
    row_part_ptr,  # out: float32 (num_chunks, 2) contiguous
    col_part_ptr,  # out: float32 (num_chunks, 5, C) contiguous
    chunk,  # int32 record index
    num_chunks,  # number of records (programs past it store nothing)
    cols,  # [BLOCK_C] int32 class index
    sum_r, count,  # scalars: sum of r_i and kept rows of the chunk
    mu_p, mu_q, m2_p, m2_q, c_pq,  # [BLOCK_C] column statistics of the chunk
    C: tl.constexpr,  # number of classes
):
    rec_ok = chunk < num_chunks
    tl.store(row_part_ptr + chunk * 2, sum_r, mask=rec_ok)
    tl.store(row_part_ptr + chunk * 2 + 1, count, mask=rec_ok)
    st_ok = (cols < C) & rec_ok  # [BLOCK_C]
    rec = col_part_ptr + chunk.to(tl.int64) * 5 * C + cols  # [BLOCK_C] pointers
    tl.store(rec, mu_p, mask=st_ok)
    tl.store(rec + C, mu_q, mask=st_ok)
    tl.store(rec + 2 * C, m2_p, mask=st_ok)
    tl.store(rec + 3 * C, m2_q, mask=st_ok)
    tl.store(rec + 4 * C, c_pq, mask=st_ok)


@triton.jit
def _group_rows(
    s_ptr,  # student logits
    t_ptr,  # teacher logits
    m_ptr,  # keep-mask, uint8 (N,); only read when HAS_MASK
    first_row,  # int32 scalar: first row of the group
    r_off,  # [GROUP_ROWS] int32: 0 .. GROUP_ROWS-1
    cols,  # [BLOCK_C] int32 class index
    N,  # number of rows
    HW,  # rows per image
    s_sb, s_shw, s_sc,  # student strides: image, row of one image, class
    t_sb, t_shw, t_sc,  # teacher strides
    x_scale,  # log2(e) / tau
    eps,  # epsilon of the row term's denominator
    C: tl.constexpr,  # number of classes
    HAS_MASK: tl.constexpr,  # whether m_ptr is read
    ONE_IMAGE: tl.constexpr,  # no group straddles two images
    ROW_LAYOUT: tl.constexpr,  # one row per thread
):
    """(p, q, kept, r) of one group: the softmaxes ([GROUP_ROWS, BLOCK_C], 0 on a dropped row when
    HAS_MASK or in the tile layout, where they are reduced over rows), the kept rows and r_i (0 when
    not kept). Where(), not a product with the 0/1 mask: excluded rows may hold NaN/inf."""
    rows, b_idx, hw_idx = _row_index(first_row, r_off, N, HW, ONE_IMAGE, ROW_LAYOUT)  # [GROUP_ROWS] each
    row_ok = rows < N  # [GROUP_ROWS]
    e_s, sum_s, inv_s = _row_exp(s_ptr, b_idx * s_sb + hw_idx * s_shw, row_ok, cols, s_sc, x_scale, C,
                                 ROW_LAYOUT)
    e_t, sum_t, inv_t = _row_exp(t_ptr, b_idx * t_sb + hw_idx * t_shw, row_ok, cols, t_sc, x_scale, C,
                                 ROW_LAYOUT)
    kept = _kept_rows(m_ptr, rows, N, HAS_MASK)  # [GROUP_ROWS]
    _ea, _eb, ab, na, nb, inv_d = _row_pearson(e_s, sum_s, inv_s, e_t, sum_t, inv_t, cols, eps, C)
    p = e_s * inv_s[:, None]  # [GROUP_ROWS, BLOCK_C]
    q = e_t * inv_t[:, None]  # [GROUP_ROWS, BLOCK_C]
    if HAS_MASK or not ROW_LAYOUT:
        p = tl.where(kept[:, None], p, 0.0)  # [GROUP_ROWS, BLOCK_C]
        q = tl.where(kept[:, None], q, 0.0)  # [GROUP_ROWS, BLOCK_C]
    return p, q, kept, tl.where(kept, ab * inv_d, 0.0)  # ..., [GROUP_ROWS] r_i


@triton.jit
def _dist_fwd_kernel(
    s_ptr,  # student logits, element (n, c) at b*s_sb + hw*s_shw + c*s_sc
    t_ptr,  # teacher logits, element (n, c) at b*t_sb + hw*t_shw + c*t_sc
    m_ptr,  # keep-mask, uint8 (N,) contiguous; only read when HAS_MASK
    row_part_ptr,  # out: float32 (num_chunks, 2) contiguous, per chunk [sum of r_i, kept rows]
    col_part_ptr,  # out: float32 (num_chunks, 5, C) contiguous, per chunk [mu_p, mu_q, M2_p, M2_q, C_pq]
    N,  # number of rows
    HW,  # rows per image (H*W for 4-D input, N for 2-D input)
    s_sb,  # student stride between images (0 for 2-D)
    s_shw,  # student stride between consecutive rows of one image
    s_sc,  # student stride between classes
    t_sb,  # teacher stride between images (0 for 2-D)
    t_shw,  # teacher stride between consecutive rows of one image
    t_sc,  # teacher stride between classes
    x_scale,  # log2(e) / tau
    eps,  # epsilon of the row term's denominator
    num_chunks,  # number of partial records = cdiv(N, GROUP_ROWS * MERGE_GROUPS)
    C: tl.constexpr,  # number of classes
    BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    GROUP_ROWS: tl.constexpr,  # rows per register tile (fixed by C)
    MERGE_GROUPS: tl.constexpr,  # groups merged into one partial record (fixed by N, C)
    CHUNKS_PER_PROGRAM: tl.constexpr,  # tuned: consecutive chunks handled by one program
    HAS_MASK: tl.constexpr,  # whether m_ptr is read
    ONE_IMAGE: tl.constexpr,  # no group of GROUP_ROWS rows straddles two images
    ROW_LAYOUT: tl.constexpr,  # one row per thread (C <= 21, see tile_params)
):
    """Statistics kernel: one record per chunk of MERGE_GROUPS groups.

    Row layout: each thread keeps Welford statistics of the rows it owns (fp32, at most MERGE_GROUPS
    rows per record); once per record they are merged across the program with the exact multi-set
    Chan form (mu = sum n_t mu_t / n, M2 = sum M2_t + n_t (mu_t - mu)^2), a fixed tree. Tile layout:
    each group's column statistics are reduced over the tile (centred, two passes in registers) and
    Chan-merged, group by group in row order, into the chunk's running record."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_ok = cols < C  # [BLOCK_C]
    r_off = tl.arange(0, GROUP_ROWS)  # [GROUP_ROWS]
    for k in range(CHUNKS_PER_PROGRAM):
        chunk = pid * CHUNKS_PER_PROGRAM + k
        if ROW_LAYOUT:
            # per-thread running statistics (a thread owns row r_off of every group of the chunk)
            n_t = tl.zeros([GROUP_ROWS], dtype=tl.float32)  # [GROUP_ROWS] kept rows seen
            r_t = tl.zeros([GROUP_ROWS], dtype=tl.float32)  # [GROUP_ROWS] sum of r_i
            mp = tl.zeros([GROUP_ROWS, BLOCK_C], dtype=tl.float32)  # [GROUP_ROWS, BLOCK_C] mean of p
            mq = tl.zeros([GROUP_ROWS, BLOCK_C], dtype=tl.float32)  # [GROUP_ROWS, BLOCK_C] mean of q
            m2p = tl.zeros([GROUP_ROWS, BLOCK_C], dtype=tl.float32)  # [GROUP_ROWS, BLOCK_C]
            m2q = tl.zeros([GROUP_ROWS, BLOCK_C], dtype=tl.float32)  # [GROUP_ROWS, BLOCK_C]
            cpq = tl.zeros([GROUP_ROWS, BLOCK_C], dtype=tl.float32)  # [GROUP_ROWS, BLOCK_C]
            for g in range(MERGE_GROUPS):
                first_row = (chunk * MERGE_GROUPS + g) * GROUP_ROWS
                p, q, kept, r = _group_rows(s_ptr, t_ptr, m_ptr, first_row, r_off, cols, N, HW, s_sb,
                                            s_shw, s_sc, t_sb, t_shw, t_sc, x_scale, eps, C, HAS_MASK,
                                            ONE_IMAGE, True)
                r_t += r
                # Welford step of each thread's statistics with its row (weight 0 for a dropped row)
                n_t += kept.to(tl.float32)
                w = tl.where(kept, tl.fdiv(1.0, tl.maximum(n_t, 1.0)), 0.0)  # [GROUP_ROWS] 1/n
                f = tl.where(kept, 1.0 - w, 0.0)  # [GROUP_ROWS] (n-1)/n
                # without a mask, a dropped row (past N) is a copy of row N-1: finite unless the loss
                # is NaN anyway, so its weights w = f = 0 alone leave the statistics unchanged
                dp = p - mp  # [GROUP_ROWS, BLOCK_C]
                dq = q - mq  # [GROUP_ROWS, BLOCK_C]
                dp_f = dp * f[:, None]  # [GROUP_ROWS, BLOCK_C]
                # where(col_ok): padded classes' statistics become the constant 0, so that their
                # updates fold away (the compiler cannot prove that a loop-carried 0 + 0 * w stays 0)
                mp = tl.where(col_ok[None, :], mp + dp * w[:, None], 0.0)
                mq = tl.where(col_ok[None, :], mq + dq * w[:, None], 0.0)
                m2p = tl.where(col_ok[None, :], m2p + dp_f * dp, 0.0)
                cpq = tl.where(col_ok[None, :], cpq + dp_f * dq, 0.0)
                m2q = tl.where(col_ok[None, :], m2q + dq * f[:, None] * dq, 0.0)
            # merge the threads' statistics (fixed reduction tree of the layout)
            sum_r = tl.sum(r_t, axis=0)
            count = tl.sum(n_t, axis=0)
            inv_n = 1.0 / tl.maximum(count, 1.0)
            mu_p = tl.sum(n_t[:, None] * mp, axis=0) * inv_n  # [BLOCK_C]
            mu_q = tl.sum(n_t[:, None] * mq, axis=0) * inv_n  # [BLOCK_C]
            dmp = mp - mu_p[None, :]  # [GROUP_ROWS, BLOCK_C]
            dmq = mq - mu_q[None, :]  # [GROUP_ROWS, BLOCK_C]
            n_dmp = n_t[:, None] * dmp  # [GROUP_ROWS, BLOCK_C]
            m2_p = tl.sum(m2p + n_dmp * dmp, axis=0)  # [BLOCK_C]
            m2_q = tl.sum(m2q + n_t[:, None] * dmq * dmq, axis=0)  # [BLOCK_C]
            c_pq = tl.sum(cpq + n_dmp * dmq, axis=0)  # [BLOCK_C]
        else:
            # running (Chan) statistics of the chunk, merged group by group in row order
            count = 0.0
            sum_r = 0.0
            mu_p = tl.zeros([BLOCK_C], dtype=tl.float32)  # [BLOCK_C]
            mu_q = tl.zeros([BLOCK_C], dtype=tl.float32)  # [BLOCK_C]
            m2_p = tl.zeros([BLOCK_C], dtype=tl.float32)  # [BLOCK_C]
            m2_q = tl.zeros([BLOCK_C], dtype=tl.float32)  # [BLOCK_C]
            c_pq = tl.zeros([BLOCK_C], dtype=tl.float32)  # [BLOCK_C]
            for g in range(MERGE_GROUPS):
                first_row = (chunk * MERGE_GROUPS + g) * GROUP_ROWS
                p, q, kept, r = _group_rows(s_ptr, t_ptr, m_ptr, first_row, r_off, cols, N, HW, s_sb,
                                            s_shw, s_sc, t_sb, t_shw, t_sc, x_scale, eps, C, HAS_MASK,
                                            ONE_IMAGE, False)
                # centred column statistics of this group (two passes over the tile in registers)
                n_g = tl.sum(kept.to(tl.float32), axis=0)
                inv_n = 1.0 / tl.maximum(n_g, 1.0)
                mu_pg = tl.sum(p, axis=0) * inv_n  # [BLOCK_C]
                mu_qg = tl.sum(q, axis=0) * inv_n  # [BLOCK_C]
                dp = tl.where(kept[:, None], p - mu_pg[None, :], 0.0)  # [GROUP_ROWS, BLOCK_C]
                dq = tl.where(kept[:, None], q - mu_qg[None, :], 0.0)  # [GROUP_ROWS, BLOCK_C]
                # exact Chan merge of (n_g, group stats) into the running chunk statistics
                n_new = count + n_g
                w = n_g / tl.maximum(n_new, 1.0)
                cross = count * w  # = n_run * n_g / n_new
                del_p = mu_pg - mu_p  # [BLOCK_C]
                del_q = mu_qg - mu_q  # [BLOCK_C]
                mu_p = mu_p + del_p * w
                mu_q = mu_q + del_q * w
                m2_p = m2_p + tl.sum(dp * dp, axis=0) + del_p * del_p * cross
                m2_q = m2_q + tl.sum(dq * dq, axis=0) + del_q * del_q * cross
                c_pq = c_pq + tl.sum(dp * dq, axis=0) + del_p * del_q * cross
                count = n_new
                sum_r = sum_r + tl.sum(r, axis=0)
        _store_record(row_part_ptr, col_part_ptr, chunk, num_chunks, cols, sum_r, count,
                      mu_p, mu_q, m2_p, m2_q, c_pq, C)


@triton.jit
def _dist_bwd_kernel(
    s_ptr,  # student logits, element (n, c) at b*s_sb + hw*s_shw + c*s_sc
    t_ptr,  # teacher logits, element (n, c) at b*t_sb + hw*t_shw + c*t_sc
    m_ptr,  # keep-mask, uint8 (N,) contiguous; only read when HAS_MASK
    ds_ptr,  # out: dL/dS, element (n, c) at b*ds_sb + hw*ds_shw + c*ds_sc; only written when NEED_S
    dt_ptr,  # out: dL/dT, element (n, c) at b*dt_sb + hw*dt_shw + c*dt_sc; only written when NEED_T
    col_coef_ptr,  # float32 (5, C) contiguous: [mu_p, mu_q, kB, kA_s, kA_t]
    row_coef_ptr,  # float32 (1,): [w_row]
    grad_out_ptr,  # float32 0-d: upstream gradient of the loss
    N,  # number of rows
    HW,  # rows per image (H*W for 4-D input, N for 2-D input)
    s_sb,  # student stride between images (0 for 2-D)
    s_shw,  # student stride between consecutive rows of one image
    s_sc,  # student stride between classes
    t_sb,  # teacher stride between images (0 for 2-D)
    t_shw,  # teacher stride between consecutive rows of one image
    t_sc,  # teacher stride between classes
    ds_sb,  # dS stride between images (0 for 2-D)
    ds_shw,  # dS stride between consecutive rows of one image
    ds_sc,  # dS stride between classes
    dt_sb,  # dT stride between images (0 for 2-D)
    dt_shw,  # dT stride between consecutive rows of one image
    dt_sc,  # dT stride between classes
    x_scale,  # log2(e) / tau
    eps,  # epsilon of the row term's denominator
    inv_tau,  # 1 / tau
    C: tl.constexpr,  # number of classes
    BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    GROUP_ROWS: tl.constexpr,  # rows per register tile (fixed by C)
    GROUPS_PER_PROGRAM: tl.constexpr,  # tuned: consecutive groups handled by one program
    HAS_MASK: tl.constexpr,  # whether m_ptr is read
    NEED_S: tl.constexpr,  # write dL/dS
    NEED_T: tl.constexpr,  # write dL/dT
    ONE_IMAGE: tl.constexpr,  # no group of GROUP_ROWS rows straddles two images
    ROW_LAYOUT: tl.constexpr,  # one row per thread (C <= 21, see tile_params)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_ok = cols < C  # [BLOCK_C]
    r_off = tl.arange(0, GROUP_ROWS)  # [GROUP_ROWS]
    scale = tl.load(grad_out_ptr) * inv_tau  # grad_out / tau
    w_row = tl.load(row_coef_ptr)
    mu_p = tl.load(col_coef_ptr + cols, mask=col_ok, other=0.0)  # [BLOCK_C]
    mu_q = tl.load(col_coef_ptr + C + cols, mask=col_ok, other=0.0)  # [BLOCK_C]
    k_b = tl.load(col_coef_ptr + 2 * C + cols, mask=col_ok, other=0.0)  # [BLOCK_C]
    k_as = tl.load(col_coef_ptr + 3 * C + cols, mask=col_ok & NEED_S, other=0.0)  # [BLOCK_C]
    k_at = tl.load(col_coef_ptr + 4 * C + cols, mask=col_ok & NEED_T, other=0.0)  # [BLOCK_C]
    for g in range(GROUPS_PER_PROGRAM):
        first_row = (pid * GROUPS_PER_PROGRAM + g) * GROUP_ROWS
        rows, b_idx, hw_idx = _row_index(first_row, r_off, N, HW, ONE_IMAGE, ROW_LAYOUT)  # [GROUP_ROWS] each
        row_ok = rows < N  # [GROUP_ROWS]
        s_row = b_idx * s_sb + hw_idx * s_shw  # [GROUP_ROWS] element offset of each row
        t_row = b_idx * t_sb + hw_idx * t_shw  # [GROUP_ROWS]
        e_s, sum_s, inv_s = _row_exp(s_ptr, s_row, row_ok, cols, s_sc, x_scale, C, ROW_LAYOUT)
        e_t, sum_t, inv_t = _row_exp(t_ptr, t_row, row_ok, cols, t_sc, x_scale, C, ROW_LAYOUT)
        kept = _kept_rows(m_ptr, rows, N, HAS_MASK)  # [GROUP_ROWS]
        st_ok = row_ok[:, None] & col_ok[None, :]  # [GROUP_ROWS, BLOCK_C]

        ea, eb, ab, na, nb, inv_d = _row_pearson(e_s, sum_s, inv_s, e_t, sum_t, inv_t, cols, eps, C)
        p = e_s * inv_s[:, None]  # [GROUP_ROWS, BLOCK_C]
        q = e_t * inv_t[:, None]  # [GROUP_ROWS, BLOCK_C]
        big_a = tl.where(col_ok[None, :], p - mu_p[None, :], 0.0)  # [GROUP_ROWS, BLOCK_C]
        big_b = tl.where(col_ok[None, :], q - mu_q[None, :], 0.0)  # [GROUP_ROWS, BLOCK_C]
        ab_d2 = ab * inv_d * inv_d  # [GROUP_ROWS]

        if NEED_S:
            # [GROUP_ROWS]; 0 where ||a|| = 0 (the inner where keeps the discarded branch finite)
            c_a = tl.where(na > 0.0, tl.fdiv(ab_d2 * nb, tl.where(na > 0.0, na, 1.0)), 0.0)
            # w_row * (b / D - c_a * a) with a = inv_s * ea, b = inv_t * eb: per-row factors
            gs = (eb * (w_row * inv_t * inv_d)[:, None] - ea * (w_row * c_a * inv_s)[:, None]
                  + k_b[None, :] * big_b - k_as[None, :] * big_a)  # [GROUP_ROWS, BLOCK_C]
            pg = tl.sum(p * gs, axis=1)  # [GROUP_ROWS]
            ds = tl.where(kept[:, None], scale * p * (gs - pg[:, None]), 0.0)  # [GROUP_ROWS, BLOCK_C]
            ds_offs = ((b_idx * ds_sb + hw_idx * ds_shw)[:, None]
                       + cols[None, :].to(tl.int64) * ds_sc)  # [GROUP_ROWS, BLOCK_C]
            if ROW_LAYOUT:  # store in the row layout too (no conversion through shared memory)
                ds_offs = tl.max_contiguous(ds_offs, [1, 1])
            tl.store(ds_ptr + ds_offs, ds.to(ds_ptr.dtype.element_ty), mask=st_ok)
        if NEED_T:
            # [GROUP_ROWS]; 0 where ||b|| = 0
            c_b = tl.where(nb > 0.0, tl.fdiv(ab_d2 * na, tl.where(nb > 0.0, nb, 1.0)), 0.0)
            ht = (ea * (w_row * inv_s * inv_d)[:, None] - eb * (w_row * c_b * inv_t)[:, None]
                  + k_b[None, :] * big_a - k_at[None, :] * big_b)  # [GROUP_ROWS, BLOCK_C]
            qh = tl.sum(q * ht, axis=1)  # [GROUP_ROWS]
            dt = tl.where(kept[:, None], scale * q * (ht - qh[:, None]), 0.0)  # [GROUP_ROWS, BLOCK_C]
            dt_offs = ((b_idx * dt_sb + hw_idx * dt_shw)[:, None]
                       + cols[None, :].to(tl.int64) * dt_sc)  # [GROUP_ROWS, BLOCK_C]
            if ROW_LAYOUT:
                dt_offs = tl.max_contiguous(dt_offs, [1, 1])
            tl.store(dt_ptr + dt_offs, dt.to(dt_ptr.dtype.element_ty), mask=st_ok)


@triton.jit
def _dist_finalize_kernel(
    row_rec_ptr,  # (R, 2) contiguous, fp32 or fp64: per record [sum of r_i, kept rows]
    col_rec_ptr,  # (R, 5, C) contiguous, fp32 or fp64: per record [mu_p, mu_q, M2_p, M2_q, C_pq]
    loss_ptr,  # out (COEF only): 0-d loss
    col_out_ptr,  # out (5, C) contiguous: col_coef [mu_p, mu_q, kB, kA_s, kA_t] (COEF) or merged stats
    row_out_ptr,  # out: (1,) row_coef [w_row] (COEF) or (2,) merged [sum r, M]
    R,  # number of records
    C,  # number of classes
    c_row,  # tau^2 * beta (host double, rounded to fp32)
    c_col,  # tau^2 * gamma
    k_col,  # -tau^2 * gamma * W / C
    k_row,  # -tau^2 * beta * W
    eps,  # EPS of fastdist.loss.stats (the D_j = nA*nB + eps of the column term)
    BLOCK_R: tl.constexpr,  # records per tile (fixed: fixed summation order)
    BLOCK_C: tl.constexpr,  # classes per tile (fixed by C)
    COEF: tl.constexpr,  # True: write loss and coefficients; False: write the merged statistics
):
    r_off = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    # kept rows and sum of r over all records, fp64, fixed order (tile then tree)
    acc_r = tl.zeros([BLOCK_R], dtype=tl.float64)  # [BLOCK_R]
    acc_n = tl.zeros([BLOCK_R], dtype=tl.float64)  # [BLOCK_R]
    r0 = 0
    while r0 < R:  # (a while loop: the interpreter cannot range() over an argument)
        rr = r0 + r_off  # [BLOCK_R]
        acc_r += tl.load(row_rec_ptr + rr * 2, mask=rr < R, other=0.0).to(tl.float64)
        acc_n += tl.load(row_rec_ptr + rr * 2 + 1, mask=rr < R, other=0.0).to(tl.float64)
        r0 += BLOCK_R
    sum_r = tl.sum(acc_r, axis=0)
    total = tl.sum(acc_n, axis=0)
    if not COEF:  # written now: a value live across the column loop was spilled by ptxas (C=2, sm_90)
        tl.store(row_out_ptr, sum_r.to(row_out_ptr.dtype.element_ty))
        tl.store(row_out_ptr + 1, total.to(row_out_ptr.dtype.element_ty))
    inv_total = 1.0 / tl.maximum(total, 1.0)
    col_r = tl.zeros([BLOCK_C], dtype=tl.float64)  # [BLOCK_C] running sum of r_j over column tiles
    c0 = 0
    while c0 < C:
        cols = c0 + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        c_ok = cols < C  # [BLOCK_C]
        # pass 1: mu = sum_k n_k mu_k / n
        s_mp = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # [BLOCK_R, BLOCK_C]
        s_mq = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # [BLOCK_R, BLOCK_C]
        r0 = 0
        while r0 < R:
            rr = r0 + r_off  # [BLOCK_R]
            n_k = tl.load(row_rec_ptr + rr * 2 + 1, mask=rr < R, other=0.0).to(tl.float64)  # [BLOCK_R]
            ok = (rr < R)[:, None] & c_ok[None, :]  # [BLOCK_R, BLOCK_C]
            rec = col_rec_ptr + rr[:, None].to(tl.int64) * 5 * C + cols[None, :]  # [BLOCK_R, BLOCK_C]
            s_mp += n_k[:, None] * tl.load(rec, mask=ok, other=0.0).to(tl.float64)
            s_mq += n_k[:, None] * tl.load(rec + C, mask=ok, other=0.0).to(tl.float64)
            r0 += BLOCK_R
        mu_p = tl.sum(s_mp, axis=0) * inv_total  # [BLOCK_C]
        mu_q = tl.sum(s_mq, axis=0) * inv_total  # [BLOCK_C]
        # pass 2: M2 = sum_k M2_k + n_k (mu_k - mu)^2, C_pq = sum_k C_k + n_k dp_k dq_k
        s_m2p = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # [BLOCK_R, BLOCK_C]
        s_m2q = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # [BLOCK_R, BLOCK_C]
        s_cpq = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # [BLOCK_R, BLOCK_C]
        r0 = 0
        while r0 < R:
            rr = r0 + r_off  # [BLOCK_R]
            n_k = tl.load(row_rec_ptr + rr * 2 + 1, mask=rr < R, other=0.0).to(tl.float64)  # [BLOCK_R]
            ok = (rr < R)[:, None] & c_ok[None, :]  # [BLOCK_R, BLOCK_C]
            rec = col_rec_ptr + rr[:, None].to(tl.int64) * 5 * C + cols[None, :]  # [BLOCK_R, BLOCK_C]
            d_p = tl.where(ok, tl.load(rec, mask=ok, other=0.0).to(tl.float64) - mu_p[None, :], 0.0)
            d_q = tl.where(ok, tl.load(rec + C, mask=ok, other=0.0).to(tl.float64) - mu_q[None, :], 0.0)
            s_m2p += tl.load(rec + 2 * C, mask=ok, other=0.0).to(tl.float64) + n_k[:, None] * d_p * d_p
            s_m2q += tl.load(rec + 3 * C, mask=ok, other=0.0).to(tl.float64) + n_k[:, None] * d_q * d_q
            s_cpq += tl.load(rec + 4 * C, mask=ok, other=0.0).to(tl.float64) + n_k[:, None] * d_p * d_q
            r0 += BLOCK_R
        m2_p = tl.sum(s_m2p, axis=0)  # [BLOCK_C]
        m2_q = tl.sum(s_m2q, axis=0)  # [BLOCK_C]
        c_pq = tl.sum(s_cpq, axis=0)  # [BLOCK_C]
        out = col_out_ptr + cols  # [BLOCK_C] pointers
        ty = col_out_ptr.dtype.element_ty
        tl.store(out, mu_p.to(ty), mask=c_ok)
        tl.store(out + C, mu_q.to(ty), mask=c_ok)
        if COEF:
            n_a = tl.sqrt(m2_p)  # [BLOCK_C]
            n_b = tl.sqrt(m2_q)  # [BLOCK_C]
            den = n_a * n_b + eps  # [BLOCK_C]
            col_r += tl.where(c_ok, c_pq / den, 0.0)
            k_d2 = k_col * c_pq / (den * den)  # [BLOCK_C]
            # a term whose norm in the denominator is 0 is 0 (inner where keeps the other branch finite)
            k_as = tl.where(n_a > 0, k_d2 * n_b / tl.where(n_a > 0, n_a, 1.0), 0.0)  # [BLOCK_C]
            k_at = tl.where(n_b > 0, k_d2 * n_a / tl.where(n_b > 0, n_b, 1.0), 0.0)  # [BLOCK_C]
            tl.store(out + 2 * C, (k_col / den).to(ty), mask=c_ok)
            tl.store(out + 3 * C, k_as.to(ty), mask=c_ok)
            tl.store(out + 4 * C, k_at.to(ty), mask=c_ok)
        else:
            tl.store(out + 2 * C, m2_p.to(ty), mask=c_ok)
            tl.store(out + 3 * C, m2_q.to(ty), mask=c_ok)
            tl.store(out + 4 * C, c_pq.to(ty), mask=c_ok)
        c0 += BLOCK_C
    if COEF:
        # no kept row: count 1, sum r = 0 and C_pq = 0, i.e. both correlations 0
        count = tl.maximum(total, 1.0)
        loss = c_row * (1.0 - sum_r / count) + c_col * (1.0 - tl.sum(col_r, axis=0) / C)
        tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
        tl.store(row_out_ptr, (k_row / count).to(row_out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_MAX_ROWS = 2**31 - 2**20  # row indices (plus one program's overrun) stay in int32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"fused DIST Triton kernels need CUDA tensors, got tensors on {dev}; use the torch backend, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU")


def _row_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_b, stride_hw, stride_c) of the row view of x, or None if H, W don't flatten."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1)
    _, _, h, w = x.shape
    if w == 1:
        return x.stride(0), x.stride(2), x.stride(1)
    if h == 1 or x.stride(2) == w * x.stride(3):
        return x.stride(0), x.stride(3), x.stride(1)
    return None


def _row_view(x: torch.Tensor) -> tuple[bool, int, int, tuple[int, int, int]]:
    """(whether x is read in place, N, HW, (stride_b, stride_hw, stride_c) of the tensor read: x, or
    x.contiguous() when H, W don't flatten into one stride, the one documented copy ``_prepare`` makes)."""
    if x.dim() not in (2, 4):
        raise ValueError(f"logits must be (N, C) or (B, C, H, W), got shape {tuple(x.shape)}")
    strides = _row_strides(x)
    hw = x.shape[0] if x.dim() == 2 else x.shape[2] * x.shape[3]
    n = x.shape[0] if x.dim() == 2 else x.shape[0] * hw
    if strides is None:  # only 4-D: the strides of the NCHW-contiguous copy
        return False, n, hw, (x.shape[1] * hw, 1, hw)
    return True, n, hw, strides


# _prepare's checks and geometry per input key (see _input_key); only inputs that passed every check
# are entered, so a bad input raises on every call
_PREP_CACHE: dict = {}
_PREP_CACHE_SIZE = 1024


def _input_key(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """Everything ``_check_inputs`` reads: shapes, strides, dtypes and devices (metadata only, no op)."""
    m = None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device)
    return (student.shape, student.stride(), student.dtype, student.device, teacher.shape, teacher.stride(),
            teacher.dtype, teacher.device, m)


def _prepare(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    """(s, t, m (uint8 view of the mask or None), n, C, hw, s_str, t_str, tile params); the checks and
    the geometry are computed once per ``_input_key``, only the tensor work (copies, mask view) per call."""
    key = _input_key(student, teacher, mask)
    geo = _PREP_CACHE.get(key)
    if geo is None:
        if len(_PREP_CACHE) >= _PREP_CACHE_SIZE:  # many distinct shapes: start over rather than grow
            _PREP_CACHE.clear()
        geo = _PREP_CACHE[key] = _check_inputs(student, teacher, mask)
    s_flat, t_flat, n, C, hw, s_str, t_str, tp = geo
    s = student if s_flat else student.contiguous()  # H, W that do not flatten: one documented copy
    t = teacher if t_flat else teacher.contiguous()
    m = None
    if mask is not None:
        m = mask.contiguous()
        if m.dtype == torch.bool:
            m = m.view(torch.uint8)
    return s, t, m, n, C, hw, s_str, t_str, tp


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """Raise a clear error for bad logits or mask; else (student rows flatten in place, teacher rows
    flatten in place, n, C, hw, s_str, t_str, tile params)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    for name, t in (("student", student), ("teacher", teacher)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} logits must be float32/float16/bfloat16/float64, got {t.dtype}")
    if student.dim() not in (2, 4):
        raise ValueError(f"logits must be (N, C) or (B, C, H, W), got shape {tuple(student.shape)}")
    C = student.shape[1]
    tp = tile_params(C)
    _check_device(student, teacher, *(() if mask is None else (mask,)))
    s_flat, n, hw, s_str = _row_view(student)
    t_flat, _, _, t_str = _row_view(teacher)
    if n >= _MAX_ROWS:
        raise ValueError(f"fused DIST kernels index rows in int32: N={n} rows must be < {_MAX_ROWS}")
    if mask is not None and (mask.dtype not in (torch.bool, torch.uint8) or mask.dim() != 1
                             or mask.shape[0] != n):
        raise ValueError(f"mask must be bool/uint8 of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    return s_flat, t_flat, n, C, hw, s_str, t_str, tp


_TUNE_CACHE: dict = {}


def _autotune_enabled() -> bool:
    return not _INTERPRET and os.environ.get("FASTDIST_AUTOTUNE", "1") != "0"


def _pick_config(key, configs, default, launch, device: torch.device):
    """Best config for `key` (benchmarked once on CUDA), else `default`. All configs compute the same bits
    (so a config tuned earlier is also used during a CUDA-graph capture: the cache is looked up first)."""
    best = _TUNE_CACHE.get(key)
    if best is not None:
        return best
    if (len(configs) == 1 or not _autotune_enabled() or device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()):
        return default  # (a single candidate is the default: nothing to benchmark)
    from triton.testing import do_bench

    timings = [do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20) for cfg in configs]
    best = configs[min(range(len(configs)), key=timings.__getitem__)]
    _TUNE_CACHE[key] = best
    return best


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current: Triton launches (and ``do_bench``) on the current device and stream,
    not on the arguments' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _one_image(n: int, hw: int, group_rows: int) -> bool:
    """True when no group of `group_rows` consecutive rows spans two images."""
    return hw == n or hw % group_rows == 0


# fewest forward programs (default config) worth having: one per SM of a 132-SM H100 / H200 (more
# programs means more records for the one-program finalize to merge)
_MIN_FWD_PROGRAMS = 132


def _merge_groups(n: int, tp: dict) -> int:
    """Groups per forward record for N rows: tile_params' MERGE_GROUPS, halved while the forward would
    have fewer than _MIN_FWD_PROGRAMS programs (16k rows, C=19: 64-row records, 256 programs instead
    of 64). A function of (N, C) only, never tuned, so records and sums stay bitwise identical across
    configs and runs; records only get shorter, so the fp32 part of the accumulation does too."""
    merge = tp["MERGE_GROUPS"]
    while merge > 1 and triton.cdiv(n, merge * tp["GROUP_ROWS"]) < _MIN_FWD_PROGRAMS:
        merge //= 2
    return merge


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' hot path: ``triton.cdiv`` is a constexpr_function, ~2 us per host
    call on this CPU against ~0.03 us for this (CPU measurement, timeit)."""
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def _fwd_grid(n: int, C: int) -> tuple[int, int, int]:
    """(MERGE_GROUPS, number of records, its power-of-2 bucket for the tuner key) for N rows of C
    classes: pure functions of (N, C), computed once per pair."""
    tp = tile_params(C)
    merge = _merge_groups(n, tp)
    num_chunks = triton.cdiv(n, tp["GROUP_ROWS"] * merge)
    return merge, num_chunks, triton.next_power_of_2(num_chunks)


@functools.lru_cache(maxsize=1024)
def _bwd_groups(n: int, C: int) -> tuple[int, int]:
    """(number of backward row groups, its power-of-2 bucket for the tuner key), once per (N, C)."""
    num_groups = triton.cdiv(n, tile_params(C)["BWD_GROUP_ROWS"])
    return num_groups, triton.next_power_of_2(num_groups)


def _x_scale(tau: float) -> float:
    """log2(e) / tau: the kernels' softmax computes exp2(x * log2(e) / tau) = exp(x / tau), taking the
    row max of the raw logits, which needs tau > 0."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return math.log2(math.e) / float(tau)


def _layout_key(strides: tuple[int, int, int]) -> str:
    return "c1" if strides[2] == 1 else ("hw1" if strides[1] == 1 else "gen")


def _fwd_configs(tp: dict) -> tuple[dict, ...]:
    """The forward's autotune candidates for a tile geometry."""
    return _ROW_FWD_CONFIGS if tp["ROW_LAYOUT"] else FWD_CONFIGS


def dist_forward_records(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None = None,
    config: dict | None = None,
    eps: float = ROW_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk statistics records of one forward pass (the statistics kernel only, one launch).

    Returns row_rec float32 (R, 2) = [sum r_i, kept rows] and col_rec float32 (R, 5, C) =
    [mu_p, mu_q, M2_p, M2_q, C_pq] of each chunk of consecutive rows (R = 0 for N = 0), the input of
    ``dist_finalize`` / ``dist_merge_records``. `config` forces one of FWD_CONFIGS.
    """
    s, t, m, n, C, hw, s_str, t_str, tp = _prepare(student, teacher, mask)
    dev = s.device
    merge, num_chunks, chunk_bucket = _fwd_grid(n, C)
    row_part = torch.empty(num_chunks, 2, dtype=torch.float32, device=dev)
    col_part = torch.empty(num_chunks, 5, C, dtype=torch.float32, device=dev)
    if n == 0:
        return row_part, col_part
    m_arg = m if m is not None else row_part  # never read when HAS_MASK is False

    def launch(cfg: dict) -> None:
        cpp = cfg["CHUNKS_PER_PROGRAM"]
        grid = (_cdiv(num_chunks, cpp),)
        _dist_fwd_kernel[grid](
            s, t, m_arg, row_part, col_part, n, hw, *s_str, *t_str, _x_scale(tau), float(eps), num_chunks,
            C=C, BLOCK_C=tp["BLOCK_C"], GROUP_ROWS=tp["GROUP_ROWS"], MERGE_GROUPS=merge,
            CHUNKS_PER_PROGRAM=cpp, HAS_MASK=m is not None, ONE_IMAGE=_one_image(n, hw, tp["GROUP_ROWS"]),
            ROW_LAYOUT=tp["ROW_LAYOUT"],
            num_warps=tp["num_warps"], num_stages=cfg["num_stages"], maxnreg=tp["maxnreg"],
        )

    with _on_device(dev):
        if config is None:
            key = ("fwd", C, s.dtype, t.dtype, _layout_key(s_str), _layout_key(t_str), m is not None,
                   chunk_bucket)
            config = _pick_config(key, _fwd_configs(tp), _FWD_DEFAULT, launch, dev)
        launch(config)
    return row_part, col_part


# finalize tile: fixed (never tuned), so the merge order depends on (R, C) only
_FIN_BLOCK_R = 64
_FIN_NUM_WARPS = 8


@functools.cache
def _fin_block_c(C: int) -> int:
    return min(32, max(2, triton.next_power_of_2(C)))


def _launch_finalize(row_rec: torch.Tensor, col_rec: torch.Tensor, outs: tuple, consts: tuple,
                     coef: bool) -> None:
    """One program merging every record in a fixed order (fp64); see ``_dist_finalize_kernel``."""
    if row_rec.dim() != 2 or row_rec.shape[1] != 2 or col_rec.dim() != 3 or col_rec.shape[1] != 5 \
            or col_rec.shape[0] != row_rec.shape[0]:
        raise ValueError(f"records must be (R, 2) and (R, 5, C), got {tuple(row_rec.shape)} and "
                         f"{tuple(col_rec.shape)}")
    C = col_rec.shape[2]
    with _on_device(row_rec.device):
        _dist_finalize_kernel[(1,)](
            row_rec.contiguous(), col_rec.contiguous(), *outs, row_rec.shape[0], C, *consts,
            BLOCK_R=_FIN_BLOCK_R, BLOCK_C=_fin_block_c(C), COEF=coef, num_warps=_FIN_NUM_WARPS,
        )


def dist_merge_records(row_rec: torch.Tensor, col_rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic fp64 merge of records (multi-set Chan merge, one launch): row_stats float64 (2,)
    = [sum r_i, M], col_stats float64 (5, C) = [mu_p, mu_q, M2_p, M2_q, C_pq]."""
    dev, C = row_rec.device, col_rec.shape[2]
    row_stats = torch.empty(2, dtype=torch.float64, device=dev)
    col_stats = torch.empty(5, C, dtype=torch.float64, device=dev)
    # loss_ptr is not written when COEF is False
    _launch_finalize(row_rec, col_rec, (row_stats, col_stats, row_stats), (0.0,) * 5, coef=False)
    return row_stats, col_stats


def dist_finalize(
    row_rec: torch.Tensor,
    col_rec: torch.Tensor,
    beta: float,
    gamma: float,
    tau: float,
    world: int,
    eps: float,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (0-d), col_coef (5, C) = [mu_p, mu_q, kB, kA_s, kA_t] and row_coef (1,) = [w_row] from
    records (one launch; see fastdist.loss.stats for the formulas and the no-kept-row convention).

    row_rec (R, 2) and col_rec (R, 5, C), fp32 or fp64: the chunk records of ``dist_forward_records``
    or the per-rank statistics gathered with ``intra_sync`` (then ``world`` = number of ranks).
    The records are merged in fp64 in a fixed order; outputs are ``out_dtype``.
    """
    dev, C = row_rec.device, col_rec.shape[2]
    loss = torch.empty((), dtype=out_dtype, device=dev)
    col_coef = torch.empty(5, C, dtype=out_dtype, device=dev)
    row_coef = torch.empty(1, dtype=out_dtype, device=dev)
    tau2 = float(tau) * float(tau)
    consts = (tau2 * beta, tau2 * gamma, -tau2 * gamma * world / C, -tau2 * beta * world, float(eps))
    _launch_finalize(row_rec, col_rec, (loss, col_coef, row_coef), consts, coef=True)
    return loss, col_coef, row_coef


def dist_forward_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None = None,
    config: dict | None = None,
    eps: float = ROW_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST statistics of one forward pass (see module docstring); two launches.

    Returns row_stats float64 (2,) = [sum_i r_i, M] and col_stats float64 (5, C) =
    [mu_p, mu_q, M2_p, M2_q, C_pq] over the kept rows. `config` forces one of FWD_CONFIGS.
    """
    return dist_merge_records(*dist_forward_records(student, teacher, tau, mask, config, eps))


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous float32 tensor; x itself (no op) when it already is one."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.to(torch.float32).contiguous()


def _grad_buffer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient to return: empty_like(x), i.e. x's dtype, shape and strides for a dense x; buffer the
    kernel writes: the same tensor, or a contiguous one when its H, W don't flatten into one stride)."""
    out = torch.empty_like(x)
    if _row_strides(out) is not None:
        return out, out
    return out, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def dist_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None,
    col_coef: torch.Tensor,
    row_coef: torch.Tensor,
    grad_out: torch.Tensor,
    need_student: bool = True,
    need_teacher: bool = False,
    config: dict | None = None,
    eps: float = ROW_EPS,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Closed-form DIST gradients (see module docstring) in the inputs' dtype, shape and strides.

    col_coef: float32 (5, C) [mu_p, mu_q, kB, kA_s, kA_t]; row_coef: float32 (1,) [w_row];
    grad_out: float32 0-d (read in the kernel). `config` forces one of BWD_CONFIGS.
    """
    s, t, m, n, C, hw, s_str, t_str, tp = _prepare(student, teacher, mask)
    _check_device(s, col_coef, row_coef, grad_out)
    if not (need_student or need_teacher):
        return None, None
    col_coef, row_coef, grad_out = _f32(col_coef), _f32(row_coef), _f32(grad_out)
    if tuple(col_coef.shape) != (5, C) or row_coef.numel() != 1 or grad_out.numel() != 1:
        raise ValueError(f"expected col_coef (5, {C}), row_coef (1,), grad_out 0-d; got "
                         f"{tuple(col_coef.shape)}, {tuple(row_coef.shape)}, {tuple(grad_out.shape)}")
    ds_out = ds = dt_out = dt = None
    if need_student:
        ds_out, ds = _grad_buffer(student)
    if need_teacher:
        dt_out, dt = _grad_buffer(teacher)
    if n > 0:
        ds_arg = ds if ds is not None else dt
        dt_arg = dt if dt is not None else ds
        ds_str = _row_strides(ds_arg)
        dt_str = _row_strides(dt_arg)
        m_arg = m if m is not None else row_coef  # never read when HAS_MASK is False
        num_groups, group_bucket = _bwd_groups(n, C)

        def launch(cfg: dict) -> None:
            gpp = cfg["GROUPS_PER_PROGRAM"]
            grid = (_cdiv(num_groups, gpp),)
            _dist_bwd_kernel[grid](
                s, t, m_arg, ds_arg, dt_arg, col_coef, row_coef, grad_out, n, hw,
                *s_str, *t_str, *ds_str, *dt_str, _x_scale(tau), float(eps), 1.0 / float(tau),
                C=C, BLOCK_C=tp["BLOCK_C"], GROUP_ROWS=tp["BWD_GROUP_ROWS"], GROUPS_PER_PROGRAM=gpp,
                HAS_MASK=m is not None, NEED_S=bool(need_student), NEED_T=bool(need_teacher),
                ONE_IMAGE=_one_image(n, hw, tp["BWD_GROUP_ROWS"]), ROW_LAYOUT=tp["ROW_LAYOUT"],
                num_warps=tp["num_warps"], num_stages=cfg["num_stages"], maxnreg=tp["bwd_maxnreg"],
            )

        with _on_device(s.device):
            if config is None:
                key = ("bwd", C, s.dtype, t.dtype, _layout_key(s_str), _layout_key(t_str), m is not None,
                       bool(need_student), bool(need_teacher), group_bucket)
                config = _pick_config(key, BWD_CONFIGS, _BWD_DEFAULT, launch, s.device)
            launch(config)
    if ds is not None and ds is not ds_out:
        ds_out.copy_(ds)
    if dt is not None and dt is not dt_out:
        dt_out.copy_(dt)
    return ds_out, dt_out

# ----------------------------------------------------------------------------------------------
# Compile specs: tests/aot and benchmarks/kernel_report.py (static roofline)
# ----------------------------------------------------------------------------------------------

_TRITON_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
              torch.uint8: "*u8"}
# shape the hints of a spec are derived for: the recipe's per-GPU logits (2, C, 64, 128), 16k rows
_SPEC_SHAPE_4D = (2, 64, 128)  # (B, H, W)
_SPEC_ROWS_2D = 16384
# aot_kernel_specs' stride-pattern names -> layout names of report_specs
_AOT_LAYOUTS = {"c1": "nhwc", "hw1": "nchw", "gen": "gen"}


def _layout_strides(layout: str, C: int, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, int, int]]:
    """(N, HW, (stride_b, stride_hw, stride_c)) the launchers pass for a dense tensor of `layout`
    ("nchw", "nhwc", "2d"; "gen": an NCHW tensor read through a [::3]-strided view) and `shape`."""
    if layout == "2d":
        n = shape[0]
        return n, n, (0, C, 1)
    b, _, h, w = shape
    hw = h * w
    strides = {"nchw": (C * hw, 1, hw), "nhwc": (hw * C, C, 1), "gen": (3 * C * hw, 3, 3 * hw)}
    if layout not in strides:
        raise ValueError(f"layout must be 'nchw', 'nhwc', '2d' or 'gen', got {layout!r}")
    return b * hw, hw, strides[layout]


def _spec_shape(layout: str, C: int) -> tuple[int, ...]:
    return (_SPEC_ROWS_2D, C) if layout == "2d" else (_SPEC_SHAPE_4D[0], C, *_SPEC_SHAPE_4D[1:])


class _Spec(dict):
    """A compile spec: a dict that pickles its kernel by name (a JITFunction itself does not pickle),
    so that specs can be sent to a process pool."""

    def __reduce__(self):
        fields = {k: v for k, v in self.items() if k != "fn"}
        return _load_spec, (fields, self["fn"].fn.__name__)


def _load_spec(fields: dict, kernel_name: str) -> _Spec:
    return _Spec(fields, fn=globals()[kernel_name])


def _make_spec(fn, kernel: str, args: dict, const: dict, launch: dict, meta: dict, aligned: bool) -> dict:
    """One compile spec from the launch arguments, specialised as Triton's JIT does at run time: an
    int equal to 1 becomes a constexpr, an int divisible by 16 and every torch-allocated pointer get
    a divisibility-16 hint (only with ``aligned``), floats are fp32. `args` maps each runtime argument
    name to its value (int / float) or, for a pointer, the tensor's torch dtype."""
    signature, constexprs, hinted = {}, dict(const), []
    for i, name in enumerate(fn.arg_names):
        value = constexprs.get(name, args.get(name))
        if name in const:
            signature[name] = "constexpr"
        elif isinstance(value, torch.dtype):
            signature[name] = _TRITON_TY[value]
            hinted.append(i)
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                hinted.append(i)
    flags = ",".join(f"{k}={v}" for k, v in const.items() if isinstance(v, bool))
    cfg = ",".join(f"{k}={launch[k]}" for k in ("num_stages",) if k in launch)
    tuned = ",".join(f"{k}={v}" for k, v in const.items()
                     if k.endswith("_PER_PROGRAM") or k == "MERGE_GROUPS")
    name = f"{kernel}[C={meta['C']},{meta['layout']},{flags}][{tuned},{cfg}]"
    name += "[aligned]" if aligned else ""
    return _Spec(name=name, fn=fn, signature=signature, constexprs=constexprs,
                 attrs={(i,): [["tt.divisibility", 16]] for i in hinted} if aligned else {},
                 num_warps=launch["num_warps"], num_stages=launch.get("num_stages", 3),
                 maxnreg=launch.get("maxnreg"), loss="dist", kernel=kernel, **meta)


def _fwd_spec(C, s_dt, t_dt, layout, shape, has_mask, one_image, cfg, aligned) -> dict:
    """The statistics kernel exactly as ``dist_forward_records`` launches it."""
    tp = tile_params(C)
    n, hw, s_str = _layout_strides(layout, C, shape)
    merge = _merge_groups(n, tp)
    num_chunks = triton.cdiv(n, tp["GROUP_ROWS"] * merge)
    args = {"s_ptr": s_dt, "t_ptr": t_dt, "m_ptr": torch.uint8 if has_mask else torch.float32,
            "row_part_ptr": torch.float32, "col_part_ptr": torch.float32, "N": n, "HW": hw,
            **dict(zip(("s_sb", "s_shw", "s_sc"), s_str, strict=True)),
            **dict(zip(("t_sb", "t_shw", "t_sc"), s_str, strict=True)),
            "x_scale": 1.0, "eps": 1.0, "num_chunks": num_chunks}
    const = {"C": C, "BLOCK_C": tp["BLOCK_C"], "GROUP_ROWS": tp["GROUP_ROWS"], "MERGE_GROUPS": merge,
             "CHUNKS_PER_PROGRAM": cfg["CHUNKS_PER_PROGRAM"], "HAS_MASK": has_mask, "ONE_IMAGE": one_image,
             "ROW_LAYOUT": tp["ROW_LAYOUT"]}
    launch = {"num_warps": tp["num_warps"], "num_stages": cfg["num_stages"], "maxnreg": tp["maxnreg"]}
    return _make_spec(_dist_fwd_kernel, "fwd", args, const, launch, _meta(C, s_dt, layout), aligned)


def _bwd_spec(C, s_dt, t_dt, layout, shape, has_mask, need_s, need_t, one_image, cfg, aligned) -> dict:
    """The backward kernel exactly as ``dist_backward`` launches it (gradients: dense, input strides)."""
    tp = tile_params(C)
    n, hw, strides = _layout_strides(layout, C, shape)
    args = {"s_ptr": s_dt, "t_ptr": t_dt, "m_ptr": torch.uint8 if has_mask else torch.float32,
            "ds_ptr": s_dt if need_s else t_dt, "dt_ptr": t_dt if need_t else s_dt,
            "col_coef_ptr": torch.float32, "row_coef_ptr": torch.float32, "grad_out_ptr": torch.float32,
            "N": n, "HW": hw, "x_scale": 1.0, "eps": 1.0, "inv_tau": 1.0}
    for pre in ("s", "t", "ds", "dt"):
        args.update(zip((f"{pre}_sb", f"{pre}_shw", f"{pre}_sc"), strides, strict=True))
    const = {"C": C, "BLOCK_C": tp["BLOCK_C"], "GROUP_ROWS": tp["BWD_GROUP_ROWS"],
             "GROUPS_PER_PROGRAM": cfg["GROUPS_PER_PROGRAM"], "HAS_MASK": has_mask, "NEED_S": need_s,
             "NEED_T": need_t, "ONE_IMAGE": one_image, "ROW_LAYOUT": tp["ROW_LAYOUT"]}
    launch = {"num_warps": tp["num_warps"], "num_stages": cfg["num_stages"], "maxnreg": tp["bwd_maxnreg"]}
    return _make_spec(_dist_bwd_kernel, "bwd", args, const, launch, _meta(C, s_dt, layout), aligned)


def _finalize_spec(C, s_dt, layout, shape, coef, rec_dt, aligned) -> dict:
    """The finalize kernel as ``dist_finalize`` (coef=True) / ``dist_merge_records`` launch it."""
    tp = tile_params(C)
    n = _layout_strides(layout, C, shape)[0]
    out_dt = torch.float64 if (s_dt == torch.float64 or not coef) else torch.float32
    args = {"row_rec_ptr": rec_dt, "col_rec_ptr": rec_dt, "loss_ptr": out_dt, "col_out_ptr": out_dt,
            "row_out_ptr": out_dt, "R": _num_records(n, tp), "C": C,
            **{k: 1.0 for k in ("c_row", "c_col", "k_col", "k_row", "eps")}}
    const = {"BLOCK_R": _FIN_BLOCK_R, "BLOCK_C": _fin_block_c(C), "COEF": coef}
    spec = _make_spec(_dist_finalize_kernel, "finalize", args, const, {"num_warps": _FIN_NUM_WARPS},
                      _meta(C, s_dt, layout), aligned)
    spec["name"] += f"[records={_TRITON_TY[rec_dt]}]"
    return spec


def _num_records(n: int, tp: dict) -> int:
    return triton.cdiv(n, tp["GROUP_ROWS"] * _merge_groups(n, tp))


def _meta(C: int, s_dt: torch.dtype, layout: str) -> dict:
    return {"C": C, "dtype": str(s_dt).removeprefix("torch."), "layout": layout}


def report_specs(C: int, dtype: torch.dtype, layout: str, shape: tuple[int, ...] | None = None) -> list[dict]:
    """The kernels one default forward+backward launches for student and teacher of `dtype`, dense
    `layout` ("nchw", "nhwc", "2d"), no mask, student gradient only: [fwd, finalize, bwd], with the
    run-time specialisation (constexprs, signature, divisibility hints) of `shape` (default
    (2, C, 64, 128) for 4-D layouts, (16384, C) for "2d"; H*W and N multiples of 16)."""
    if layout not in ("nchw", "nhwc", "2d"):
        raise ValueError(f"layout must be 'nchw', 'nhwc' or '2d', got {layout!r}")
    shape = _spec_shape(layout, C) if shape is None else tuple(shape)
    one_image = _one_image(*_layout_strides(layout, C, shape)[:2], tile_params(C)["GROUP_ROWS"])
    return [_fwd_spec(C, dtype, dtype, layout, shape, False, one_image, _FWD_DEFAULT, True),
            _finalize_spec(C, dtype, layout, shape, True, torch.float32, True),
            _bwd_spec(C, dtype, dtype, layout, shape, False, True, False, one_image, _BWD_DEFAULT, True)]


def program_plan(spec: dict, shape: tuple[int, ...]) -> dict:
    """Grid, rows per program, loop trip counts (source order, loops with a constant trip count of 1
    fold away at compile time) and minimum HBM bytes per row of one `spec` for logits of `shape`."""
    C = spec["C"]
    n = shape[0] if len(shape) == 2 else shape[0] * shape[2] * shape[3]
    const = spec["constexprs"]
    elt = {"*fp32": 4, "*fp16": 2, "*bf16": 2, "*fp64": 8}
    sig = spec["signature"]
    mask_b = 1 if const.get("HAS_MASK") else 0
    if spec["kernel"] == "fwd":
        chunk_rows = const["GROUP_ROWS"] * const["MERGE_GROUPS"]
        num_chunks = triton.cdiv(n, chunk_rows)
        cpp = const["CHUNKS_PER_PROGRAM"]
        rows = chunk_rows * cpp
        trips = [cpp, const["MERGE_GROUPS"]]
        moved = C * (elt[sig["s_ptr"]] + elt[sig["t_ptr"]]) + mask_b + (8 + 20 * C) / chunk_rows
        return {"programs": triton.cdiv(num_chunks, cpp), "rows_per_program": rows,
                "loop_trips": [t for t in trips if t > 1], "bytes_per_row": float(moved)}
    if spec["kernel"] == "bwd":
        gpp = const["GROUPS_PER_PROGRAM"]
        rows = const["GROUP_ROWS"] * gpp
        grads = ((elt[sig["ds_ptr"]] if const["NEED_S"] else 0)
                 + (elt[sig["dt_ptr"]] if const["NEED_T"] else 0))
        moved = C * (elt[sig["s_ptr"]] + elt[sig["t_ptr"]] + grads) + mask_b + (20 * C + 8) / max(n, 1)
        return {"programs": triton.cdiv(triton.cdiv(n, const["GROUP_ROWS"]), gpp), "rows_per_program": rows,
                "loop_trips": [gpp] if gpp > 1 else [], "bytes_per_row": float(moved)}
    tp = tile_params(C)
    records = _num_records(n, tp)
    r_trips = triton.cdiv(records, const["BLOCK_R"])
    rec_b, out_b = elt[sig["row_rec_ptr"]], elt[sig["col_out_ptr"]]
    # each record read once from HBM (the second pass over them hits L2), the outputs written once
    moved = rec_b * records * (2 + 5 * C) + out_b * (5 * C + 2)
    # loops: records (sum r, n), column tiles, and in each column tile two passes over the records
    return {"programs": 1, "rows_per_program": 0,
            "loop_trips": [r_trips, triton.cdiv(C, const["BLOCK_C"]), r_trips, r_trips],
            "bytes_per_row": moved / max(n, 1)}


def aot_kernel_specs(
    C: int,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype,
    configs: str = "all",
    variants: str = "all",
    layouts: tuple[str, ...] = ("c1", "hw1"),
    aligned: bool = False,
) -> list[dict]:
    """The kernel specialisations the launchers JIT for C classes, for tests/aot.

    Entries as ``report_specs`` (ready for ``triton.compile(ASTSource(fn, signature, constexprs,
    attrs), target, options={num_warps, num_stages, maxnreg})``), each derived from the launcher's
    arguments for its own layout. configs: "all" (every autotune config) or "default". variants:
    "heaviest" (forward with mask, backward with mask writing dS and dT, groups within one image,
    fp32 finalize) or "all" (also: the default no-mask forward and dS-only backward, masked dS-only /
    dT-only backward, groups spanning images, and the fp64 merge / finalize of ``intra_sync``).
    layouts: the stride patterns Triton specialises on: "c1" (class stride 1: channels-last, 2-D),
    "hw1" (row stride 1: NCHW), "gen" (no unit stride). aligned: the divisibility-by-16 hints Triton
    derives for torch allocations of shape (2, C, 64, 128); else no hints.
    """
    if configs not in ("all", "default") or variants not in ("all", "heaviest"):
        raise ValueError(f"configs must be 'all' or 'default', variants 'all' or 'heaviest'; "
                         f"got {configs!r}, {variants!r}")
    s_dt, t_dt = student_dtype, teacher_dtype
    fwd_cfgs = _fwd_configs(tile_params(C)) if configs == "all" else (_FWD_DEFAULT,)
    bwd_cfgs = BWD_CONFIGS if configs == "all" else (_BWD_DEFAULT,)
    # flag variants: (HAS_MASK, ONE_IMAGE) and (HAS_MASK, NEED_S, NEED_T, ONE_IMAGE); the heaviest first
    fwd_vars = [(True, True)]
    bwd_vars = [(True, True, True, True)]
    fin_vars = [(True, torch.float32)]
    if variants == "all":
        fwd_vars += [(False, True), (True, False)]
        bwd_vars += [(False, True, False, True), (True, True, False, True), (True, False, True, True),
                     (True, True, True, False)]
        fin_vars += [(False, torch.float32), (True, torch.float64)]
    specs = []
    for key in layouts:
        layout = _AOT_LAYOUTS[key]
        shape = _spec_shape(layout, C)
        # the forward's MERGE_GROUPS depends on N: also the longest records (large N)
        fwd_shapes = [shape, (2, C, 512, 1024) if len(shape) == 4 else (2**20, C)]
        fwd = [_fwd_spec(C, s_dt, t_dt, layout, sh, m, one, cfg, aligned)
               for sh in fwd_shapes for m, one in fwd_vars for cfg in fwd_cfgs]
        specs += list({sp["name"]: sp for sp in fwd}.values())
        specs += [_bwd_spec(C, s_dt, t_dt, layout, shape, m, ns, nt, one, cfg, aligned)
                  for m, ns, nt, one in bwd_vars for cfg in bwd_cfgs]
        specs += [_finalize_spec(C, s_dt, layout, shape, coef, rec, aligned) for coef, rec in fin_vars]
    return specs
