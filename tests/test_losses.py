import math

import pytest
import torch
import torch.nn.functional as F

import mmalign.losses as losses
from mmalign.losses import ClipLoss, CosineLoss, LogitScale, MSELoss, SigLipLoss


def naive_clip(a, b, scale):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = len(a)
    total = 0.0
    for i in range(n):
        la = torch.stack([scale * a[i] @ b[j] for j in range(n)])
        lb = torch.stack([scale * b[i] @ a[j] for j in range(n)])
        total = total - torch.log_softmax(la, 0)[i] - torch.log_softmax(lb, 0)[i]
    return total / (2 * n)


def naive_siglip(a, b, t, bias):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(torch.tensor(z) * (t * a[i] @ b[j] + bias))
    return total / n


def test_clip_loss_matches_naive_reference():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    loss = ClipLoss(logit_scale=10.0)(a, b)["clip_loss"]
    assert torch.allclose(loss, naive_clip(a, b, 10.0), atol=1e-5)


def test_siglip_loss_matches_naive_reference():
    torch.manual_seed(1)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    loss = SigLipLoss(logit_scale=10.0, logit_bias=-10.0)(a, b)["siglip_loss"]
    assert torch.allclose(loss, naive_siglip(a, b, 10.0, -10.0), atol=1e-4)


def test_mse_and_cosine_detach_teacher():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    mse = MSELoss()(a, b)["mse_loss"]
    assert torch.allclose(mse, ((a - b) ** 2).mean())
    cos = CosineLoss()(a, b)["cosine_loss"]
    (mse + cos).backward()
    assert a.grad is not None and b.grad is None


def test_logit_scale_is_clamped_and_learnable():
    s = LogitScale(init=1000.0, max_scale=100.0)
    assert math.isclose(s().item(), 100.0, rel_tol=1e-5)
    assert s.log_scale.requires_grad
    assert not LogitScale(learnable=False).log_scale.requires_grad


@pytest.mark.parametrize("loss_cls,key", [(ClipLoss, "clip_loss"), (SigLipLoss, "siglip_loss")])
def test_faked_two_rank_gather_equals_global_batch(monkeypatch, loss_cls, key):
    """Each rank's loss on its rows vs the gathered batch, averaged as DDP averages gradients,
    equals the single-process loss (and gradients) on the concatenated batch."""
    torch.manual_seed(2)
    a_full = torch.randn(8, 16, requires_grad=True)
    b_full = torch.randn(8, 16, requires_grad=True)
    loss_fn = loss_cls()
    full = loss_fn(a_full, b_full)[key]
    g_full = torch.autograd.grad(full, [a_full, b_full])

    a2 = a_full.detach().clone().requires_grad_(True)
    b2 = b_full.detach().clone().requires_grad_(True)
    world = 2
    per_rank = []
    for rank in range(world):
        sl = slice(rank * 4, (rank + 1) * 4)
        a_loc, b_loc = a2[sl], b2[sl]

        def fake_gather(x, rank=rank, a_loc=a_loc, b_loc=b_loc):
            # The other rank's rows come from the shared leaves, like all_gather with gradients.
            src = a2 if x is a_loc or torch.equal(x, F.normalize(a_loc.float(), dim=-1)) else b2
            parts = [F.normalize(src[r * 4:(r + 1) * 4].float(), dim=-1) for r in range(world)]
            parts[rank] = x
            return torch.cat(parts), rank

        monkeypatch.setattr(losses, "gather_with_grad", fake_gather)
        per_rank.append(loss_fn(a_loc, b_loc)[key])
    mean = torch.stack(per_rank).mean()
    assert torch.allclose(mean, full, atol=1e-5)
    g_dist = torch.autograd.grad(mean, [a2, b2])
    for g1, g2 in zip(g_full, g_dist):
        assert torch.allclose(g1, g2, atol=1e-5)
