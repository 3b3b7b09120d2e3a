"""The fused backends are bitwise reproducible run to run (no atomics, fixed reduction orders)."""

import pytest
import torch

import fastdist

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


def _run(backend, s, t, mask):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fastdist.dist_loss(s, t, 2.0, 2.0, 4.0, backend=backend, mask=mask)
    loss.backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bitwise_reproducible(backend, masked, device):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 19, 33, 41) if device == "cuda" else (2, 19, 17, 23)
    s = torch.randn(shape, generator=gen).to(device, memory_format=torch.channels_last)
    t = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
    mask = (torch.rand(shape[0], *shape[2:], generator=gen) < 0.7).to(device) if masked else None
    first = _run(backend, s, t, mask)
    for _ in range(2):
        again = _run(backend, s, t, mask)
        for x, y in zip(first, again, strict=True):
            assert torch.equal(x, y)
