"""Loss and gradient parity of every backend with the independent float64 reference.

Run with TRITON_INTERPRET=1 (the Makefile does) so that the Triton backend runs on CPU.
"""

import math

import pytest
import torch
from loss_reference64 import as_rows, dist64

import fastdist
from fastdist.loss import api

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
FUSED = ["torch", "triton"]
BACKENDS = ["torch", "triton", "reference"]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# dtype -> (loss rtol, gradient tolerance). The reference sees the same (rounded) inputs, so the loss
# only carries the fp32 arithmetic error; gradients are returned in the input dtype and carry its
# rounding. Gradients are compared with rtol = atol / max|ref| = the tolerance.
TOL = {F32: (2e-5, 1e-4), F16: (2e-5, 2e-3), BF16: (2e-5, 1.6e-2)}


def make(shape, dtypes=(F32, F32), channels_last=False, device="cpu", scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen) * scale
    t = (s + torch.randn(shape, generator=gen) * scale) * 0.7
    s, t = s.to(device, dtypes[0]), t.to(device, dtypes[1])
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return s, t


def run_backend(backend, s, t, beta=1.0, gamma=1.0, tau=1.0, mask=None, teacher_grad=True):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fastdist.dist_loss(s, t, beta, gamma, tau, backend=backend, mask=mask)
    loss.backward()
    return loss, s.grad, t.grad


def assert_grad_close(grad, ref, tol, what):
    assert grad.shape == ref.shape, what
    scale = ref.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), ref.cpu(), rtol=tol, atol=tol * scale + 1e-30, msg=what)


def check(backend, s, t, beta=1.0, gamma=1.0, tau=1.0, mask=None, grad_tol=None):
    loss, d_s, d_t = run_backend(backend, s, t, beta, gamma, tau, mask)
    ref_loss, ref_ds, ref_dt = dist64(s, t, beta, gamma, tau, mask)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.device == s.device
    loss_tol = max(TOL[s.dtype][0], TOL[t.dtype][0]) * tau * tau * (beta + gamma)
    assert abs(loss.item() - ref_loss.item()) <= loss_tol, (loss.item(), ref_loss.item())
    assert d_s.dtype == s.dtype and d_t.dtype == t.dtype
    assert_grad_close(d_s, ref_ds, grad_tol or TOL[s.dtype][1], f"{backend} student grad")
    assert_grad_close(d_t, ref_dt, grad_tol or TOL[t.dtype][1], f"{backend} teacher grad")
    return loss, d_s, d_t


