"""The torch backend's Inductor-compiled CPU path (``torch_backend.COMPILE_MIN_ELEMS`` and above).

The threshold is lowered for these tests so that small inputs take the compiled path (compile time
does not depend on the size); each test checks through ``COMPILED_CALLS`` which path ran.
"""

import pytest
import torch
from loss_reference64 import dist64
from test_loss_parity import BF16, F32, TOL, assert_grad_close, make, random_mask
from torch import nn

import fastdist
from fastdist.loss import torch_backend

SHAPE = (2, 19, 9, 11)


@pytest.fixture
def low_threshold(monkeypatch):
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_ELEMS", 1000)


def _run(s, t, mask, teacher_grad=True, beta=1.0, gamma=2.0, tau=2.0):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fastdist.dist_loss(s, t, beta, gamma, tau, backend="auto", mask=mask)
    loss.backward()
    return loss.detach(), s.grad, t.grad


def _calls():
    return torch_backend.COMPILED_CALLS["_stats_of"], torch_backend.COMPILED_CALLS["_grads_into"]


# fp32 NCHW without teacher gradient: the same compiled graphs as the compiled-model test below
@pytest.mark.parametrize("dtype,channels_last,masked", [(F32, False, False), (BF16, True, True)])
def test_compiled_matches_fp64_reference(low_threshold, dtype, channels_last, masked):
    teacher_grad = masked
    s, t = make(SHAPE, (dtype, dtype), channels_last, seed=3)
    mask = random_mask(SHAPE, seed=4).reshape(SHAPE[0], *SHAPE[2:]) if masked else None
    before = _calls()
    loss, d_s, d_t = _run(s, t, mask, teacher_grad)
    assert _calls() == (before[0] + 1, before[1] + 1), "the compiled forward and backward did not run"
    ref_loss, ref_ds, ref_dt = dist64(s, t, 1.0, 2.0, 2.0, mask)
    assert abs(loss.item() - ref_loss.item()) <= TOL[dtype][0] * 4.0 * 3.0
    assert (d_t is not None) == teacher_grad
    for grad, ref, x in ((d_s, ref_ds, s), (d_t, ref_dt, t))[: 1 + teacher_grad]:
        assert grad.dtype == x.dtype and grad.stride() == x.stride()
        assert_grad_close(grad, ref, TOL[dtype][1], f"compiled grad {dtype} cl={channels_last}")
    again = _run(s, t, mask, teacher_grad)
    for x, y in zip((loss, d_s, d_t)[: 2 + teacher_grad], again, strict=False):
        assert torch.equal(x, y), "compiled path not bitwise reproducible"


def test_small_inputs_stay_eager():
    s, t = make(SHAPE, seed=5)
    assert s.numel() < torch_backend.COMPILE_MIN_ELEMS
    before = _calls()
    _run(s, t, None)
    assert _calls() == before


def test_compiled_inside_compiled_model(low_threshold):
    """torch.compile(fullgraph=True) of model + loss: the custom op's body runs the compiled path at run
    time (a compile inside a compiled graph) and gives the eager pieces' loss and gradients."""
    torch.manual_seed(0)
    net = nn.Conv2d(3, 19, 1)
    x, teacher = torch.randn(2, 3, 9, 11), torch.randn(2, 19, 9, 11)
    crit = fastdist.DISTLoss(beta=1.0, gamma=2.0, tau=2.0, backend="torch")

    def step(images, target):
        return crit(net(images), target)

    def run(fn):
        net.zero_grad()
        loss = fn(x, teacher)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    before = _calls()
    loss_c, grads_c = run(torch.compile(step, fullgraph=True))
    assert _calls()[0] > before[0] and _calls()[1] > before[1]
    torch_backend.COMPILE_MIN_ELEMS = 1 << 30  # restored by the fixture: eager pieces for the baseline
    loss_e, grads_e = run(step)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
