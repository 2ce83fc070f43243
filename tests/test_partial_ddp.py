"""Masked contrastive losses under 2-process CPU DDP (gloo): rows without both towers fall unevenly on the ranks, and
the DDP loss and gradients still equal one process on the valid rows of the global batch alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mmalign.training.losses import ClipLoss, SigLipLoss
from tests.ddp_utils import finish_worker

WORLD, B, D_IN, D = 2, 6, 12, 8
LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "clip_mask": lambda: ClipLoss(false_negatives="mask")}
GROUPS = torch.arange(WORLD * B) % 5
# rank 0 has 5 valid rows, rank 1 has 2: an uneven split the loss must reweight
MASK = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)


class _Pair(nn.Module):
    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(D_IN, D)
        self.b = nn.Linear(D_IN, D)
        self.loss = loss

    def forward(self, xa, xb, groups, mask=None):
        extra = {} if mask is None else {"mask": mask}
        return next(iter(self.loss(self.a(xa), self.b(xb), groups, **extra).values()))


def _data():
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(WORLD * B, D_IN, generator=g)
    return xa, xa + 0.3 * torch.randn(WORLD * B, D_IN, generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        xa, xb = _data()
        rows = slice(rank * B, (rank + 1) * B)
        result = {}
        for name, loss_cls in LOSSES.items():
            model = nn.parallel.DistributedDataParallel(_Pair(loss_cls()))
            loss = model(xa[rows], xb[rows], GROUPS[rows], MASK[rows])
            loss.backward()
            result[name] = {"loss": loss.detach(), "grads": _grads(model.module)}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        finish_worker()  # exits here: gloo teardown at exit can abort a finished worker
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_mask")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_ddp_equals_valid_rows_alone(ddp_results, name):
    xa, xb = _data()
    model = _Pair(LOSSES[name]())
    loss = model(xa[MASK], xb[MASK], GROUPS[MASK])  # one process, only the valid rows, no mask
    loss.backward()
    ref = _grads(model)
    # ranks' losses are their rows' sums over the mean count per rank: their mean is the global loss
    mean = sum(r[name]["loss"] for r in ddp_results) / WORLD
    torch.testing.assert_close(mean, loss.detach(), atol=1e-5, rtol=1e-5)
    for res in ddp_results:
        for n, g in ref.items():
            torch.testing.assert_close(res[name]["grads"][n], g, atol=1e-5, rtol=1e-5, msg=f"{name} {n}")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mask_in_one_process_equals_valid_rows(name):
    xa, xb = _data()
    full = _Pair(LOSSES[name]())
    torch.testing.assert_close(full(xa, xb, GROUPS, MASK), _Pair(LOSSES[name]())(xa[MASK], xb[MASK], GROUPS[MASK]))
    ones = torch.ones(len(xa), dtype=torch.bool)
    torch.testing.assert_close(full(xa, xb, GROUPS, ones), full(xa, xb, GROUPS))
