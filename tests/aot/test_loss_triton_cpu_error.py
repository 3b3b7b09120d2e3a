"""Without TRITON_INTERPRET, backend="triton" on CPU tensors raises a clear error (auto uses torch)."""

import os

import pytest
import torch

import fastdist

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="checks the error raised without TRITON_INTERPRET"
)


def test_triton_backend_on_cpu_raises():
    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    with pytest.raises(RuntimeError, match="backend='triton' on CPU tensors needs the Triton interpreter"):
        fastdist.dist_loss(s, t, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastdist.DISTLoss(backend="triton")(s, t)


def test_auto_backend_on_cpu_uses_torch():
    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    assert torch.equal(fastdist.dist_loss(s, t), fastdist.dist_loss(s, t, backend="torch"))
