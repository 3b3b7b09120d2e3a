"""Fused pixel-wise KD loss (Hinton et al. 2015, as in CIRKD's ``CriterionKD``): Triton kernel + launcher.

Math. S, T are the student / teacher logits viewed as N rows x C classes (a (B, C, H, W) tensor has
the B*H*W pixels as rows, row n = b*H*W + hw). With x = S/tau, y = T/tau, per row::

    log p = log_softmax(x),  log q = log_softmax(y)            (over the C classes, fp32)
    l_j   = log q_j - log p_j,   KL_n = sum_j q_j l_j
    loss  = tau^2 / M * sum_{kept n} KL_n                        (M = kept rows; "batchmean")

Backward (closed form, local to a row; excluded rows get exactly 0)::

    dL/dS_nj = tau / M * (p_nj - q_nj)
    dL/dT_nj = tau / M * q_nj * (l_nj - KL_n)

Because the gradient needs nothing beyond its own row, ONE kernel (``_kd_fwd_bwd_kernel``) reads each
row once and writes the loss partial of its program *and* dS (dT) already scaled by tau/M (M is read
from a device scalar, so a mask costs no host sync). The autograd backward then only multiplies the
saved gradient by grad_out. Launches per forward+backward: this kernel, the fp64 finalize (a torch
sum over the per-program partials, deterministic for a fixed shape), and the grad_out multiply.

Determinism: the tile [GROUP_ROWS, BLOCK_C] and num_warps are a fixed function of C; each program
walks GROUPS_PER_PROGRAM consecutive groups in row order and writes one fp32 partial (no atomics).

Memory access: element (n, c) is at b*stride_b + hw*stride_hw + c*stride_c with b = n // HW,
hw = n % HW; the launcher takes dense tensors (2-D row-major, NCHW or channels-last, as the front-end
guarantees), whose H, W flatten into one stride. Gradients are written with the input's strides.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["MAX_C", "kd_forward_backward", "report_specs", "program_plan", "aot_kernel_specs"]

MAX_C = 2048  # a whole row lives in registers
_MAX_ROWS = 2**31 - 2**20  # row indices stay in int32
_DEFAULT_GPP = 4  # tiles per program (fixed: the arithmetic does not depend on it)
_TRITON_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@functools.lru_cache(maxsize=1024)  # a pure function of C, called per launch (do not mutate)
def tile_params(C: int) -> dict:
    """Fixed tile geometry for C classes: ~4 fp32 elements of a tile per thread (no spills)."""
    if not 2 <= C <= MAX_C:
        raise ValueError(f"fused KD kernel supports 2 <= C <= {MAX_C} classes, got C={C}")
    block_c = triton.next_power_of_2(C)
    num_warps = 4 if block_c <= 256 else (8 if block_c <= 1024 else 16)
    return {"BLOCK_C": block_c, "GROUP_ROWS": max(1, 4 * 32 * num_warps // block_c), "num_warps": num_warps}


@triton.jit
def _log_softmax_rows(
    ptr,  # logits base pointer (fp32/fp16/bf16)
    offs,  # [GROUP_ROWS, BLOCK_C] int64 element offsets
    ld_ok,  # [GROUP_ROWS, BLOCK_C] bool: row < N and class < C
    col_ok,  # [BLOCK_C] bool: class < C
    tau,  # temperature
):
    x = tl.load(ptr + offs, mask=ld_ok, other=0.0).to(tl.float32) / tau  # [GROUP_ROWS, BLOCK_C]
    # padded classes -> -inf: probability exactly 0; padded rows stay finite (all 0)
    x = tl.where(col_ok[None, :], x, float("-inf"))  # [GROUP_ROWS, BLOCK_C]
    x_max = tl.max(x, axis=1)  # [GROUP_ROWS]
    z = x - x_max[:, None]  # [GROUP_ROWS, BLOCK_C]
    lse = tl.log(tl.sum(tl.exp(z), axis=1))  # [GROUP_ROWS]
    # log-probabilities from the logits (not log(p)): finite even where p underflows to 0
    return tl.where(col_ok[None, :], z - lse[:, None], 0.0)  # [GROUP_ROWS, BLOCK_C]


@triton.jit
def _kd_fwd_bwd_kernel(
    s_ptr,  # student logits, element (n, c) at b*s_sb + hw*s_shw + c*s_sc
    t_ptr,  # teacher logits, element (n, c) at b*t_sb + hw*t_shw + c*t_sc
    m_ptr,  # keep-mask, uint8 (N,) contiguous; read only when HAS_MASK
    scale_ptr,  # float32 (1,): tau / max(M, 1), the gradient scale
    part_ptr,  # out: float32 (programs,): sum of KL_n over the kept rows of each program
    ds_ptr,  # out: dS, same strides as the student (written only when NEED_S)
    dt_ptr,  # out: dT, same strides as the teacher (written only when NEED_T)
    N,  # number of rows
    C,  # number of classes
    HW,  # rows per image (N for 2-D input)
    s_sb, s_shw, s_sc,  # student strides: image (0 for 2-D), row within image, class
    t_sb, t_shw, t_sc,  # teacher strides
    tau,  # temperature
    BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    GROUP_ROWS: tl.constexpr,  # rows per register tile (fixed by C)
    GROUPS_PER_PROGRAM: tl.constexpr,  # consecutive tiles one program handles
    HAS_MASK: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_T: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_ok = cols < C  # [BLOCK_C]
    r_off = tl.arange(0, GROUP_ROWS)  # [GROUP_ROWS]
    scale = tl.load(scale_ptr)
    acc = tl.zeros([GROUP_ROWS], dtype=tl.float32)  # [GROUP_ROWS] per-lane KL sums, fixed order
    for g in range(GROUPS_PER_PROGRAM):
        rows = (pid * GROUPS_PER_PROGRAM + g) * GROUP_ROWS + r_off  # [GROUP_ROWS] int32
        row_ok = rows < N  # [GROUP_ROWS]
        b_idx = (rows // HW).to(tl.int64)  # [GROUP_ROWS]
        hw_idx = (rows % HW).to(tl.int64)  # [GROUP_ROWS]
        c64 = cols[None, :].to(tl.int64)  # [1, BLOCK_C]
        s_offs = (b_idx * s_sb + hw_idx * s_shw)[:, None] + c64 * s_sc  # [GROUP_ROWS, BLOCK_C]
        t_offs = (b_idx * t_sb + hw_idx * t_shw)[:, None] + c64 * t_sc  # [GROUP_ROWS, BLOCK_C]
        ld_ok = row_ok[:, None] & col_ok[None, :]  # [GROUP_ROWS, BLOCK_C]
        log_p = _log_softmax_rows(s_ptr, s_offs, ld_ok, col_ok, tau)  # [GROUP_ROWS, BLOCK_C]
        log_q = _log_softmax_rows(t_ptr, t_offs, ld_ok, col_ok, tau)  # [GROUP_ROWS, BLOCK_C]
        kept = row_ok  # [GROUP_ROWS]
        if HAS_MASK:
            kept = kept & (tl.load(m_ptr + rows, mask=row_ok, other=0) != 0)
        q = tl.where(col_ok[None, :], tl.exp(log_q), 0.0)  # [GROUP_ROWS, BLOCK_C]
        lr = log_q - log_p  # [GROUP_ROWS, BLOCK_C]
        kl = tl.sum(q * lr, axis=1)  # [GROUP_ROWS]
        # where(), not a 0/1 product: excluded rows may hold NaN/inf
        acc += tl.where(kept, kl, 0.0)
        st_ok = ld_ok & kept[:, None]  # [GROUP_ROWS, BLOCK_C]
        if NEED_S:
            p = tl.exp(log_p)  # [GROUP_ROWS, BLOCK_C]
            ds = tl.where(st_ok, scale * (p - q), 0.0)  # [GROUP_ROWS, BLOCK_C]
            # excluded rows are written too (as 0): the gradient buffer is uninitialised
            tl.store(ds_ptr + s_offs, ds.to(ds_ptr.dtype.element_ty), mask=ld_ok)
        if NEED_T:
            dt = tl.where(st_ok, scale * q * (lr - kl[:, None]), 0.0)  # [GROUP_ROWS, BLOCK_C]
            tl.store(dt_ptr + t_offs, dt.to(dt_ptr.dtype.element_ty), mask=ld_ok)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(stride_b, stride_hw, stride_c) of a dense 2-D / NCHW / channels-last tensor."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1)
    if x.shape[3] > 1 and x.shape[2] > 1 and x.stride(2) != x.shape[3] * x.stride(3):
        raise ValueError("KD kernel needs NCHW-contiguous or channels-last logits (H, W must flatten)")
    return x.stride(0), x.stride(3) if x.shape[3] > 1 else x.stride(2), x.stride(1)


def kd_forward_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss float32 0-d, dS or None, dT or None); gradients for grad_out = 1, in the inputs' strides.

    mask: optional bool/uint8 (N,) keep-mask in row order.
    """
    if student.shape != teacher.shape or student.device != teacher.device:
        raise ValueError(f"student/teacher differ: {tuple(student.shape)} on {student.device} vs "
                         f"{tuple(teacher.shape)} on {teacher.device}")
    C = student.shape[1]
    tp = tile_params(C)
    n = student.numel() // C
    hw = n if student.dim() == 2 else student.shape[2] * student.shape[3]
    if n >= _MAX_ROWS:
        raise ValueError(f"fused KD kernel indexes rows in int32: N={n} rows must be < {_MAX_ROWS}")
    dev = student.device
    if mask is None:  # M = N >= 1 is known on the host: one fill, no host-to-device copy
        m_arg, kept = None, float(n)
        scale = torch.full((1,), tau / kept, dtype=torch.float32, device=dev)
    else:
        m_arg = (mask if mask.dim() == 1 else mask.reshape(-1)).contiguous().view(torch.uint8)
        kept = m_arg.sum().double()  # an exact count (an fp32 sum is not beyond 2^24 rows); no host sync
        kept = kept.clamp_min(1.0)
        scale = (tau / kept).reshape(1).to(torch.float32)
    # cdiv(cdiv(n, rows), gpp) in plain Python: triton.cdiv is a constexpr_function, slow to call on the host
    programs = -(-n // (tp["GROUP_ROWS"] * _DEFAULT_GPP))
    part = torch.empty(programs, dtype=torch.float32, device=dev)
    ds = torch.empty_like(student) if need_student else None
    dt = torch.empty_like(teacher) if need_teacher else None
    _kd_fwd_bwd_kernel[(programs,)](
        student, teacher, m_arg if m_arg is not None else part, scale, part,
        ds if ds is not None else part, dt if dt is not None else part,
        n, C, hw, *_row_strides(student), *_row_strides(teacher), float(tau),
        BLOCK_C=tp["BLOCK_C"], GROUP_ROWS=tp["GROUP_ROWS"], GROUPS_PER_PROGRAM=_DEFAULT_GPP,
        HAS_MASK=m_arg is not None, NEED_S=need_student, NEED_T=need_teacher,
        num_warps=tp["num_warps"],
    )
    loss = part.double().sum() * (tau * tau) / kept
    return loss.float(), ds, dt


# ----------------------------------------------------------------------------------------------
# Static specs (tests/aot, benchmarks/kernel_report.py; see notes in docs/design.md)
# ----------------------------------------------------------------------------------------------


def _signature(s_ty: str, t_ty: str, need_s: bool, need_t: bool) -> dict:
    sig = {"s_ptr": s_ty, "t_ptr": t_ty, "m_ptr": "*u8", "scale_ptr": "*fp32", "part_ptr": "*fp32",
           "ds_ptr": s_ty if need_s else "*fp32", "dt_ptr": t_ty if need_t else "*fp32",
           "N": "i32", "C": "i32", "HW": "i32"}
    for pre in ("s", "t"):
        sig.update({f"{pre}_sb": "i32", f"{pre}_shw": "i32", f"{pre}_sc": "i32"})
    sig["tau"] = "fp32"
    return sig


def _spec(C: int, s_dt: torch.dtype, t_dt: torch.dtype, layout: str, gpp: int, has_mask: bool,
          need_s: bool, need_t: bool, aligned: bool) -> dict:
    tp = tile_params(C)
    ones = {"nchw": ("s_shw", "t_shw"), "nhwc": ("s_sc", "t_sc"), "2d": ("s_sc", "t_sc")}[layout]
    const = {"BLOCK_C": tp["BLOCK_C"], "GROUP_ROWS": tp["GROUP_ROWS"], "GROUPS_PER_PROGRAM": gpp,
             "HAS_MASK": has_mask, "NEED_S": need_s, "NEED_T": need_t, **{k: 1 for k in ones}}
    sig = {**_signature(_TRITON_TY[s_dt], _TRITON_TY[t_dt], need_s, need_t),
           **{k: "constexpr" for k in const}}
    # the integers Triton finds divisible by 16 at run time for aligned tensors and typical feature
    # maps (N, HW and the image strides; NCHW class strides = HW; row strides and C when C % 16 == 0)
    div16 = {"N", "HW", "s_sb", "t_sb"} if aligned else set()
    if aligned and layout == "nchw":
        div16 |= {"s_sc", "t_sc"}
    if aligned and C % 16 == 0:
        div16 |= {"C"} | ({"s_shw", "t_shw"} if layout in ("nhwc", "2d") else set())
    names = _kd_fwd_bwd_kernel.arg_names
    hinted = [i for i, a in enumerate(names) if sig[a] != "constexpr"
              and ((aligned and sig[a].startswith("*")) or a in div16)]
    return {"name": f"kd.fwd_bwd[C={C},{layout},gpp={gpp},mask={has_mask},dS={need_s},dT={need_t}]",
            "fn": _kd_fwd_bwd_kernel, "signature": sig, "constexprs": const,
            "attrs": {(i,): [["tt.divisibility", 16]] for i in hinted},
            "num_warps": tp["num_warps"], "num_stages": 1, "maxnreg": None,
            "loss": "kd", "kernel": "fwd_bwd", "layout": layout, "C": C, "dtype": str(s_dt).split(".")[-1]}


def report_specs(C: int, dtype: torch.dtype, layout: str, shape: tuple[int, ...] | None = None) -> list[dict]:
    """The one kernel a forward+backward launches (no mask, dS only, default config); see the contract.
    The kernel's specialisation does not depend on `shape` (hints: H*W a multiple of 16)."""
    return [_spec(C, dtype, dtype, layout, _DEFAULT_GPP, False, True, False, aligned=True)]


def program_plan(spec: dict, shape: tuple[int, ...]) -> dict:
    """Grid, rows per program, loop trips and minimum HBM bytes per row for logits of ``shape``."""
    C = shape[1]
    n = shape[0] if len(shape) == 2 else shape[0] * shape[2] * shape[3]
    rows = spec["constexprs"]["GROUP_ROWS"] * spec["constexprs"]["GROUPS_PER_PROGRAM"]
    elt = torch.empty(0, dtype=getattr(torch, spec["dtype"])).element_size()
    tensors = 2 + spec["constexprs"]["NEED_S"] + spec["constexprs"]["NEED_T"]  # read S, T; write dS, dT
    return {"programs": triton.cdiv(n, rows), "rows_per_program": rows,
            "loop_trips": [spec["constexprs"]["GROUPS_PER_PROGRAM"]],
            "bytes_per_row": float(tensors * C * elt)}


def aot_kernel_specs(C: int, dtype: torch.dtype, teacher_dtype: torch.dtype | None = None) -> list[dict]:
    """Every variant the launcher can JIT for C classes (mask on/off; no gradient, dS, dT, both), aligned,
    in the NCHW and channels-last specialisations."""
    t_dt = teacher_dtype or dtype
    return [_spec(C, dtype, t_dt, layout, _DEFAULT_GPP, mask, ns, nt, aligned=True)
            for layout in ("nchw", "nhwc") for mask in (False, True)
            for ns, nt in ((False, False), (True, False), (False, True), (True, True))]
