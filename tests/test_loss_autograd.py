"""Autograd of the fused path: gradcheck, torch.library.opcheck, torch.compile, saved-tensor memory."""

import pytest
import torch
from torch import nn

import fastdist
from fastdist.loss import ops


def _inputs(shape, dtype=torch.float64, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=gen, dtype=dtype)
    t = 0.5 * s + torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return s.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize(
    "shape,masked,channels_last",
    [((2, 4, 3, 3), False, False), ((2, 4, 3, 3), True, True), ((11, 3), True, False)],
)
def test_gradcheck_torch_backend(shape, masked, channels_last):
    s, t = _inputs(shape, channels_last=channels_last)
    mask = None
    if masked:
        pixels = (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:])
        mask = torch.rand(pixels, generator=torch.Generator().manual_seed(1)) < 0.7

    def fn(student, teacher):
        return fastdist.dist_loss(student, teacher, beta=2.0, gamma=1.5, tau=3.0, backend="torch", mask=mask)

    assert torch.autograd.gradcheck(fn, (s, t), fast_mode=len(shape) == 4)


def _op_args(backend, shape=(2, 5, 3, 4), masked=True, channels_last=False, dtype=torch.float32):
    s, t = _inputs(shape, dtype=dtype, seed=2, channels_last=channels_last)
    mask = (torch.arange(s.numel() // s.shape[1]) % 3 != 0) if masked else None
    return s, t, mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked,channels_last", [(False, False), (True, True)])
def test_opcheck(backend, masked, channels_last):
    s, t, mask = _op_args(backend, masked=masked, channels_last=channels_last)
    torch.library.opcheck(ops.dist_loss_fwd, (s, t, mask, 2.0, 1.0, 0.5, backend, False, ""))
    coef = torch.randn(5, s.shape[1])
    row = torch.randn(1)
    grad = torch.tensor(1.5)
    for need in [(True, True), (True, False), (False, True)]:
        args = (s.detach(), t.detach(), mask, coef, row, grad, 2.0, backend, *need)
        torch.library.opcheck(ops.dist_loss_bwd, args)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    """A small conv net plus the loss (with a mask) compiles without graph breaks; fwd/bwd equal eager."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1))
    crit = fastdist.DISTLoss(beta=2.0, gamma=2.0, tau=4.0, backend=backend)
    x = torch.randn(2, 3, 8, 10)
    teacher = torch.randn(2, 6, 8, 10)
    mask = torch.rand(2, 8, 10) < 0.8

    def step(images, target, keep):
        return crit(net(images), target, keep)

    def run(fn):
        net.zero_grad()
        loss = fn(x, teacher, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    torch._dynamo.reset()
    loss_c, grads_c = run(torch.compile(step, fullgraph=True))
    loss_e, grads_e = run(step)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


def _saved_bytes(backend, shape=(8, 19, 128, 256)):
    """Bytes of distinct storages autograd saves for the loss's backward (student requires grad)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(shape, generator=gen).requires_grad_(True)
    t = torch.randn(shape, generator=gen)
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fastdist.dist_loss(s, t, backend=backend)
    return sum(storages.values())


def test_saved_tensor_bytes():
    """The fused backends save the two inputs and O(C) coefficients; reference saves several N x C."""
    assert _saved_bytes("torch") <= 0.4 * _saved_bytes("reference")


def test_saved_tensor_bytes_triton():
    """Same op and autograd registration as torch; checked at a smaller size (the interpreter is slow)."""
    shape = (2, 19, 32, 64)
    assert _saved_bytes("triton", shape) <= 0.4 * _saved_bytes("reference", shape)
