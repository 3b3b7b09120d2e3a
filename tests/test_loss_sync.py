"""intra_sync: 2 gloo ranks under torchrun with DDP give the single-process gradients of the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loss_sync_worker import LOSS_KW, constant_rows, dtype_for, global_batch, make_model, step

import fastdist

WORKER = Path(__file__).with_name("loss_sync_worker.py")
BACKENDS = ["torch", "reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out), ",".join(BACKENDS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_intra_sync_matches_single_process(ranks, backend):
    images, teacher, mask = global_batch(backend)
    loss_1, grads_1 = step(make_model(backend), images, teacher, mask, backend, intra_sync=False)
    (loss_a, grads_a), (loss_b, grads_b) = (r[(backend, True)] for r in ranks)
    # float64 runs agree to ~1e-12. The fp32 (triton) run: its single-process conv grads are themselves
    # ~5e-6 (relative to the max) off the float64 truth (cancelling sums), so 2e-5.
    tol = 1e-12 if dtype_for(backend) == torch.float64 else 2e-5
    assert torch.equal(loss_a, loss_b)  # the same global loss on every rank
    torch.testing.assert_close(loss_a, loss_1, rtol=tol, atol=0)
    for g_a, g_b, g_1 in zip(grads_a, grads_b, grads_1, strict=True):
        assert torch.equal(g_a, g_b)  # DDP averaged
        torch.testing.assert_close(g_a, g_1, rtol=tol, atol=tol * g_1.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_intra_sync_differs(ranks, backend):
    """Per-rank losses average to different gradients: the test above can fail."""
    images, teacher, mask = global_batch(backend)
    loss_1, grads_1 = step(make_model(backend), images, teacher, mask, backend, intra_sync=False)
    (loss_a, grads_a), (loss_b, _) = (r[(backend, False)] for r in ranks)
    assert not torch.equal(loss_a, loss_b)
    diffs = [(g_a - g_1).abs().max() / g_1.abs().max() for g_a, g_1 in zip(grads_a, grads_1, strict=True)]
    assert max(diffs) > 1e-3


def test_explicit_process_group(ranks):
    for r in ranks:
        (loss_g, grads_g), (loss_d, grads_d) = r["torch", "group"], r["torch", True]
        assert torch.equal(loss_g, loss_d)
        assert all(torch.equal(a, b) for a, b in zip(grads_g, grads_d, strict=True))


def test_explicit_process_group_compiled(ranks):
    """The loss with an explicit group under torch.compile(fullgraph=True) gives the eager result."""
    for r in ranks:
        (loss_c, grads_c), (loss_e, grads_e) = r["torch", "group", "compiled"], r["torch", "group"]
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=0)
        for a, b in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_intra_sync_constant_columns(ranks, backend):
    """Columns constant over the whole global batch: finite, the single-process loss, W x its gradient."""
    s, t = constant_rows(rows=6)  # both ranks' rows together
    s.requires_grad_(True)
    loss_1 = fastdist.dist_loss(s, t, backend=backend, **LOSS_KW)
    (grad_1,) = torch.autograd.grad(loss_1, s)
    for r in ranks:
        loss, (grad,) = r[backend, "constant"]
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
        torch.testing.assert_close(loss, loss_1.detach(), rtol=1e-12, atol=0)
        # A = p - mu_p is a rounding residue (~1e-17) here, which the column term's 1/(0 + 1e-8) scales
        # by 1e8: the merged and the single-process statistics round differently, so 1e-6 of the max
        torch.testing.assert_close(grad, 2 * grad_1[:3], rtol=0, atol=1e-6 * grad_1.abs().max().item())


def test_intra_sync_needs_process_group():
    s = torch.randn(6, 4)
    for backend in ("torch", "reference"):
        with pytest.raises(RuntimeError, match="initialized torch.distributed"):
            fastdist.dist_loss(s, s, backend=backend, intra_sync=True)


def test_loss_kwargs_are_used():
    assert LOSS_KW["gamma"] != LOSS_KW["beta"]  # both terms weigh in with distinct weights
