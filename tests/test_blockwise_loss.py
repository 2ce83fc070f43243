"""Blockwise contrastive losses (issue 21.3): the same loss and gradients as the dense ones."""

import pytest
import torch

import mmalign.training.losses as losses
from mmalign.training.losses import ClipLoss, SigLipLoss, contrastive_memory_bytes, row_blocked_sum


def _grads(loss_fn, key, a, b, groups=None):
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss = loss_fn(a, b, groups)[key]
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [a, b, *params])
    return loss.detach(), grads


@pytest.mark.parametrize("loss_cls,key", [(ClipLoss, "clip_loss"), (SigLipLoss, "siglip_loss")])
@pytest.mark.parametrize("false_negatives", ["keep", "mask"])
@pytest.mark.parametrize("block", [1, 4, 5, 12])
def test_blockwise_equals_dense_loss_and_gradients(loss_cls, key, false_negatives, block):
    torch.manual_seed(0)
    a, b = torch.randn(13, 8), torch.randn(13, 8)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 2, 8, 9]) if false_negatives == "mask" else None
    dense = loss_cls(false_negatives=false_negatives)
    blocked = loss_cls(false_negatives=false_negatives, block_size=block)
    blocked.load_state_dict(dense.state_dict())
    l1, g1 = _grads(dense, key, a, b, groups)
    l2, g2 = _grads(blocked, key, a, b, groups)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert len(g1) == len(g2) >= 3  # a, b, the learnable scale (and SigLIP's bias)
    for x, y in zip(g1, g2):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_cls,key", [(ClipLoss, "clip_loss"), (SigLipLoss, "siglip_loss")])
def test_blockwise_faked_two_rank_gather_equals_dense(monkeypatch, loss_cls, key):
    """With gathered columns (rank 1 of 2), the blocked loss equals the dense one, gradients included."""
    torch.manual_seed(1)
    other = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)

    def fake_gather(x):
        return torch.cat([other, x]), 1

    monkeypatch.setattr(losses, "gather_with_grad", fake_gather)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    dense, blocked = loss_cls(), loss_cls(block_size=4)
    l1, g1 = _grads(dense, key, a, b)
    l2, g2 = _grads(blocked, key, a, b)
    assert torch.allclose(l1, l2, rtol=1e-5)
    for x, y in zip(g1, g2):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_row_blocked_sum_runs_each_block_once_forward_without_grad():
    calls = []

    def fn(start, stop, x):
        calls.append((start, stop))
        return x[start:stop].sum()

    x = torch.arange(10.0)
    with torch.no_grad():
        assert row_blocked_sum(fn, 10, 4, x).item() == 45.0
    assert calls == [(0, 4), (4, 8), (8, 10)]


def test_block_size_validation_and_memory_figure():
    with pytest.raises(ValueError, match="block_size"):
        ClipLoss(block_size=0)
    assert contrastive_memory_bytes(32768, 1024) * 32 == contrastive_memory_bytes(32768)
    assert contrastive_memory_bytes(32768) > 16e9 > 0.6e9 > contrastive_memory_bytes(32768, 1024)
