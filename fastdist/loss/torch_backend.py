"""The ``torch`` backend: the fused kernels' forward statistics and closed-form backward in PyTorch ops.

Same launcher signatures as ``kernels.dist_loss`` (``dist_forward_stats`` / ``dist_backward``), so the
front-end treats both backends alike. Runs on any device and dtype.

Layout: an input is viewed, without a copy, as ``(B, C, L)`` -- ``x.flatten(2)`` for 4-D input (NCHW
or channels-last) and ``x.t()[None]`` for 2-D ``(N, C)`` -- so row ``n = b * L + l`` and the class axis
is dim 1. The rows are processed in pieces of about ``_PIECE_ELEMS / C`` rows to bound the
temporaries; the math runs in float32 (float64 for float64 input).

Forward, per piece (kept rows only, masked out with ``torch.where``, no host sync): the row Pearson
terms and the column statistics of ``docs/design.md`` ("The DIST loss, in the form every backend
computes it"); the r_i are summed in float64, the column mean, M2 and co-moment of the piece are
computed in two passes (centred) and merged in float64 into the running statistics with the exact
Chan merge (``stats.merge_stats``).

Backward, per piece: the closed form of ``docs/design.md`` ("Backward, closed form"), recomputing
p, q and the centred rows (nothing N x C is saved), with the global column means from ``col_coef``;
masked rows get 0.
"""

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .stats import EPS, merge_stats

_R = TypeVar("_R")

# elements of one (rows x C) piece: bounds the float32 temporaries (~10 pieces live) while keeping
# the per-piece launch overhead small on GPUs
_PIECE_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 24}
RowTerms = tuple[Tensor, Tensor, Tensor, Tensor]  # <a, b>, ||a||, ||b||, D per row
# above this many classes an NCHW softmax is worth a transposed copy (accuracy of the class sums)
_STRIDED_SOFTMAX_MAX_C = 1024
# CPU inputs of at least this many elements (B * C * H * W) run the compiled path (smaller ones, as in
# the tests and the demo, stay eager: no compile time); see docs/design.md, "The CPU path"
COMPILE_MIN_ELEMS = 1 << 18
COMPILED_CALLS: Counter[str] = Counter()  # calls that ran compiled, per function name (for tests)
_COMPILED: dict[Callable, Callable] = {}
_COMPILE_STATE = {"disabled": False}


def _use_compiled(s3: Tensor, t3: Tensor, mask3: Tensor | None) -> bool:
    """Whether this call runs the Inductor-compiled whole-tensor path: CPU, at least
    ``COMPILE_MIN_ELEMS`` elements, at most ``_STRIDED_SOFTMAX_MAX_C`` classes, compiling not disabled
    (``FASTDIST_CPU_COMPILE=0`` or an earlier failure), plain tensors and no tracing, transform or
    dispatch mode around the call (inside ``torch.compile`` of a model the custom op's body runs at run
    time, on real tensors, so it takes this path too)."""
    if s3.device.type != "cpu" or s3.numel() < COMPILE_MIN_ELEMS or s3.shape[1] > _STRIDED_SOFTMAX_MAX_C:
        return False
    if _COMPILE_STATE["disabled"] or os.environ.get("FASTDIST_CPU_COMPILE", "1") == "0":
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return all(x is None or type(x) is Tensor for x in (s3, t3, mask3))


