import math

import pytest
import torch
import torch.nn.functional as F

import mmalign.training.losses as losses
from mmalign.training.losses import ClipLoss, CosineLoss, LogitScale, MSELoss, SigLipLoss


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


# -- false negatives: rows of one concept are not each other's negatives ------------------------
def naive_clip_masked(a, b, scale, groups):
    """Per-row softmax over the pair and the rows of OTHER groups only."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = len(a)
    total = 0.0
    for i in range(n):
        cols = [j for j in range(n) if j == i or groups[j] != groups[i]]
        pos = cols.index(i)
        la = torch.stack([scale * a[i] @ b[j] for j in cols])
        lb = torch.stack([scale * b[i] @ a[j] for j in cols])
        total = total - torch.log_softmax(la, 0)[pos] - torch.log_softmax(lb, 0)[pos]
    return total / (2 * n)


def test_clip_loss_masks_same_group_negatives():
    torch.manual_seed(3)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    masked = ClipLoss(logit_scale=10.0, false_negatives="mask")(a, b, groups)["clip_loss"]
    assert torch.allclose(masked, naive_clip_masked(a, b, 10.0, groups.tolist()), atol=1e-5)
    kept = ClipLoss(logit_scale=10.0)(a, b, groups)["clip_loss"]
    assert torch.allclose(kept, naive_clip(a, b, 10.0), atol=1e-5)  # "keep" ignores groups
    assert not torch.allclose(masked, kept)
    distinct = ClipLoss(logit_scale=10.0, false_negatives="mask")(a, b, torch.arange(6))["clip_loss"]
    assert torch.allclose(distinct, kept, atol=1e-6)  # nothing to mask


def test_masked_clip_loss_does_not_push_apart_a_concept_in_two_languages():
    """Two rows of one concept: with masking, moving row 1's text onto row 0's speech costs nothing."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b_far, b_near = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    groups = torch.tensor([5, 5])
    loss = ClipLoss(logit_scale=10.0, false_negatives="mask")
    # both rows are alone in their softmax: the loss is exactly 0 whatever the other row does
    assert loss(a, b_near, groups)["clip_loss"].abs() < 1e-6
    plain = ClipLoss(logit_scale=10.0)
    assert plain(a, b_near)["clip_loss"] > plain(a, b_far)["clip_loss"]


def test_siglip_loss_masks_same_group_pairs():
    torch.manual_seed(4)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    groups = [0, 1, 1, 2, 3]
    masked = SigLipLoss(logit_scale=10.0, logit_bias=-10.0, false_negatives="mask")(a, b, torch.tensor(groups))["siglip_loss"]
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    total = 0.0
    for i in range(5):
        for j in range(5):
            if i != j and groups[i] == groups[j]:
                continue
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(torch.tensor(z) * (10.0 * an[i] @ bn[j] - 10.0))
    assert torch.allclose(masked, total / 5, atol=1e-4)


def test_false_negatives_rejects_unknown_policy():
    with pytest.raises(ValueError, match="false_negatives"):
        ClipLoss(false_negatives="drop")


def test_group_ids_are_stable_and_none_never_shares():
    ids = losses.group_ids(["apple", "pear", "apple", None, None])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert ids[3] != ids[4]
    assert torch.equal(ids[:3], losses.group_ids(["apple", "pear", "apple"]))  # same across calls/processes


def test_faked_two_rank_gather_with_masking_equals_global_batch(monkeypatch):
    torch.manual_seed(5)
    a_full, b_full = torch.randn(8, 16), torch.randn(8, 16)
    groups = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0])  # groups shared across the two ranks' halves
    loss_fn = ClipLoss(false_negatives="mask")
    full = loss_fn(a_full, b_full, groups)["clip_loss"]
    per_rank = []
    for rank in range(2):
        sl = slice(rank * 4, (rank + 1) * 4)

        def fake_gather(x, rank=rank, sl=sl):
            src = a_full if torch.equal(x, F.normalize(a_full[sl], dim=-1)) else b_full
            return F.normalize(src, dim=-1), rank

        monkeypatch.setattr(losses, "gather_with_grad", fake_gather)
        monkeypatch.setattr(losses, "gather_groups", lambda g: groups)
        per_rank.append(loss_fn(a_full[sl], b_full[sl], groups[sl])["clip_loss"])
    assert torch.allclose(torch.stack(per_rank).mean(), full, atol=1e-5)
