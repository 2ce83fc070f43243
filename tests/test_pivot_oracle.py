"""The pivot oracle's closed-form ridge map (benchmarks/studies/pivot_oracle.py)."""

import torch

from benchmarks.studies.pivot_oracle import Ridge


def test_ridge_recovers_an_affine_map_and_shrinks_with_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    y = x @ w + b
    fit = Ridge(x, y, lam=1e-9)
    z = torch.randn(5, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fit(z), z @ w + b)
    strong = Ridge(x, y, lam=1e3)  # heavy shrinkage: the map tends to the teacher mean
    assert (strong(z) - y.mean(0)).norm() < 0.05 * (fit(z) - y.mean(0)).norm()