def _run_compiled(fn: Callable[..., _R], *args: object) -> tuple[bool, _R | None]:
    """``(True, fn(*args))`` with ``fn`` compiled by Inductor (dynamic shapes, one graph, no autograd),
    or ``(False, None)`` after warning once when compiling fails (no C++ compiler, ...): the caller then
    runs the eager pieces."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        with torch.no_grad():
            out = _COMPILED[fn](*args)
    except Exception as exc:  # noqa: BLE001 - any compile failure falls back to the eager path
        _COMPILE_STATE["disabled"] = True
        warnings.warn(f"fastdist torch backend: Inductor compile failed ({exc!r:.200}); using the eager "
                      "path from now on", RuntimeWarning, stacklevel=3)
        return False, None
    COMPILED_CALLS[fn.__name__] += 1
    return True, out


def _as_bcl(x: Tensor) -> Tensor:
    """View (N, C) or (B, C, H, W) as (B, C, L) without copying."""
    return x.t().unsqueeze(0) if x.dim() == 2 else x.flatten(2)


def _pieces(x3: Tensor) -> Iterator[tuple[slice, slice]]:
    """(batch slice, position slice) pieces covering (B, L) in row order, ~_PIECE_ELEMS elements each."""
    batch, num_classes, length = x3.shape
    rows = max(1, _PIECE_ELEMS.get(x3.device.type, 1 << 22) // num_classes)
    if length >= rows:
        for b in range(batch):
            for start in range(0, length, rows):
                yield slice(b, b + 1), slice(start, min(length, start + rows))
    else:
        per = rows // length
        for start in range(0, batch, per):
            yield slice(start, min(batch, start + per)), slice(0, length)


def _compute_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    return torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)


def _probs(x: Tensor, tau: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Softmax over dim 1 and its row-centred copy.

    When the classes are contiguous in memory (2-D or channels-last input), or when there are more than
    ``_STRIDED_SOFTMAX_MAX_C`` of them, the softmax runs over the last dim of the (B, L, C) view (a copy
    for NCHW): the same values, from PyTorch's last-dim kernel, which is faster and, for thousands of
    classes, more accurate than its strided-dim one (that sums them sequentially in fp32).
    """
    z = x.to(dtype) / tau
    if z.stride(1) == 1 or z.shape[1] > _STRIDED_SOFTMAX_MAX_C:
        p = torch.softmax(z.transpose(1, 2), dim=-1).transpose(1, 2)
    else:
        p = torch.softmax(z, dim=1)
    return p, p - p.mean(1, keepdim=True)


def _row_terms(a: Tensor, b: Tensor) -> RowTerms:
    """<a, b>, ||a||, ||b||, D = ||a|| ||b|| + eps per row (dim 1 reduced, kept)."""
    ab = (a * b).sum(1, keepdim=True)
    n_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    n_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    return ab, n_a, n_b, n_a * n_b + EPS


