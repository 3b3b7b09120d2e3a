"""Fused channel-wise distillation loss (CWD, Shu et al. 2021, on the logits; as CIRKD's ``CriterionCWD``
with ``norm_type="channel"``, ``divergence="kl"``): Triton kernel + launcher.

Math. S, T are (B, C, H, W) logits; a *plane* is one (b, c) pair with its P = H*W positions. With
x = S[b, c] / tau, y = T[b, c] / tau over the kept positions of the plane::

    log phi_s = log_softmax(x),  log phi_t = log_softmax(y)     (over the positions, fp32)
    l_i = log phi_t_i - log phi_s_i,   KL_bc = sum_i phi_t_i l_i
    loss = tau^2 / (B * C) * sum_{b, c} KL_bc        (CIRKD: KLDivLoss(sum) / (n * c) * tau^2)

Backward (local to a plane; removed positions get exactly 0)::

    dL/dS_i = tau / (B C) * (phi_s_i - phi_t_i),   dL/dT_i = tau / (B C) * phi_t_i * (l_i - KL_bc)

One program per plane. A plane of P <= MAX_BLOCK (8192, the recipe's 64 x 128) positions lives in
registers (NUM_BLOCKS = 1): the plane is read once and the KL and dS (dT) are written in the same pass.
Beyond, a two-pass fallback: pass 1 walks the plane in BLOCK chunks with an online (running max)
log-sum-exp of both planes and the running sum_i e^(y_i - m_t) (y_i - x_i), pass 2 re-reads it and
writes the gradients. The gradient is written for grad_out = 1; the autograd backward multiplies it.

Memory access: element (b, c, i) at b*stride_b + c*stride_c + i*stride_p (int32 arithmetic: the
launcher requires fewer than 2^31 - 2^20 elements): NCHW reads a plane
contiguously (stride_p = 1), channels-last with stride C. Each plane writes its own KL; the launcher
sums them in fp64 (deterministic: no atomics, the reduction order depends on the shape only).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["MAX_BLOCK", "cwd_forward_backward", "report_specs", "program_plan", "aot_kernel_specs"]

MAX_BLOCK = 8192  # positions of a plane held in registers by one program
_MAX_ELEMS = 2**31 - 2**20  # element offsets are int64, plane / position indices int32
_TRITON_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_NEG = tl.constexpr(-3.0e38)  # finite "minus infinity" for running maxima: exp(_NEG - _NEG) = 1, never NaN


def block_params(P: int) -> dict:
    """Fixed geometry for planes of P positions: BLOCK, NUM_BLOCKS, num_warps (~16 elements per thread).

    NUM_BLOCKS is a constexpr (a loop with a run-time bound does not run under Triton's interpreter), so
    the two-pass fallback compiles once per plane size; the one-pass case (P <= MAX_BLOCK) does not
    depend on P beyond BLOCK."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(P, 2)))
    # maxnreg 128 (= 64K registers / 512 threads of 16 warps): without it ptxas (CUDA 12.8, sm_90)
    # capped the 8192-position no-gradient variant below that and spilled 8 bytes
    return {"BLOCK": block, "NUM_BLOCKS": triton.cdiv(P, block), "num_warps": min(16, max(4, block // 512)),
            "maxnreg": 128}


@triton.jit
def _load_plane(
    ptr,  # logits base pointer
    base,  # int32 element offset of the plane (b*stride_b + c*stride_c)
    pos,  # [BLOCK] int32 positions
    ok,  # [BLOCK] bool: position < P and kept by the mask
    stride_p,  # element stride between positions
    tau,  # temperature
):
    v = tl.load(ptr + base + pos * stride_p, mask=ok, other=0.0).to(tl.float32) / tau
    return tl.where(ok, v, float("-inf"))  # [BLOCK] removed positions get probability exactly 0


@triton.jit
def _kept(m_ptr, b, P, pos, in_plane, HAS_MASK: tl.constexpr):
    """[BLOCK] bool: position inside the plane and (with a mask) kept; mask is (B, P) uint8 contiguous."""
    if HAS_MASK:
        return in_plane & (tl.load(m_ptr + b * P + pos, mask=in_plane, other=0) != 0)
    return in_plane


@triton.jit
def _store_grads(
    ds_ptr, dt_ptr, s_base, t_base, pos, in_plane, ok, log_s, log_t, kl, scale, s_sp, t_sp,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr,
):
    """Write dS = scale (phi_s - phi_t) and dT = scale phi_t (l - KL) ([BLOCK] each, 0 where removed)."""
    phi_t = tl.where(ok, tl.exp(log_t), 0.0)  # [BLOCK]
    if NEED_S:
        ds = tl.where(ok, scale * (tl.exp(log_s) - phi_t), 0.0)  # [BLOCK]
        tl.store(ds_ptr + s_base + pos * s_sp, ds.to(ds_ptr.dtype.element_ty), mask=in_plane)
    if NEED_T:
        dt = tl.where(ok, scale * phi_t * (log_t - log_s - kl), 0.0)  # [BLOCK]
        tl.store(dt_ptr + t_base + pos * t_sp, dt.to(dt_ptr.dtype.element_ty), mask=in_plane)


@triton.jit
def _cwd_fwd_bwd_kernel(
    s_ptr,  # student logits, element (b, c, i) at b*s_sb + c*s_sc + i*s_sp
    t_ptr,  # teacher logits, element (b, c, i) at b*t_sb + c*t_sc + i*t_sp
    m_ptr,  # keep-mask of positions, uint8 (B, P) contiguous; read only when HAS_MASK
    kl_ptr,  # out: float32 (B*C,): KL_bc of each plane
    ds_ptr,  # out: dS with the student's strides (NEED_S)
    dt_ptr,  # out: dT with the teacher's strides (NEED_T)
    C,  # channels (classes)
    P,  # positions per plane (H*W)
    s_sb, s_sc, s_sp,  # student strides: image, channel, position
    t_sb, t_sc, t_sp,  # teacher strides
    tau,  # temperature
    scale,  # gradient scale tau / (B*C)
    BLOCK: tl.constexpr,  # positions per chunk (power of 2)
    NUM_BLOCKS: tl.constexpr,  # cdiv(P, BLOCK); 1: the whole plane in registers, one pass
    HAS_MASK: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_T: tl.constexpr,
):
    plane = tl.program_id(0)
    b = plane // C
    c = plane - b * C
    # int32 offsets: the launcher checks numel < 2^31 - 2^20, and 64-bit address vectors would cost
    # twice the registers of the [BLOCK] tiles (the 8192-position one-pass plane spilled with them)
    s_base = b * s_sb + c * s_sc
    t_base = b * t_sb + c * t_sc
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    if NUM_BLOCKS == 1:
        in_plane = offs < P  # [BLOCK]
        ok = _kept(m_ptr, b, P, offs, in_plane, HAS_MASK)  # [BLOCK]
        x = _load_plane(s_ptr, s_base, offs, ok, s_sp, tau)  # [BLOCK]
        y = _load_plane(t_ptr, t_base, offs, ok, t_sp, tau)  # [BLOCK]
        # max over a plane with no kept position is -inf: clamp to a finite value (its KL is then 0)
        zs = x - tl.maximum(tl.max(x, axis=0), _NEG)  # [BLOCK]
        zt = y - tl.maximum(tl.max(y, axis=0), _NEG)  # [BLOCK]
        log_s = zs - tl.log(tl.sum(tl.exp(zs), axis=0))  # [BLOCK]
        log_t = zt - tl.log(tl.sum(tl.exp(zt), axis=0))  # [BLOCK]
        kl = tl.sum(tl.where(ok, tl.exp(log_t) * (log_t - log_s), 0.0), axis=0)
        tl.store(kl_ptr + plane, kl)
        _store_grads(ds_ptr, dt_ptr, s_base, t_base, offs, in_plane, ok, log_s, log_t, kl, scale, s_sp, t_sp,
                     NEED_S, NEED_T)
    else:
        # pass 1: online log-sum-exp of x and y, and A = sum_i e^(y_i - m_t) (y_i - x_i)
        m_s = _NEG
        m_t = _NEG
        z_s = 0.0
        z_t = 0.0
        acc = 0.0
        for k in range(NUM_BLOCKS):
            pos = k * BLOCK + offs  # [BLOCK]
            in_plane = pos < P  # [BLOCK]
            ok = _kept(m_ptr, b, P, pos, in_plane, HAS_MASK)  # [BLOCK]
            x = _load_plane(s_ptr, s_base, pos, ok, s_sp, tau)  # [BLOCK]
            y = _load_plane(t_ptr, t_base, pos, ok, t_sp, tau)  # [BLOCK]
            ms_new = tl.maximum(m_s, tl.max(x, axis=0))
            mt_new = tl.maximum(m_t, tl.max(y, axis=0))
            z_s = z_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(x - ms_new), axis=0)
            e_t = tl.exp(y - mt_new)  # [BLOCK] 0 where removed
            rescale = tl.exp(m_t - mt_new)
            z_t = z_t * rescale + tl.sum(e_t, axis=0)
            acc = acc * rescale + tl.sum(tl.where(ok, e_t * (y - x), 0.0), axis=0)
            m_s = ms_new
            m_t = mt_new
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        # KL = sum phi_t (y - x) - lse_t + lse_s; a plane without kept positions has KL 0
        kl = tl.where(z_t > 0, acc / z_t - lse_t + lse_s, 0.0)
        tl.store(kl_ptr + plane, kl)
        if NEED_S or NEED_T:
            # pass 2: re-read the plane and write the gradients
            for k in range(NUM_BLOCKS):
                pos = k * BLOCK + offs  # [BLOCK]
                in_plane = pos < P  # [BLOCK]
                ok = _kept(m_ptr, b, P, pos, in_plane, HAS_MASK)  # [BLOCK]
                log_s = _load_plane(s_ptr, s_base, pos, ok, s_sp, tau) - lse_s  # [BLOCK]
                log_t = _load_plane(t_ptr, t_base, pos, ok, t_sp, tau) - lse_t  # [BLOCK]
                _store_grads(ds_ptr, dt_ptr, s_base, t_base, pos, in_plane, ok, log_s, log_t, kl, scale,
                             s_sp, t_sp, NEED_S, NEED_T)


@functools.lru_cache(maxsize=1024)
def _launch_params(P: int, max_block: int) -> dict:
    """``block_params(P)``, computed once per (P, MAX_BLOCK): the launcher's host hot path (MAX_BLOCK,
    which tests lower, is part of the key; the dict is shared: read only)."""
    return block_params(P)


def _plane_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(stride_b, stride_c, stride_position) of an NCHW-contiguous or channels-last 4-D tensor."""
    _, _, h, w = x.shape
    if w > 1 and h > 1 and x.stride(2) != w * x.stride(3):
        raise ValueError("CWD kernel needs NCHW-contiguous or channels-last logits (H, W must flatten)")
    return x.stride(0), x.stride(1), x.stride(3) if w > 1 else x.stride(2)


def cwd_forward_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float,
    mask: torch.Tensor | None,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss float32 0-d, dS or None, dT or None) of (B, C, H, W) logits; gradients for grad_out = 1.

    mask: optional bool/uint8 keep-mask of positions, (B*H*W,) in (b, h, w) order.
    """
    if student.dim() != 4 or student.shape != teacher.shape or student.device != teacher.device:
        raise ValueError(f"CWD needs matching (B, C, H, W) logits on one device, got {tuple(student.shape)} "
                         f"on {student.device} and {tuple(teacher.shape)} on {teacher.device}")
    B, C, H, W = student.shape
    if student.numel() >= _MAX_ELEMS:
        raise ValueError(f"fused CWD kernel addresses elements in int32: {student.numel()} elements must "
                         f"be < {_MAX_ELEMS}")
    bp = _launch_params(H * W, MAX_BLOCK)
    dev = student.device
    kl = torch.empty(B * C, dtype=torch.float32, device=dev)
    m_arg = None
    if mask is not None:
        m_arg = (mask if mask.dim() == 1 else mask.reshape(-1)).contiguous().view(torch.uint8)
    ds = torch.empty_like(student) if need_student else None
    dt = torch.empty_like(teacher) if need_teacher else None
    _cwd_fwd_bwd_kernel[(B * C,)](
        student, teacher, m_arg if m_arg is not None else kl, kl,
        ds if ds is not None else kl, dt if dt is not None else kl,
        C, H * W, *_plane_strides(student), *_plane_strides(teacher), float(tau), float(tau) / (B * C),
        BLOCK=bp["BLOCK"], NUM_BLOCKS=bp["NUM_BLOCKS"], HAS_MASK=m_arg is not None,
        NEED_S=need_student, NEED_T=need_teacher, num_warps=bp["num_warps"], maxnreg=bp["maxnreg"],
    )
    loss = kl.double().sum() * (tau * tau / (B * C))
    return loss.float(), ds, dt


# ----------------------------------------------------------------------------------------------
# Static specs (tests/aot, benchmarks/kernel_report.py)
# ----------------------------------------------------------------------------------------------


def _spec(P: int, s_dt: torch.dtype, t_dt: torch.dtype, layout: str, has_mask: bool, need_s: bool,
          need_t: bool, C: int = 19) -> dict:
    bp = block_params(P)
    s_ty, t_ty = _TRITON_TY[s_dt], _TRITON_TY[t_dt]
    unit = ("s_sp", "t_sp") if layout == "nchw" else ("s_sc", "t_sc")
    const = {"BLOCK": bp["BLOCK"], "NUM_BLOCKS": bp["NUM_BLOCKS"], "HAS_MASK": has_mask, "NEED_S": need_s,
             "NEED_T": need_t, **{k: 1 for k in unit}}
    sig = {"s_ptr": s_ty, "t_ptr": t_ty, "m_ptr": "*u8", "kl_ptr": "*fp32",
           "ds_ptr": s_ty if need_s else "*fp32", "dt_ptr": t_ty if need_t else "*fp32",
           "C": "i32", "P": "i32",
           "s_sb": "i32", "s_sc": "i32", "s_sp": "i32", "t_sb": "i32", "t_sc": "i32", "t_sp": "i32",
           "tau": "fp32", "scale": "fp32", **{k: "constexpr" for k in const}}
    # what Triton finds divisible by 16 at run time: pointers of torch allocations; with P % 16 == 0
    # P, the image strides (C * P) and the NCHW channel strides (P); with C % 16 == 0 C and the
    # channels-last position strides (C)
    div16 = set()
    if P % 16 == 0:
        div16 |= {"s_sb", "t_sb", "P"} | ({"s_sc", "t_sc"} if layout == "nchw" else set())
    if C % 16 == 0:
        div16 |= {"C"} | ({"s_sp", "t_sp"} if layout == "nhwc" else set())
    hinted = [i for i, a in enumerate(_cwd_fwd_bwd_kernel.arg_names)
              if sig[a] != "constexpr" and (sig[a].startswith("*") or a in div16)]
    return {"name": f"cwd.fwd_bwd[P={P},{layout},mask={has_mask},dS={need_s},dT={need_t}]",
            "fn": _cwd_fwd_bwd_kernel, "signature": sig, "constexprs": const,
            "attrs": {(i,): [["tt.divisibility", 16]] for i in hinted},
            "num_warps": bp["num_warps"], "num_stages": 1, "maxnreg": bp["maxnreg"],
            "loss": "cwd", "kernel": "fwd_bwd", "layout": layout, "C": C, "dtype": str(s_dt).split(".")[-1]}


def report_specs(C: int, dtype: torch.dtype, layout: str, shape: tuple[int, ...] | None = None) -> list[dict]:
    """The kernel a forward+backward launches for planes of P = H*W positions of `shape` (default: the
    recipe's 64 x 128 logits), no mask, dS only. CWD needs 4-D input: layout "2d" has no specs."""
    if layout == "2d":
        return []
    P = 64 * 128 if shape is None else shape[2] * shape[3]
    return [_spec(P, dtype, dtype, layout, False, True, False, C)]


def program_plan(spec: dict, shape: tuple[int, ...]) -> dict:
    """One program per (b, c) plane; a plane is P elements, i.e. P / C pixel rows' worth of logits."""
    B, C, H, W = shape
    P = H * W
    elt = torch.empty(0, dtype=getattr(torch, spec["dtype"])).element_size()
    k = spec["constexprs"]
    grads = k["NEED_S"] + k["NEED_T"]
    one = k["NUM_BLOCKS"] == 1
    trips = [] if one else [k["NUM_BLOCKS"]] * (2 if grads else 1)
    reads = 2 if one or not grads else 4  # the fallback re-reads S and T in pass 2
    return {"programs": B * C, "rows_per_program": max(1, P // C),
            "loop_trips": trips, "bytes_per_row": float((reads + grads) * C * elt)}


def aot_kernel_specs(P: int, dtype: torch.dtype, teacher_dtype: torch.dtype | None = None) -> list[dict]:
    """Every variant the launcher can JIT for planes of P positions: mask on/off; no gradient, dS, dT,
    both; NCHW and channels-last."""
    t_dt = teacher_dtype or dtype
    return [_spec(P, dtype, t_dt, layout, mask, ns, nt)
            for layout in ("nchw", "nhwc") for mask in (False, True)
            for ns, nt in ((False, False), (True, False), (False, True), (True, True))]
