"""Presence masks (partial-modality batches) and row blocks (huge batches) compose: same loss and gradients."""

import pytest
import torch

from mmalign.training.losses import ClipLoss, SigLipLoss


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize("false_negatives", ["keep", "mask"])
def test_masked_loss_is_the_same_blocked_or_dense_and_equals_the_valid_rows_alone(loss_cls, false_negatives):
    torch.manual_seed(0)
    a, b = torch.randn(13, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    groups = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9])
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    results = []
    for block in (None, 4):
        loss = loss_cls(false_negatives=false_negatives, block_size=block)
        value = next(iter(loss(a, b, groups, mask).values()))
        grads = torch.autograd.grad(value, (a, b))
        results.append((value, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g_dense, g_block in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_dense, g_block)
        assert torch.all(g_dense[~mask] == 0)  # rows without both towers get no gradient
    alone = next(iter(loss_cls(false_negatives=false_negatives)(a[mask], b[mask], groups[mask]).values()))
    torch.testing.assert_close(results[0][0], alone)
