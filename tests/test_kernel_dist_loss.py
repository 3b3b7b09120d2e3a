"""Kernel-level tests of kernels/dist_loss.py, run in the Triton interpreter (TRITON_INTERPRET=1).

The launchers' statistics and gradients are compared with an independent float64 implementation:
the DIST formula of docs/design.md written directly with torch float64 ops, and its gradient
obtained by torch autograd (not the closed form the kernel uses).
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    # `make test-interp` always sets it; elsewhere (e.g. `make gpu-check`) the skip is reported.
    pytest.skip("kernel-level tests need TRITON_INTERPRET=1 set before triton is imported "
                "(run `make test-interp`)", allow_module_level=True)

import torch  # noqa: E402

from kernels import dist_loss as K  # noqa: E402

# dtype of a gradient / input -> (atol relative to the largest reference value, rtol)
TOL = {
    torch.float64: (2e-5, 1e-4),  # fp64 logits are computed in fp32 too
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


# ------------------------------------------------------------------------------------------------
# float64 reference
# ------------------------------------------------------------------------------------------------


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C) view of 2-D or (B, C, H, W) logits, row n = b*H*W + h*W + w."""
    if x.dim() == 2:
        return x
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def ref_terms(S, T, tau, mask):
    """Per-row r_i and the column statistics of the kept rows, in float64 (differentiable)."""
    p = torch.softmax(as_rows(S).double() / tau, dim=1)
    q = torch.softmax(as_rows(T).double() / tau, dim=1)
    if mask is not None:
        keep = mask.bool()
        p, q = p[keep], q[keep]
    a = p - p.mean(1, keepdim=True)
    b = q - q.mean(1, keepdim=True)
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    r = (a * b).sum(1) / (na * nb + 1e-8)
    mu_p, mu_q = p.mean(0), q.mean(0)
    A, B = p - mu_p, q - mu_q
    col = torch.stack([mu_p, mu_q, (A * A).sum(0), (B * B).sum(0), (A * B).sum(0)])
    return r, col, A, B


def ref_stats(S, T, tau, mask):
    with torch.no_grad():
        r, col, _, _ = ref_terms(S, T, tau, mask)
    return torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64)]), col


def ref_loss(S, T, beta, gamma, tau, mask):
    r, _, A, B = ref_terms(S, T, tau, mask)
    nA = torch.linalg.vector_norm(A, dim=0)
    nB = torch.linalg.vector_norm(B, dim=0)
    rc = (A * B).sum(0) / (nA * nB + 1e-8)
    return tau**2 * (beta * (1 - r.sum() / r.numel()) + gamma * (1 - rc.sum() / rc.numel()))


def coefs(col_stats, M, beta, gamma, tau):
    """col_coef (5, C) float32 and row_coef (1,) float32 from float64 statistics (docs/design.md)."""
    C = col_stats.shape[1]
    mu_p, mu_q, m2p, m2q, cpq = col_stats
    nA, nB = m2p.sqrt(), m2q.sqrt()
    D = nA * nB + 1e-8
    k = -(tau**2) * gamma / C
    kB = k / D
    kAs = torch.where(nA > 0, k * cpq * nB / (nA.clamp_min(1e-300) * D * D), torch.zeros_like(D))
    kAt = torch.where(nB > 0, k * cpq * nA / (nB.clamp_min(1e-300) * D * D), torch.zeros_like(D))
    col_coef = torch.stack([mu_p, mu_q, kB, kAs, kAt]).float()
    row_coef = torch.tensor([-(tau**2) * beta / M], dtype=torch.float32)
    return col_coef, row_coef


