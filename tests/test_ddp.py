"""Distributed correctness: 2-process CPU DDP (gloo) through ``mmalign.training.losses`` equals one process on the
concatenated batch, for the loss and for the gradients of a small projector and of the temperature."""

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
LOSSES = {
    "clip": ClipLoss,
    "siglip": SigLipLoss,
    # rows of one concept spread over both ranks: group ids are all-gathered beside the embeddings
    "clip_mask": lambda: ClipLoss(false_negatives="mask"),
    "siglip_mask": lambda: SigLipLoss(false_negatives="mask"),
}
GROUPS = torch.arange(WORLD * B) % 5  # concepts 0 and 1 appear on both ranks


class _Pair(nn.Module):
    """Two small projectors and a loss: the trainable part of a contrastive recipe."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(D_IN, 16), nn.GELU(), nn.Linear(16, D))
        self.b = nn.Linear(D_IN, D)
        self.loss = loss

    def forward(self, xa: torch.Tensor, xb: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return next(iter(self.loss(self.a(xa), self.b(xb), groups).values()))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(WORLD * B, D_IN, generator=g, dtype=torch.float64).float()
    return xa, xa + 0.3 * torch.randn(WORLD * B, D_IN, generator=g)  # correlated pairs


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        xa, xb = _data()
        rows = slice(rank * B, (rank + 1) * B)  # this rank's shard of the global batch
        result = {}
        for name, loss_cls in LOSSES.items():
            model = nn.parallel.DistributedDataParallel(_Pair(loss_cls()))
            xa_l = xa[rows].clone().requires_grad_(True)
            loss = model(xa_l, xb[rows], GROUPS[rows])
            loss.backward()  # DDP averages parameter grads over ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            result[name] = {"loss": mean_loss / WORLD, "grads": _grads(model.module), "input_grad": xa_l.grad}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        finish_worker()  # exits here: gloo teardown at exit can abort a finished worker
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ddp_matches_single_process(ddp_results, name):
    xa, xb = _data()
    model = _Pair(LOSSES[name]())
    xa = xa.clone().requires_grad_(True)
    loss = model(xa, xb, GROUPS)  # not distributed here: gather is a no-op, the batch is global
    loss.backward()
    ref = _grads(model)
    for rank, res in enumerate(ddp_results):
        got = res[name]
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
        assert set(got["grads"]) == set(ref) and "loss.logit_scale.log_scale" in ref
        for n, g in ref.items():
            torch.testing.assert_close(got["grads"][n], g, atol=1e-5, rtol=1e-5, msg=f"{name} grad of {n}, rank {rank}")
        # Input grads: rank r holds d(sum over ranks of their losses)/d(its rows) = WORLD * d(global loss)/d(rows).
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(got["input_grad"] / WORLD, xa.grad[rows], atol=1e-5, rtol=1e-5)
    # The two ranks end with identical averaged grads (what keeps DDP replicas in sync).
    for n in ref:
        assert torch.equal(ddp_results[0][name]["grads"][n], ddp_results[1][name]["grads"][n])


def test_gather_matters(ddp_results):
    """Guard against a vacuous pass: without the gather, per-rank losses differ from the global one."""
    xa, xb = _data()
    model = _Pair(ClipLoss(gather=False))
    local = torch.stack([model(xa[r * B:(r + 1) * B], xb[r * B:(r + 1) * B], GROUPS[r * B:(r + 1) * B]) for r in range(WORLD)]).mean()
    assert not torch.allclose(local, ddp_results[0]["clip"]["loss"], atol=1e-4)
    # and masking changes the loss here (some concepts repeat), so the masked cases test the group gather
    assert not torch.allclose(ddp_results[0]["clip_mask"]["loss"], ddp_results[0]["clip"]["loss"], atol=1e-4)
