"""KD and CWD losses: every backend against independent float64 implementations of the formulas.

The references below are written from the definitions (explicit exp / log-sum-exp in float64, no
F.kl_div), so they share no code with fastdist. Gradients of the references come from float64
autograd. Triton runs under TRITON_INTERPRET=1 (small shapes).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fastdist

TRITON = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "reference", *(["triton"] if TRITON else [])]
# (dtype, atol relative to the largest |gradient| of the reference, rtol)
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 3e-2),
    torch.float64: (1e-12, 1e-10),
}
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-12}


def _log_softmax64(x: torch.Tensor, dim: int) -> torch.Tensor:
    m = x.max(dim, keepdim=True).values
    return x - m - (x - m).exp().sum(dim, keepdim=True).log()


def kd64(s: torch.Tensor, t: torch.Tensor, tau: float, mask: torch.Tensor | None) -> torch.Tensor:
    """tau^2 * mean over kept rows of KL(softmax(t/tau) || softmax(s/tau)), rows = pixels."""
    C = s.shape[1]
    rows = [x.double().movedim(1, -1).reshape(-1, C) for x in (s, t)]
    if mask is not None:
        rows = [r[mask.reshape(-1)] for r in rows]
    ls, lt = (_log_softmax64(r / tau, 1) for r in rows)
    if rows[0].shape[0] == 0:
        return (s.double().sum() + t.double().sum()) * 0
    return tau**2 * (lt.exp() * (lt - ls)).sum() / rows[0].shape[0]


def cwd64(s: torch.Tensor, t: torch.Tensor, tau: float, mask: torch.Tensor | None) -> torch.Tensor:
    """tau^2 / (B C) * sum over (b, c) of KL between the spatial softmaxes of the kept positions."""
    B, C = s.shape[:2]
    total = (s.double().sum() + t.double().sum()) * 0
    for b in range(B):
        keep = torch.ones(s.shape[2:], dtype=torch.bool) if mask is None else mask[b]
        if not keep.any():
            continue
        for c in range(C):
            ls = _log_softmax64(s[b, c][keep].double() / tau, 0)
            lt = _log_softmax64(t[b, c][keep].double() / tau, 0)
            total = total + (lt.exp() * (lt - ls)).sum()
    return tau**2 * total / (B * C)


LOSSES = {"kd": (fastdist.kd_loss, kd64), "cwd": (fastdist.cwd_loss, cwd64)}


def _make(shape, dtype, layout, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = ((scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(2))
    if layout == "nhwc":
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return s.requires_grad_(), t.requires_grad_()


def _check(name, backend, s, t, tau, mask):
    fn, ref = LOSSES[name]
    loss = fn(s, t, tau=tau, mask=mask, backend=backend)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    gs, gt = torch.autograd.grad(loss, (s, t))
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref_loss = ref(s64, t64, tau, mask)
    rs, rt = torch.autograd.grad(ref_loss, (s64, t64))
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=LOSS_TOL[s.dtype], atol=1e-6)
    atol, rtol = TOL[s.dtype]
    # absolute errors scale with the gradient scale tau / M shared by dS and dT (dT alone can be ~0:
    # a one-hot teacher with KL exactly matched by l)
    atol = atol * max(rs.abs().max().item(), rt.abs().max().item())
    for got, want, like in ((gs, rs, s), (gt, rt, t)):
        assert got.dtype == like.dtype
        if backend != "reference":  # the fused backends return gradients with the input's strides
            assert got.stride() == like.stride()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# (shape, layout, dtype, tau, masked): odd shapes, both layouts, every dtype, several tau
CASES = [
    ((2, 5, 3, 7), "nchw", torch.float32, 1.0, False),
    ((2, 5, 3, 7), "nhwc", torch.float32, 4.0, True),
    ((3, 19, 5, 3), "nchw", torch.float16, 2.0, True),
    ((1, 7, 9, 11), "nhwc", torch.bfloat16, 0.5, False),
    ((2, 2, 4, 5), "nchw", torch.bfloat16, 4.0, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{str(c[2])[6:]}-tau{c[3]}-m{c[4]:d}")
@pytest.mark.parametrize("name", LOSSES)
def test_parity(name, case, backend):
    shape, layout, dtype, tau, masked = case
    s, t = _make(shape, dtype, layout)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(shape[0], *shape[2:], generator=g) < 0.7) if masked else None
    _check(name, backend, s, t, tau, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_2d_input(backend, dtype):
    s, t = _make((37, 19), dtype, "2d")
    mask = torch.arange(37) % 3 != 0
    _check("kd", backend, s, t, 2.0, None)
    _check("kd", backend, s, t, 2.0, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_edge_cases(name, backend):
    # one-hot-like logits, |x| ~ 1e4 (probabilities underflow to exactly 0), C = 2
    def hot(shift):
        labels = (torch.arange(12) + shift) % 3
        return 30.0 * torch.nn.functional.one_hot(labels, 3).T.float().reshape(1, 3, 3, 4)

    s, t = hot(1).requires_grad_(), hot(0).requires_grad_()
    _check(name, backend, s, t, 1.0, None)
    s, t = _make((2, 3, 2, 3), torch.float32, "nchw", scale=1e4)
    _check(name, backend, s, t, 1.0, None)
    s, t = _make((2, 2, 3, 3), torch.float32, "nhwc")
    _check(name, backend, s, t, 4.0, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cwd_one_position_per_plane_and_empty_mask(backend):
    s, t = _make((3, 4, 1, 1), torch.float32, "nchw")
    loss = fastdist.cwd_loss(s, t, backend=backend)  # a softmax over one position is 1: KL = 0
    assert loss.item() == 0.0
    assert not torch.autograd.grad(loss, s)[0].any()
    s, t = _make((2, 3, 2, 3), torch.float32, "nchw")
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[1] = False  # the second image keeps no position: its planes contribute 0
    _check("cwd", backend, s, t, 4.0, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_no_kept_row_and_nan_in_excluded_rows(backend):
    s, t = _make((2, 5, 2, 3), torch.float32, "nchw")
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    loss = fastdist.kd_loss(s, t, mask=mask, backend=backend)
    assert loss.item() == 0.0 and not torch.autograd.grad(loss, s)[0].any()
    with torch.no_grad():
        s[0, :, 0, 0] = float("nan")
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 0] = False
    _check("kd", backend, s, t, 2.0, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_c1024(backend):
    s, t = _make((3, 1024), torch.float32, "2d")
    _check("kd", backend, s, t, 1.0, None)
    if backend != "triton":  # 1024 programs (one per plane) are too slow for the interpreter; the
        # kernel uses C only to split the program id into (b, c), tested with C = 2 .. 19 above
        s, t = _make((1, 1024, 1, 2), torch.float32, "nhwc")
        _check("cwd", backend, s, t, 4.0, None)


@pytest.mark.skipif(not TRITON, reason="the Triton kernel's two-pass path runs under TRITON_INTERPRET=1")
def test_cwd_two_pass_fallback(monkeypatch):
    from kernels import cwd_loss as K

    monkeypatch.setattr(K, "MAX_BLOCK", 16)  # planes of 99 positions: 7 chunks, online log-sum-exp
    assert K.block_params(99)["NUM_BLOCKS"] == 7
    s, t = _make((2, 3, 9, 11), torch.float32, "nchw")
    mask = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[1, :3] = False  # whole chunks without a kept position
    _check("cwd", "triton", s, t, 4.0, mask)
    s, t = _make((2, 3, 9, 11), torch.bfloat16, "nhwc")
    _check("cwd", "triton", s, t, 2.0, None)


@pytest.mark.skipif(not TRITON, reason="Triton under TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", LOSSES)
def test_triton_is_bitwise_deterministic_and_forward_only(name):
    fn = LOSSES[name][0]
    s, t = _make((2, 5, 3, 7), torch.bfloat16, "nhwc")
    a, b = fn(s, t, backend="triton"), fn(s, t, backend="triton")
    assert torch.equal(a, b)
    ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0]
    assert torch.equal(ga, gb)
    with torch.no_grad():  # no gradient kernel variant: same value
        assert torch.equal(fn(s, t, backend="triton"), a)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_torch_backend(name):
    fn = LOSSES[name][0]
    s, t = _make((2, 3, 2, 3), torch.float64, "nchw", scale=1.0)
    mask = torch.tensor([[[1, 0, 1], [1, 1, 1]], [[1, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, tau=2.0, mask=mask, backend="torch"), (s, t))


@pytest.mark.parametrize("name", LOSSES)
def test_validation_matches_dist_loss(name):
    fn = LOSSES[name][0]
    s = torch.randn(2, 3, 4, 5)
    bad = [
        ((s, torch.randn(2, 3, 4, 6)), {}),
        ((s, s.int()), {}),
        ((s[:, :1], s[:, :1]), {}),
        ((s, s), {"tau": 0.0}),
        ((s, s), {"backend": "cuda"}),
        ((s, s), {"mask": torch.ones(2, 4, 5)}),
        ((s, s), {"mask": torch.ones(2, 4, 4, dtype=torch.bool)}),
    ]
    for args, kw in bad:
        with pytest.raises(ValueError) as want:
            fastdist.dist_loss(*args, **kw)
        with pytest.raises(ValueError) as got:
            fn(*args, **kw)
        assert str(got.value) == str(want.value)
    if name == "cwd":
        with pytest.raises(ValueError, match=r"CWD needs \(B, C, H, W\) logits"):
            fn(torch.randn(6, 3), torch.randn(6, 3))


def test_modules_and_defaults():
    s, t = _make((2, 4, 3, 3), torch.float32, "nchw")
    kd = fastdist.KDLoss(tau=2.0, backend="torch")
    assert torch.equal(kd(s, t), fastdist.kd_loss(s, t, 2.0, backend="torch"))
    assert torch.equal(fastdist.CWDLoss(backend="torch")(s, t), fastdist.cwd_loss(s, t, 4.0, backend="torch"))
    assert "tau=4.0" in repr(fastdist.CWDLoss())
    with pytest.raises(ValueError, match="tau must be > 0"):
        fastdist.KDLoss(tau=-1.0)


@pytest.mark.parametrize("name", LOSSES)
def test_compile_fullgraph_matches_eager(name):
    """A small conv net plus the loss compiles without graph breaks; loss and weight grads equal eager."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1))
    fn = LOSSES[name][0]
    x, teacher = torch.randn(2, 3, 6, 7), torch.randn(2, 5, 6, 7)
    mask = torch.rand(2, 6, 7) < 0.8

    def step(images, target, keep):
        return fn(net(images), target, tau=2.0, mask=keep, backend="torch")

    def run(f):
        net.zero_grad()
        loss = f(x, teacher, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    torch._dynamo.reset()
    loss_c, grads_c = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    loss_e, grads_e = run(step)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-7)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-7)