PARAMS = [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (0.5, 1.0, 0.3)]  # (tau, beta, gamma)
# (shape, channels_last, (tau, beta, gamma)): odd sizes, 2-D and 4-D, both memory formats, C=2 and
# larger C; each case names its own hyper-parameters, so adding a case changes no other case
SHAPES = [
    ((37, 19), False, PARAMS[0]),
    ((2, 19, 5, 7), False, PARAMS[2]),
    ((2, 19, 5, 7), True, PARAMS[2]),
    ((3, 2, 4, 5), True, PARAMS[0]),
    ((1, 33, 3, 11), False, PARAMS[1]),
]
DTYPES = [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32), (F32, F16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape,channels_last,params", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_grid(backend, shape, channels_last, params, dtypes, device):
    s, t = make(shape, dtypes, channels_last, device, seed=len(shape) + shape[1])
    tau, beta, gamma = params
    check(backend, s, t, beta, gamma, tau)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau,beta,gamma", PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_params(backend, tau, beta, gamma, device):
    s, t = make((2, 7, 6, 5), device=device, seed=3)
    check(backend, s, t, beta, gamma, tau)


def test_hand_computed_c2():
    """C=2, N=2, tau=1: S = [[ln3, 0], [0, ln3]], T = [[0, ln3], [ln3, 0]].

    p = [[3/4, 1/4], [1/4, 3/4]], q = [[1/4, 3/4], [3/4, 1/4]].
    Rows: a_1 = (1/4, -1/4), b_1 = (-1/4, 1/4): <a,b> = -1/8, ||a|| ||b|| = 1/8, so r_1 = -(1/8)/(1/8 + 1e-8);
    row 2 is the mirror image: r_2 = r_1. inter = 1 + 1/(1 + 8e-8).
    Columns: p[:, 0] = (3/4, 1/4), q[:, 0] = (1/4, 3/4): centred (1/4, -1/4) and (-1/4, 1/4), the same
    r = -(1/8)/(1/8 + 1e-8); column 1 likewise. intra = 1 + 1/(1 + 8e-8).
    loss = tau^2 (beta inter + gamma intra) = 2 (1 + 1/(1 + 8e-8)) for beta = gamma = 1.
    """
    ln3 = math.log(3.0)
    s = torch.tensor([[ln3, 0.0], [0.0, ln3]], dtype=torch.float64)
    t = torch.tensor([[0.0, ln3], [ln3, 0.0]], dtype=torch.float64)
    expected = 2.0 * (1.0 + 1.0 / (1.0 + 8e-8))
    assert dist64(s, t)[0].item() == pytest.approx(expected, rel=1e-12)
    for backend in BACKENDS:
        if backend != "triton":  # float64 input: the fused kernels take fp32/fp16/bf16
            assert fastdist.dist_loss(s, t, backend=backend).item() == pytest.approx(expected, rel=1e-12)
        loss32 = fastdist.dist_loss(s.float(), t.float(), backend=backend)
        assert loss32.item() == pytest.approx(expected, rel=1e-6)


def _randn(*shape, g, scale=1.0):
    return torch.randn(shape, generator=g) * scale


def _one_hot_like(g):
    """Saturated but not exactly constant columns: a column that is constant in exact arithmetic is
    not in fp32 (mean rounding), and its r_j = C_pq / (|A| |B| + 1e-8) then is rounding noise in any
    fp32 implementation of the formula, hence the small noise on both sides."""
    labels = torch.randint(0, 19, (2, 50), generator=g)
    hot = 30 * torch.nn.functional.one_hot(labels, 19).float()
    return hot[0] + _randn(50, 19, g=g, scale=0.1), hot[1] + _randn(50, 19, g=g, scale=0.1)


EDGE_CASES = {
    # teacher logits all 0 (C=16: q = 1/16 exactly, so b = B = 0 exactly): constant rows and columns
    "constant_teacher": lambda g: (torch.randn(3, 16, 4, 5, generator=g), torch.zeros(3, 16, 4, 5)),
    # constant student rows (C=16, exact): ||a|| = 0, D = 1e-8, the gradient is w * b / 1e-8
    "constant_student_rows": lambda g: (torch.zeros(45, 16), torch.randn(45, 16, generator=g)),
    "one_hot_like": _one_hot_like,
    "huge_logits": lambda g: (_randn(2, 11, 6, 7, g=g, scale=1e4), _randn(2, 11, 6, 7, g=g, scale=1e4)),
    "rows_not_block_multiple": lambda g: (_randn(1031, 5, g=g), _randn(1031, 5, g=g)),
    "c2_many_rows": lambda g: (_randn(4, 2, 17, 9, g=g), _randn(4, 2, 17, 9, g=g)),
    "c1024": lambda g: (_randn(2, 1024, 3, 5, g=g), _randn(2, 1024, 3, 5, g=g)),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, case):
    s, t = EDGE_CASES[case](torch.Generator().manual_seed(1))
    if case == "huge_logits":
        # Nearly one-hot rows: the softmax backward p_i (G_i - sum_k p_k G_k) cancels to ~1e-4 of G
        # for the top class, so any fp32 implementation (torch's softmax backward too) is only good to
        # ~1e-7 / 1e-4 relative there.
        check(backend, s, t, beta=2.0, gamma=2.0, tau=1.0, grad_tol=1e-3)
    else:
        check(backend, s, t, beta=2.0, gamma=2.0, tau=4.0)


@pytest.mark.parametrize(
    "shape,channels_last", [((12, 32768), False), ((1, 32768, 3, 4), True), ((1, 32768, 3, 4), False)]
)
def test_torch_backend_many_classes(shape, channels_last):
    """Thousands of classes (above the Triton limit, where ``auto`` uses this backend): the fp32 loss
    stays within 2e-6 of float64 (the fp32 reference formula's own error here is ~1e-6)."""
    s, t = make(shape, channels_last=channels_last, seed=8)
    loss, d_s, _ = run_backend("torch", s, t)
    ref_loss, ref_ds, _ = dist64(s, t)
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item())
    assert_grad_close(d_s, ref_ds, 1e-4, "torch student grad")