def ref_grads(S, T, beta, gamma, tau, mask, grad_out):
    s = S.detach().double().requires_grad_(True)
    t = T.detach().double().requires_grad_(True)
    loss = ref_loss(s, t, beta, gamma, tau, mask)
    ds, dt = torch.autograd.grad(loss * grad_out, (s, t))
    return ds, dt


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make(shape, dtype, layout, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "rows":
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    if layout == "cols":  # 2-D with stride (1, N)
        n, c = shape
        return (torch.randn(c, n, generator=g) * scale).to(dtype).t()
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "hwswap":  # H and W not flattenable into one stride
        b, c, h, w = shape
        return (torch.randn(b, c, w, h, generator=g) * scale).to(dtype).transpose(2, 3)
    raise ValueError(layout)


def close(got, want, dtype, what, atol_floor=0.0):
    atol_rel, rtol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    atol = max(atol_rel * scale, atol_floor)
    got = got.double()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bool(bad.any()), (f"{what}: max abs err {err.max().item():.3e} (atol {atol:.3e}, "
                                 f"rtol {rtol}); {int(bad.sum())} of {bad.numel()} elements off")


def check_stats(S, T, tau, mask, **kw):
    rs, cs = K.dist_forward_stats(S, T, tau, mask, **kw)
    assert rs.dtype == torch.float64 and rs.shape == (2,)
    assert cs.dtype == torch.float64 and cs.shape == (5, S.shape[1])
    rs_ref, cs_ref = ref_stats(S, T, tau, mask)
    assert rs[1].item() == rs_ref[1].item()
    M = max(rs_ref[1].item(), 1.0)
    assert abs(rs[0].item() - rs_ref[0].item()) <= 2e-5 * M, (rs, rs_ref)
    # means: absolute; M2 / C_pq: relative to the column's scale (sum of p^2 ~ M / C)
    assert (cs[:2] - cs_ref[:2]).abs().max().item() <= 2e-6, (cs[:2] - cs_ref[:2]).abs().max()
    m2_scale = cs_ref[2:4].abs().max().item() + 1e-12
    assert (cs[2:] - cs_ref[2:]).abs().max().item() <= 2e-5 * m2_scale + 1e-9 * M
    return rs, cs


def check_grads(S, T, tau, mask, beta, gamma, grad_out, need_s, need_t, atol_floor=0.0, stats=None, **kw):
    # coefficients from the kernel's own statistics, as the front-end does: with a degenerate column
    # (zero variance, e.g. one kept row) kB = k/1e-8 amplifies any mismatch between mu_q and q
    rs, cs = stats if stats is not None else K.dist_forward_stats(S, T, tau, mask)
    col_coef, row_coef = coefs(cs, rs[1].item(), beta, gamma, tau)
    go = torch.tensor(grad_out, dtype=torch.float32)
    ds, dt = K.dist_backward(S, T, tau, mask, col_coef, row_coef, go, need_s, need_t, **kw)
    ds_ref, dt_ref = ref_grads(S, T, beta, gamma, tau, mask, grad_out)
    for got, want, x, need, name in ((ds, ds_ref, S, need_s, "dS"), (dt, dt_ref, T, need_t, "dT")):
        if not need:
            assert got is None
            continue
        assert got.dtype == x.dtype and got.shape == x.shape and got.stride() == x.stride(), name
        close(got, want, x.dtype, name, atol_floor)
        if mask is not None:
            dead = as_rows(got)[~mask.bool()]
            assert bool((dead == 0).all()), f"{name}: masked rows must be exactly 0"
    return ds, dt


def make_mask(n, kind, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "rand":
        return torch.rand(n, generator=g) < 0.7
    if kind == "rand_u8":
        return (torch.rand(n, generator=g) < 0.5).to(torch.uint8)
    if kind == "all_but_one":
        m = torch.ones(n, dtype=torch.bool)
        m[n // 3] = False
        return m
    if kind == "one":
        m = torch.zeros(n, dtype=torch.bool)
        m[n // 2] = True
        return m
    raise ValueError(kind)


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# (shape, C-dim is 1, student (dtype, layout), teacher (dtype, layout), mask, tau, grad_out, need_teacher)
CASES = [
    pytest.param((1001, 19), (f32, "rows"), (f32, "rows"), None, 1.0, 1.0, False, id="2d-C19-f32"),
    pytest.param((333, 2), (bf16, "rows"), (f32, "rows"), "rand", 2.0, 0.7, True, id="2d-C2-bf16/f32-mask"),
    pytest.param((2, 150, 5, 7), (f16, "nchw"), (f16, "nchw"), "rand_u8", 4.0, 1.3, True, id="nchw-C150-f16"),
    pytest.param((3, 19, 9, 11), (f32, "nhwc"), (bf16, "nchw"), "all_but_one", 1.5, -2.0, True,
                 id="nhwc/nchw-C19-f32/bf16"),
    pytest.param((3, 150, 4, 4), (bf16, "nchw"), (f32, "nhwc"), "rand", 1.0, 1.0, True,
                 id="nchw/nhwc-C150-groups-in-one-image"),  # HW % GROUP_ROWS == 0: ONE_IMAGE path
    # row layout (C <= 21): several images whose H*W is a multiple of the 64-row group (ONE_IMAGE),
    # its largest C, and the tile layout just above it
    pytest.param((3, 19, 8, 16), (bf16, "nchw"), (bf16, "nhwc"), "rand", 1.0, 1.0, True,
                 id="nchw/nhwc-C19-groups-in-one-image"),
    pytest.param((2, 21, 5, 9), (f32, "nhwc"), (f32, "nhwc"), None, 2.0, 1.0, False,
                 id="nhwc-C21-row-layout-max"),
    pytest.param((2, 22, 5, 9), (f32, "nchw"), (f16, "nchw"), "rand", 1.0, 1.0, True,
                 id="nchw-C22-tile-layout"),
    pytest.param((37, 1024), (f32, "rows"), (bf16, "rows"), None, 1.0, 1.0, True, id="2d-C1024-f32/bf16"),
    pytest.param((1, 1024, 3, 5), (bf16, "nhwc"), (bf16, "nhwc"), "rand", 2.0, 0.5, False,
                 id="nhwc-C1024-bf16"),
    pytest.param((57, 19), (torch.float64, "rows"), (f32, "rows"), None, 0.5, 1.0, True, id="2d-f64/f32"),
    pytest.param((5, K.MAX_C), (f16, "rows"), (f32, "rows"), "all_but_one", 2.0, 1.0, True, id="2d-max-C"),
    pytest.param((211, 19), (f16, "cols"), (f32, "rows"), "one", 1.0, 1.0, True, id="2d-strided-one-kept"),
    pytest.param((2, 19, 6, 5), (f32, "hwswap"), (f16, "nhwc"), "rand", 3.0, 1.0, True,
                 id="hw-not-flat-copy"),
]


@pytest.mark.parametrize("shape,sd,td,mask_kind,tau,grad_out,need_t", CASES)
def test_stats_and_grads(shape, sd, td, mask_kind, tau, grad_out, need_t):
    S = make(shape, sd[0], sd[1], seed=0)
    T = make(shape, td[0], td[1], seed=1)
    n = as_rows(S).shape[0]
    mask = make_mask(n, mask_kind)
    stats = check_stats(S, T, tau, mask)
    check_grads(S, T, tau, mask, 1.0, 2.0, grad_out, True, need_t, stats=stats)
    if need_t:
        check_grads(S, T, tau, mask, 0.5, 1.0, grad_out, False, True, stats=stats)


def test_constant_rows_and_columns():
    C = 16  # power of two: a constant row gives p = 1/C exactly, so a = 0 exactly in fp32 and fp64
    S = make((97, C), f32, "rows", seed=2)
    T = make((97, C), f32, "rows", seed=3)
    S[::5] = 7.0  # constant student rows (zero variance)
    T[1::7] = -3.0  # constant teacher rows
    check_stats(S, T, 1.0, None)
    check_grads(S, T, 1.0, None, 1.0, 1.0, 1.0, True, True)
    # every row identical -> every column of p and q constant: M2 = 0, column terms vanish
    S2 = S[3:4].expand(50, C).contiguous()
    T2 = T[4:5].expand(50, C).contiguous()
    _, cs = check_stats(S2, T2, 2.0, None)
    assert cs[2:].abs().max().item() < 1e-10
    # with nA = nB ~ 0 the column term's gradient is k/1e-8 times rounding noise (in fp64 as well):
    # ill-conditioned by the loss definition, so only the row term's gradient is compared here
    ds, dt = check_grads(S2, T2, 2.0, None, 1.0, 0.0, 1.0, True, True)
    assert torch.isfinite(ds).all() and torch.isfinite(dt).all()


def test_one_hot_and_huge_logits():
    n, C = 129, 19
    idx = torch.arange(n) % C
    S = torch.nn.functional.one_hot(idx, C).float() * 30.0 + make((n, C), f32, "rows", 0.1, seed=4)
    T = torch.nn.functional.one_hot((idx * 7) % C, C).float() * 30.0
    check_stats(S, T, 1.0, None)
    # p is one-hot up to ~1e-13: dS = p (G - <p, G>) is ~1e-15 and its fp32 rounding is judged
    # against the size of the terms (|p| |G| ~ 1), not against the tiny result
    check_grads(S, T, 1.0, None, 1.0, 1.0, 1.0, True, True, atol_floor=1e-12)
    S = make((n, C), f32, "rows", 1e4, seed=5)
    T = make((n, C), f32, "rows", 1e4, seed=6)
    rs, cs = K.dist_forward_stats(S, T, 1.0, None)
    assert torch.isfinite(rs).all() and torch.isfinite(cs).all()
    check_stats(S, T, 1.0, None)
    check_stats(S, T, 4000.0, None)
    check_grads(S, T, 4000.0, None, 1.0, 1.0, 1.0, True, True)


def test_all_masked_and_empty():
    S = make((40, 19), f32, "rows", seed=7)
    T = make((40, 19), f32, "rows", seed=8)
    rs, cs = K.dist_forward_stats(S, T, 1.0, torch.zeros(40, dtype=torch.bool))
    assert rs.tolist() == [0.0, 0.0] and bool((cs == 0).all())
    cc, rc = torch.zeros(5, 19), torch.zeros(1)
    none_kept = torch.zeros(40, dtype=torch.bool)
    ds, dt = K.dist_backward(S, T, 1.0, none_kept, cc, rc, torch.tensor(1.0), True, True)
    assert bool((ds == 0).all()) and bool((dt == 0).all())
    rs, cs = K.dist_forward_stats(S[:0], T[:0], 1.0, None)
    assert rs.tolist() == [0.0, 0.0] and cs.shape == (5, 19)


def test_determinism_across_runs_and_configs():
    S = make((2, 19, 13, 11), bf16, "nhwc", seed=9)  # 286 rows: 18 records, 18 groups
    T = make((2, 19, 13, 11), f32, "nchw", seed=10)
    mask = make_mask(2 * 13 * 11, "rand")
    base_rs, base_cs = K.dist_forward_stats(S, T, 2.0, mask)
    for cfg in K.FWD_CONFIGS:
        rs, cs = K.dist_forward_stats(S, T, 2.0, mask, config=cfg)
        assert torch.equal(rs, base_rs) and torch.equal(cs, base_cs), cfg
    col_coef, row_coef = coefs(base_cs, base_rs[1].item(), 1.0, 1.0, 2.0)
    go = torch.tensor(0.8)
    base = K.dist_backward(S, T, 2.0, mask, col_coef, row_coef, go, True, True)
    for cfg in K.BWD_CONFIGS:
        got = K.dist_backward(S, T, 2.0, mask, col_coef, row_coef, go, True, True, config=cfg)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), cfg


def test_column_stats_accuracy_large_n():
    """p ~ 0.5 +- 2.5e-4 over 2^17 rows: the naive fp32 sum(p^2) - n*mu^2 loses the variance, the
    kernel's chunked centred sums + fp64 Chan merge must not."""
    n = (1 << 17) + 3
    g = torch.Generator().manual_seed(11)
    S = torch.zeros(n, 2)
    S[:, 1] = torch.randn(n, generator=g) * 1e-3
    T = torch.zeros(n, 2)
    T[:, 0] = torch.randn(n, generator=g) * 1e-3 + 0.5 * S[:, 1]
    big = {"CHUNKS_PER_PROGRAM": 256, "num_stages": 1}  # fewer, longer programs: fast in the interpreter
    rs, cs = K.dist_forward_stats(S, T, 1.0, None, config=big)
    rs_ref, cs_ref = ref_stats(S, T, 1.0, None)
    rel = ((cs[2:] - cs_ref[2:]).abs() / cs_ref[2:].abs()).max().item()
    assert rel < 1e-4, rel
    assert abs(rs[0].item() - rs_ref[0].item()) <= 1e-6 * n
    # the test is meaningful: the textbook one-pass fp32 formula is far off here
    p = torch.softmax(S, dim=1)
    naive = (p * p).sum(0) - n * p.mean(0) ** 2
    assert ((naive.double() - cs_ref[2]).abs() / cs_ref[2]).max().item() > 1e-3


def test_strides_and_dtypes_of_gradients():
    S = make((2, 19, 4, 6), f16, "nhwc", seed=12)
    T = make((2, 19, 4, 6), bf16, "nchw", seed=13)
    rs, cs = K.dist_forward_stats(S, T, 1.0, None)
    cc, rc = coefs(cs, rs[1].item(), 1.0, 1.0, 1.0)
    ds, dt = K.dist_backward(S, T, 1.0, None, cc, rc, torch.tensor(1.0), True, True)
    assert ds.is_contiguous(memory_format=torch.channels_last) and ds.dtype == f16
    assert dt.is_contiguous() and dt.dtype == bf16
    assert K.dist_backward(S, T, 1.0, None, cc, rc, torch.tensor(1.0), False, False) == (None, None)


def test_input_errors():
    S = torch.randn(8, 5000)
    with pytest.raises(ValueError, match=str(K.MAX_C)):
        K.dist_forward_stats(S, S, 1.0, None)
    with pytest.raises(ValueError, match="at least 2"):
        K.dist_forward_stats(torch.randn(8, 1), torch.randn(8, 1), 1.0, None)
    x, cc, rc, go = torch.randn(8, 19), torch.zeros(5, 19), torch.zeros(1), torch.tensor(1.0)
    for tau in (0.0, -1.0, float("nan")):  # the softmax takes the row max of the raw logits: tau > 0
        with pytest.raises(ValueError, match="tau must be > 0"):
            K.dist_forward_stats(x, x, tau, None)
        with pytest.raises(ValueError, match="tau must be > 0"):
            K.dist_backward(x, x, tau, None, cc, rc, go, True, False)
    with pytest.raises(ValueError, match="shapes differ"):
        K.dist_forward_stats(torch.randn(8, 3), torch.randn(9, 3), 1.0, None)
    with pytest.raises(ValueError, match="mask"):
        K.dist_forward_stats(torch.randn(8, 3), torch.randn(8, 3), 1.0, torch.ones(7, dtype=torch.bool))
