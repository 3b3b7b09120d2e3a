"""Statistics merge and backward coefficients shared by the fused backends.

Every fused backend (``torch``, ``triton``) reduces the inputs to two small float64 tensors:

* ``row_stats`` (2,): ``[sum_i r_i, M]`` -- the sum of the per-row Pearson correlations over the kept
  rows and the number of kept rows M.
* ``col_stats`` (5, C): ``[mu_p, mu_q, M2_p, M2_q, C_pq]`` over the kept rows, with
  ``A = p - mu_p``, ``B = q - mu_q``, ``M2_p = sum_i A^2``, ``M2_q = sum_i B^2``, ``C_pq = sum_i A*B``.

Two sets of statistics merge exactly (Chan et al.): with ``delta = mu_2 - mu_1`` and ``n = n_1 + n_2``::

    mu   = mu_1 + delta * n_2 / n
    M2   = M2_1 + M2_2 + delta^2 * n_1 * n_2 / n
    C_pq = C_1 + C_2 + delta_p * delta_q * n_1 * n_2 / n

From the (possibly cross-rank merged) statistics, :func:`coefficients` gives the loss and the O(C)
coefficients ``[mu_p, mu_q, kB, kA_s, kA_t]`` and ``[w_row]`` of the closed-form backward; their
formulas are in ``docs/design.md`` ("Statistics" and "Backward, closed form"), with ``EPS`` the
epsilon of both Pearson denominators and a term whose norm in the denominator is 0 taken as 0.
W is the number of ranks whose statistics were merged (1 without ``intra_sync``): DDP averages the
gradients over W ranks, so the factor W makes the averaged gradient that of one process.
"""

import torch
from torch import Tensor

EPS = 1e-8


def output_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    """Dtype of the loss and of the backward coefficients: float64 if an input is float64, else float32."""
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def merge_stats(row_1: Tensor, col_1: Tensor, row_2: Tensor, col_2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two sets of (row_stats, col_stats) exactly (Chan); differentiable, no host sync.

    The counts are ``row_*[1]``; an empty set (count 0) is the identity of the merge.
    """
    n_1, n_2 = row_1[1], row_2[1]
    n = n_1 + n_2
    n_safe = n.clamp_min(1)
    delta = col_2[:2] - col_1[:2]
    mu = col_1[:2] + delta * (n_2 / n_safe)
    weight = n_1 * n_2 / n_safe
    m2 = col_1[2:4] + col_2[2:4] + delta * delta * weight
    c_pq = col_1[4:] + col_2[4:] + delta[:1] * delta[1:] * weight
    return row_1 + row_2, torch.cat([mu, m2, c_pq])


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (the limit the closed-form backward takes)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def coefficients(
    row_stats: Tensor,
    col_stats: Tensor,
    beta: float,
    gamma: float,
    tau: float,
    world: int,
    coef_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss value, ``col_coef`` (5, C) = [mu_p, mu_q, kB, kA_s, kA_t] and ``row_coef`` (1,) = [w_row].

    Computed in float64 from the float64 statistics; ``col_coef``/``row_coef`` are cast to
    ``coef_dtype``. The loss is float64 here (the caller casts). With M = 0 kept rows both
    correlations are taken as 0: the loss is ``tau^2 * (beta + gamma)`` and the gradients are 0.
    """
    num_classes = col_stats.shape[1]
    sum_r, count = row_stats[0], row_stats[1].clamp_min(1)
    mu_p, mu_q, m2_p, m2_q, c_pq = col_stats.unbind(0)
    n_a, n_b = m2_p.sqrt(), m2_q.sqrt()
    den = n_a * n_b + EPS
    tau2 = tau * tau
    loss = tau2 * (beta * (1 - sum_r / count) + gamma * (1 - (c_pq / den).mean()))
    k = -tau2 * gamma * world / num_classes
    k_over_d2 = k * c_pq / (den * den)
    col_coef = torch.stack(
        [mu_p, mu_q, k / den, _safe_div(k_over_d2 * n_b, n_a), _safe_div(k_over_d2 * n_a, n_b)]
    )
    row_coef = (-tau2 * beta * world / count).reshape(1)
    return loss, col_coef.to(coef_dtype), row_coef.to(coef_dtype)