def random_mask(shape, seed=0, p_keep=0.6):
    pixels = (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:])
    return torch.rand(pixels, generator=torch.Generator().manual_seed(seed)) < p_keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,channels_last", [((2, 6, 5, 7), True), ((2, 6, 5, 7), False), ((41, 9), False)]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_parity(backend, shape, channels_last, device):
    s, t = make(shape, channels_last=channels_last, device=device, seed=5)
    mask = random_mask(shape).to(device)
    loss, d_s, d_t = check(backend, s, t, 2.0, 2.0, 4.0, mask=mask)
    dropped = ~mask.reshape(-1).cpu()
    rows_ds, rows_dt = as_rows(d_s).cpu(), as_rows(d_t).cpu()
    assert (rows_ds[dropped] == 0).all() and (rows_dt[dropped] == 0).all()
    # the masked loss is the loss of the kept rows alone (2-D), with the same gradients on those rows
    kept = mask.reshape(-1)
    s_rows = s.movedim(1, -1).reshape(-1, shape[1]) if s.dim() == 4 else s
    t_rows = t.movedim(1, -1).reshape(-1, shape[1]) if t.dim() == 4 else t
    loss_k, d_sk, d_tk = run_backend(backend, s_rows[kept], t_rows[kept], 2.0, 2.0, 4.0)
    assert loss.item() == pytest.approx(loss_k.item(), rel=1e-6)
    assert_grad_close(rows_ds[~dropped], d_sk.double(), 1e-5, "kept student rows")
    assert_grad_close(rows_dt[~dropped], d_tk.double(), 1e-5, "kept teacher rows")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_in_excluded_rows(backend, bad):
    """Excluded rows are not read into the loss: NaN/inf there (e.g. overflow in padding) changes nothing."""
    s, t = make((2, 6, 5, 7), seed=6)
    mask = random_mask((2, 6, 5, 7), seed=3)
    clean = run_backend(backend, s, t, 1.0, 2.0, 2.0, mask=mask)
    dropped = ~mask
    s_bad, t_bad = s.clone(), t.clone()
    s_bad.movedim(1, -1)[dropped] = bad  # whole rows (all classes) of the dropped pixels
    t_bad[:, 2][dropped] = bad  # one class of the dropped pixels
    got = run_backend(backend, s_bad, t_bad, 1.0, 2.0, 2.0, mask=mask)
    assert math.isfinite(got[0].item())
    for x, y in zip(got, clean, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_flat_equals_pixel_mask(backend):
    s, t = make((2, 5, 4, 3), seed=6)
    mask = random_mask((2, 5, 4, 3), seed=2)
    a = run_backend(backend, s, t, mask=mask)
    b = run_backend(backend, s, t, mask=mask.reshape(-1))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_all_dropped(backend):
    """No kept rows: both correlations are taken as 0, so loss = tau^2 (beta + gamma), zero gradients."""
    s, t = make((2, 5, 3, 3), seed=7)
    loss, d_s, d_t = run_backend(backend, s, t, 2.0, 3.0, 2.0, mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(4.0 * 5.0)
    assert (d_s == 0).all() and (d_t == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_memory_formats(backend):
    """Channels-last student with an NCHW teacher (and mixed dtypes); each gradient keeps its format."""
    s, _ = make((2, 9, 5, 6), (F32, F32), channels_last=True, seed=12)
    _, t = make((2, 9, 5, 6), (F32, BF16), channels_last=False, seed=12)
    _, d_s, d_t = check(backend, s, t, 2.0, 2.0, 4.0)
    if backend != "reference":
        assert d_s.is_contiguous(memory_format=torch.channels_last) and d_t.is_contiguous()


@pytest.mark.parametrize("backend", FUSED)
def test_channels_last_not_copied(backend):
    """The fused backends read channels-last logits in place and return channels-last gradients."""
    s, t = make((2, 7, 5, 6), channels_last=True, seed=8)
    s.requires_grad_(True)
    t.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.data_ptr()) or x, lambda x: x):
        loss = fastdist.dist_loss(s, t, backend=backend)
    assert s.data_ptr() in saved and t.data_ptr() in saved
    loss.backward()
    for grad in (s.grad, t.grad):
        assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()


def test_teacher_without_grad():
    s, t = make((20, 6), seed=9)
    for backend in BACKENDS:
        loss, d_s, d_t = run_backend(backend, s, t, teacher_grad=False)
        assert d_s is not None and d_t is None


def test_module_matches_function():
    s, t = make((2, 5, 4, 4), seed=10)
    crit = fastdist.DISTLoss(beta=2.0, gamma=0.5, tau=3.0, backend="torch")
    assert torch.equal(crit(s, t), fastdist.dist_loss(s, t, 2.0, 0.5, 3.0, backend="torch"))
    assert "tau=3.0" in repr(crit)


def test_auto_backend_resolution():
    s, t = make((8, 4))
    assert api._resolve_backend("auto", s, t) == "torch"
    assert torch.equal(fastdist.dist_loss(s, t), fastdist.dist_loss(s, t, backend="torch"))


def test_auto_takes_triton_only_where_the_kernels_fit():
    from kernels.dist_loss import MAX_C

    def fits(c: int, dtype: torch.dtype = torch.float32) -> bool:
        x = torch.empty(2, c, dtype=dtype)
        return api._triton_fits(x, x)

    assert fits(2) and fits(MAX_C)
    assert not fits(MAX_C + 1) and not fits(19, torch.float64)


def test_non_dense_input_is_handled():
    """A non-contiguous, non-channels-last view is made dense once; result equals the dense input."""
    base, t = make((2, 5, 6, 4), seed=11)
    s = base.transpose(2, 3).contiguous().transpose(2, 3)  # H/W-swapped strides
    assert not s.is_contiguous() and not s.is_contiguous(memory_format=torch.channels_last)
    for backend in BACKENDS:
        expected = fastdist.dist_loss(base, t, backend=backend)
        torch.testing.assert_close(fastdist.dist_loss(s, t, backend=backend), expected)


S_OK = torch.randn(2, 4, 3, 3)
VALIDATION = [
    (dict(student=S_OK, teacher=torch.randn(2, 4, 3, 2)), "shapes differ"),
    (dict(student=torch.randn(2, 4, 3), teacher=torch.randn(2, 4, 3)), r"expected \(N, C\) or \(B, C, H"),
    (dict(student=S_OK.long(), teacher=S_OK), "student dtype must be"),
    (dict(student=S_OK, teacher=S_OK.int()), "teacher dtype must be"),
    (dict(student=torch.randn(5, 1), teacher=torch.randn(5, 1)), "at least 2 classes"),
    (dict(student=torch.randn(0, 4, 3, 3), teacher=torch.randn(0, 4, 3, 3)), "empty batch"),
    (dict(student=S_OK, teacher=S_OK.to("meta")), "devices differ"),
    (dict(student=S_OK, teacher=S_OK, mask=torch.ones(2, 3, 3)), "mask dtype must be torch.bool"),
    (dict(student=S_OK, teacher=S_OK, mask=torch.ones(2, 3, 2, dtype=torch.bool)), "mask shape must be"),
    (dict(student=S_OK, teacher=S_OK, mask=torch.ones(18, dtype=torch.bool, device="meta")), "mask device"),
    (dict(student=S_OK, teacher=S_OK, mask=[True] * 18), "mask must be a bool tensor"),
    (dict(student=S_OK, teacher=S_OK, backend="cuda"), "unknown backend"),
    (dict(student=S_OK, teacher=S_OK, tau=0.0), "tau must be > 0"),
    (dict(student=S_OK.double(), teacher=S_OK, backend="triton"), "supports float32, float16 and bfloat16"),
    (dict(student=S_OK.numpy(), teacher=S_OK), "must be tensors"),
]


@pytest.mark.parametrize("kwargs,match", VALIDATION, ids=[m for _, m in VALIDATION])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdist.dist_loss(**kwargs)


def test_module_validation_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        fastdist.DISTLoss(backend="fast")
    with pytest.raises(ValueError, match="tau must be > 0"):
        fastdist.DISTLoss(tau=-1.0)


BAD_HYPERPARAMS = [
    ("tau", float("inf"), ValueError, "tau must be finite"),
    ("tau", float("nan"), ValueError, "tau must be finite"),
    ("tau", 0.0, ValueError, "tau must be > 0"),
    ("beta", float("nan"), ValueError, "beta must be finite"),
    ("beta", float("-inf"), ValueError, "beta must be finite"),
    ("gamma", float("inf"), ValueError, "gamma must be finite"),
    ("gamma", -0.5, ValueError, "gamma must be >= 0"),
    ("beta", -1, ValueError, "beta must be >= 0"),
    # a wrong type is a ValueError like every bad value (and a TypeError too)
    ("beta", "1.0", ValueError, "beta must be a real number"),
    ("beta", "1.0", TypeError, "beta must be a real number"),
    ("gamma", None, ValueError, "gamma must be a real number"),
    ("tau", True, ValueError, "tau must be a real number"),
    ("beta", torch.tensor(1.0), ValueError, "beta must be a real number"),
    ("beta", torch.tensor(1.0), TypeError, "beta must be a real number"),
]


@pytest.mark.parametrize(
    "name,value,exc,match", BAD_HYPERPARAMS, ids=[f"{n}={v!r}-{e.__name__}" for n, v, e, _ in BAD_HYPERPARAMS]
)
@pytest.mark.parametrize("intra_sync", [False, True])
def test_bad_hyperparams_rejected(name, value, exc, match, intra_sync):
    """Every front-end (function, module, intra-sync variants) rejects the value, naming the parameter."""
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(exc, match=match):
        fastdist.dist_loss(s, t, intra_sync=intra_sync, **{name: value})
    with pytest.raises(exc, match=match):
        fastdist.DISTLoss(intra_sync=intra_sync, **{name: value})


def test_bad_intra_sync_rejected():
    with pytest.raises(TypeError, match="intra_sync must be a bool"):
        fastdist.dist_loss(torch.randn(4, 3), torch.randn(4, 3), intra_sync="yes")


def test_hyperparams_edge_values_accepted():
    """Zero weights and integer values are legal: the loss is the hand-computed weighted sum."""
    s, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    inter = fastdist.dist_loss(s, t, beta=1, gamma=0, tau=2, backend="torch")
    intra = fastdist.dist_loss(s, t, beta=0, gamma=1, tau=2, backend="torch")
    both = fastdist.dist_loss(s, t, beta=1, gamma=1, tau=2, backend="torch")
    torch.testing.assert_close(inter + intra, both, atol=1e-12, rtol=1e-12)