def _piece_col_stats(p: Tensor, q: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Count (float64 0-d) and (5, C) float64 column statistics of one piece, two-pass centred."""
    dims = (0, 2)
    if keep is None:
        count = torch.full((), p.shape[0] * p.shape[2], dtype=torch.float64, device=p.device)
        mu_p, mu_q = p.mean(dims, keepdim=True), q.mean(dims, keepdim=True)
        a, b = p - mu_p, q - mu_q
    else:
        count = keep.sum(dtype=torch.float64)
        inv = 1 / count.clamp_min(1).to(p.dtype)
        p, q = torch.where(keep, p, 0), torch.where(keep, q, 0)
        mu_p, mu_q = p.sum(dims, keepdim=True) * inv, q.sum(dims, keepdim=True) * inv
        a, b = torch.where(keep, p - mu_p, 0), torch.where(keep, q - mu_q, 0)
    sums = [mu_p.flatten(), mu_q.flatten(), (a * a).sum(dims), (b * b).sum(dims), (a * b).sum(dims)]
    return count, torch.stack(sums).double()


def _piece_keep(mask3: Tensor | None, bs: slice, ls: slice) -> Tensor | None:
    """The piece's keep-mask as (b, 1, l) bool, or None."""
    return None if mask3 is None else mask3[bs, ls].unsqueeze(1)


def _stats_of(
    s3: Tensor, t3: Tensor, keep: Tensor | None, tau: float, dtype: torch.dtype, col_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(row_stats (2,), col_stats (5, C))`` float64 of one (b, C, l) block; ``keep`` (b, 1, l) or None.

    The column statistics are taken in ``col_dtype``: the compute dtype on the eager path (PyTorch's
    sums are accurate enough there), float64 on the compiled one (Inductor's strided column sums in
    float32 lose about an order of magnitude: 5e-7 relative over 220k rows against 5e-8 eager)."""
    p, a = _probs(s3, tau, dtype)
    q, b = _probs(t3, tau, dtype)
    ab, _, _, den = _row_terms(a, b)
    r = ab / den
    if keep is not None:
        r = torch.where(keep, r, 0)
    count, col = _piece_col_stats(p.to(col_dtype), q.to(col_dtype), keep)
    return torch.stack([r.sum(dtype=torch.float64), count]), col


def dist_forward_stats(
    student: Tensor, teacher: Tensor, tau: float, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(row_stats (2,), col_stats (5, C))`` float64 over the kept rows (see ``stats``)."""
    s3, t3 = _as_bcl(student), _as_bcl(teacher)
    batch, num_classes, length = s3.shape
    mask3 = None if mask is None else mask.view(batch, length)
    dtype = _compute_dtype(student, teacher)
    compiled = _use_compiled(s3, t3, mask3)
    row = torch.zeros(2, dtype=torch.float64, device=student.device)
    col = torch.zeros(5, num_classes, dtype=torch.float64, device=student.device)
    for bs, ls in _pieces(s3):
        args = (s3[bs, :, ls], t3[bs, :, ls], _piece_keep(mask3, bs, ls), tau, dtype)
        # the pieces bound the column sums' length (accuracy at millions of rows) on both paths
        ok, piece = _run_compiled(_stats_of, *args, torch.float64) if compiled else (False, None)
        piece_row, piece_col = piece if ok else _stats_of(*args, dtype)
        compiled = ok
        row, col = merge_stats(row, col, piece_row, piece_col)
    return row, col


def _grad_probs(
    a: Tensor,
    b: Tensor,
    terms: RowTerms,
    big_a: Tensor,
    big_b: Tensor,
    k_b: Tensor,
    k_a: Tensor,
    w_row: Tensor,
) -> Tensor:
    """dL/dp of one piece; dL/dq with the roles of (a, ||a||, A) and (b, ||b||, B) swapped."""
    ab, n_a, n_b, den = terms
    safe_na = torch.where(n_a > 0, n_a, 1)
    coef_a = torch.where(n_a > 0, ab * n_b / (safe_na * den * den), 0)
    return w_row * (b / den - coef_a * a) + k_b * big_b - k_a * big_a


def _softmax_backward(p: Tensor, grad_p: Tensor, scale: Tensor, keep: Tensor | None) -> Tensor:
    """scale * dL/dx from dL/dp through softmax; rows outside ``keep`` get 0."""
    grad_x = p * (grad_p - (p * grad_p).sum(1, keepdim=True)) * scale
    return grad_x if keep is None else torch.where(keep, grad_x, 0)


def _grads_into(
    s3: Tensor,
    t3: Tensor,
    keep: Tensor | None,
    tau: float,
    coef: Tensor,
    w_row: Tensor,
    scale: Tensor,
    d_s3: Tensor | None,
    d_t3: Tensor | None,
) -> None:
    """Write dS (into ``d_s3``) and dT (into ``d_t3``) of one (b, C, l) block; a None output is skipped.

    ``coef`` (5, 1, C, 1) = col_coef in the compute dtype, ``w_row`` (1,), ``scale`` = grad_out / tau (0-d).
    """
    mu_p, mu_q, k_b, k_as, k_at = coef.unbind(0)
    p, a = _probs(s3, tau, coef.dtype)
    q, b = _probs(t3, tau, coef.dtype)
    big_a, big_b = p - mu_p, q - mu_q
    ab, n_a, n_b, den = _row_terms(a, b)
    if d_s3 is not None:
        grad_p = _grad_probs(a, b, (ab, n_a, n_b, den), big_a, big_b, k_b, k_as, w_row)
        d_s3.copy_(_softmax_backward(p, grad_p, scale, keep))
    if d_t3 is not None:
        grad_q = _grad_probs(b, a, (ab, n_b, n_a, den), big_b, big_a, k_b, k_at, w_row)
        d_t3.copy_(_softmax_backward(q, grad_q, scale, keep))


def dist_backward(
    student: Tensor,
    teacher: Tensor,
    tau: float,
    mask: Tensor | None,
    col_coef: Tensor,
    row_coef: Tensor,
    grad_out: Tensor,
    need_student: bool,
    need_teacher: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients w.r.t. student/teacher (or None when not needed), in each input's dtype and strides."""
    s3, t3 = _as_bcl(student), _as_bcl(teacher)
    batch, num_classes, length = s3.shape
    mask3 = None if mask is None else mask.view(batch, length)
    dtype = _compute_dtype(student, teacher)
    coef = col_coef.to(dtype).view(5, 1, num_classes, 1)
    w_row = row_coef.to(dtype)
    scale = grad_out.to(dtype) / tau
    d_student = torch.empty_like(student) if need_student else None
    d_teacher = torch.empty_like(teacher) if need_teacher else None
    d_s3 = None if d_student is None else _as_bcl(d_student)
    d_t3 = None if d_teacher is None else _as_bcl(d_teacher)
    if _use_compiled(s3, t3, mask3):
        keep = _piece_keep(mask3, slice(None), slice(None))
        if _run_compiled(_grads_into, s3, t3, keep, tau, coef, w_row, scale, d_s3, d_t3)[0]:
            return d_student, d_teacher
    for bs, ls in _pieces(s3):
        _grads_into(s3[bs, :, ls], t3[bs, :, ls], _piece_keep(mask3, bs, ls), tau, coef, w_row, scale,
                    None if d_s3 is None else d_s3[bs, :, ls], None if d_t3 is None else d_t3[bs, :, ls])
    return d_student, d_teacher
