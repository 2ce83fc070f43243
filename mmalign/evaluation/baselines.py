"""Baselines every recipe is reported beside: closed-form least-squares maps and plain R@1.

A recipe that does not beat a ridge map fitted on the same frozen training features has learned nothing a
linear layer could not; every report shows both (``docs/results.md``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

#: Ridge strengths tried by :func:`pick_ridge`, relative to the sample count.
RIDGE_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def ridge_fit(x: Tensor, y: Tensor, lam: float) -> Callable[[Tensor], Tensor]:
    """Closed-form ridge regression ``y ~ (x - mx) W + my`` (float64); returns the map.

    Args:
        x: Source features ``[N, Dx]``.
        y: Target features ``[N, Dy]``.
        lam: Ridge strength relative to ``N`` (the penalty is ``lam * N * |W|^2``).
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    w = torch.linalg.solve(xc.T @ xc + lam * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    return lambda z: ((z.double() - mx) @ w + my).float()


def pick_ridge(
    x: Tensor, y: Tensor, score: Callable[[Callable[[Tensor], Tensor]], float], lambdas: Sequence[float] = RIDGE_LAMBDAS,
) -> tuple[Callable[[Tensor], Tensor], float]:
    """Ridge map with the lambda that maximises ``score(map)`` (computed on a validation split)."""
    best = max(((score(ridge_fit(x, y, lam)), lam) for lam in lambdas), key=lambda t: t[0])
    return ridge_fit(x, y, best[1]), best[1]


def r1(query: Tensor, gallery: Tensor, q_labels: Sequence, g_labels: Sequence) -> float:
    """R@1 of ``query`` rows retrieving the ``gallery`` row with the same label (cosine)."""
    from mmalign.evaluation.retrieval import retrieval_metrics

    return retrieval_metrics(query, gallery, list(q_labels), list(g_labels))["R@1"]
