"""Accuracy at scale: torch backend on N = 4M rows (student = teacher + small noise) vs float64.

The float64 side is an independent chunked implementation of the published formula: row correlations
summed, column means in a first pass and centred column sums in a second, and for the gradient of
the first rows the exact Chan merge of their (differentiable) statistics with those of the rest.
"""

import torch

import fastdist

N, C, TAU, BETA, GAMMA = 1 << 22, 19, 2.0, 1.0, 2.0
SUB = 4096  # rows whose float64 gradient is checked
CHUNK = 1 << 18
EPS = 1e-8


def _probs(x):
    return torch.softmax(x.double() / TAU, dim=1)


def _row_r(p, q):
    a, b = p - p.mean(1, keepdim=True), q - q.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def _stats(s, t):
    """Float64 (count, sum r, mu_p, mu_q, M2_p, M2_q, C_pq) of rows s, t (chunked, two passes)."""
    sum_r, sum_p, sum_q = 0.0, torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for i in range(0, len(s), CHUNK):
        p, q = _probs(s[i : i + CHUNK]), _probs(t[i : i + CHUNK])
        sum_r += _row_r(p, q).sum().item()
        sum_p, sum_q = sum_p + p.sum(0), sum_q + q.sum(0)
    mu_p, mu_q = sum_p / len(s), sum_q / len(s)
    m2_p, m2_q, c_pq = (torch.zeros(C, dtype=torch.float64) for _ in range(3))
    for i in range(0, len(s), CHUNK):
        a, b = _probs(s[i : i + CHUNK]) - mu_p, _probs(t[i : i + CHUNK]) - mu_q
        m2_p, m2_q, c_pq = m2_p + (a * a).sum(0), m2_q + (b * b).sum(0), c_pq + (a * b).sum(0)
    return len(s), sum_r, mu_p, mu_q, m2_p, m2_q, c_pq


def _loss(n, sum_r, m2_p, m2_q, c_pq):
    intra = 1 - (c_pq / (m2_p.sqrt() * m2_q.sqrt() + EPS)).mean()
    return TAU**2 * (BETA * (1 - sum_r / n) + GAMMA * intra)


def _loss_with_sub_grad(s, t, rest):
    """Float64 loss over all rows, differentiable w.r.t. the first SUB student rows."""
    n_2, sum_r2, mu_p2, mu_q2, m2_p2, m2_q2, c_pq2 = rest
    s_sub = s[:SUB].double().requires_grad_(True)
    p, q = _probs(s_sub), _probs(t[:SUB])
    mu_p1, mu_q1 = p.mean(0), q.mean(0)
    a, b = p - mu_p1, q - mu_q1
    n = SUB + n_2
    d_p, d_q = mu_p2 - mu_p1, mu_q2 - mu_q1
    w = SUB * n_2 / n
    m2_p = (a * a).sum(0) + m2_p2 + d_p * d_p * w
    m2_q = (b * b).sum(0) + m2_q2 + d_q * d_q * w
    c_pq = (a * b).sum(0) + c_pq2 + d_p * d_q * w
    loss = _loss(n, _row_r(p, q).sum() + sum_r2, m2_p, m2_q, c_pq)
    (grad,) = torch.autograd.grad(loss, s_sub)
    return loss.detach(), grad


def test_torch_backend_accuracy_4m_rows():
    gen = torch.Generator().manual_seed(0)
    teacher = 2 * torch.randn(N, C, generator=gen)
    student = teacher + 0.05 * torch.randn(N, C, generator=gen)
    s = student.clone().requires_grad_(True)
    loss = fastdist.dist_loss(s, teacher, BETA, GAMMA, TAU, backend="torch")
    loss.backward()

    rest = _stats(student[SUB:], teacher[SUB:])
    ref_loss, ref_grad = _loss_with_sub_grad(student, teacher, rest)
    assert ref_loss.item() < 0.05  # student ~ teacher: 1 - r is small, a cancellation-prone regime
    assert abs(loss.item() - ref_loss.item()) <= 2e-5 * ref_loss.item(), (loss.item(), ref_loss.item())
    err = (s.grad[:SUB].double() - ref_grad).abs().max() / ref_grad.abs().max()
    assert err < 1e-4, err.item()
