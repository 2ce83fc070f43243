"""ClipLoss(queue_size=N): a MoCo-style FIFO of earlier steps' b rows as extra a->b negatives (issue 17.1)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmalign import Objective
from mmalign.training.losses import ClipLoss, contrastive_memory_bytes
from tests.ddp_utils import finish_worker

D = 8


def _batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, D, generator=g)
    return a, a + 0.5 * torch.randn(n, D, generator=g)


def naive_queue_clip(a, b, queue, scale, groups=None, queue_groups=None):
    """InfoNCE by hand: a->b over the columns [batch b ; queue], b->a over the batch's a only."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    total = 0.0
    for i in range(len(a)):
        cols = [b[j] for j in range(len(b)) if groups is None or j == i or groups[j] != groups[i]]
        cols += [q for k, q in enumerate(queue) if groups is None or queue_groups[k] != groups[i]]
        la = torch.stack([scale * a[i] @ c for c in cols])
        pos = sum(1 for j in range(i) if groups is None or groups[j] != groups[i])  # index of b[i] among cols
        rows = [a[j] for j in range(len(a)) if groups is None or j == i or groups[j] != groups[i]]
        lb = torch.stack([scale * b[i] @ r for r in rows])
        total = total - torch.log_softmax(la, 0)[pos] - torch.log_softmax(lb, 0)[pos]
    return total / (2 * len(a))


def _filled(queue_size=10, steps=2, **kw) -> ClipLoss:
    """A training-mode loss whose queue holds ``steps`` earlier batches of 6 rows."""
    loss = ClipLoss(logit_scale=10.0, queue_size=queue_size, **kw).train()
    for s in range(steps):
        loss(*_batch(100 + s))
    return loss


def test_empty_queue_is_plain_clip_loss():
    a, b = _batch(0)
    a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    plain = ClipLoss(logit_scale=10.0)(a1, b)["clip_loss"]
    queued = ClipLoss(logit_scale=10.0, queue_size=16).train()(a2, b)["clip_loss"]
    torch.testing.assert_close(queued, plain)
    plain.backward()
    queued.backward()
    torch.testing.assert_close(a2.grad, a1.grad)


def test_loss_with_a_queue_equals_hand_written_infonce():
    loss = _filled(queue_size=10, steps=2)  # 12 rows enqueued into 10: wrapped once
    queue, _ = loss.queued()
    assert queue.shape == (10, D)
    a, b = _batch(0)
    got = loss(a, b)["clip_loss"]
    torch.testing.assert_close(got, naive_queue_clip(a, b, queue, 10.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, ClipLoss(logit_scale=10.0)(a, b)["clip_loss"])  # the queue changed it


def test_fifo_order_and_wrap_around():
    loss = ClipLoss(queue_size=5)
    rows = F.normalize(torch.randn(13, D), dim=-1)
    loss.enqueue(rows[:2])
    q, _ = loss.queued()
    torch.testing.assert_close(q, rows[:2])
    loss.enqueue(rows[2:4])
    loss.enqueue(rows[4:7])  # 7 rows into 5: the two oldest are overwritten
    q, _ = loss.queued()
    torch.testing.assert_close(q, rows[2:7])
    assert int(loss.queue_ptr) == 2 and int(loss.queue_filled) == 5
    loss.enqueue(rows[7:13])  # more rows than the queue holds: only the newest 5 stay
    q, _ = loss.queued()
    torch.testing.assert_close(q, rows[8:13])
    with pytest.raises(ValueError, match="width"):
        loss.enqueue(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="queue_size"):
        ClipLoss(queue_size=-1)


def test_enqueue_after_the_loss_normalised_and_detached():
    loss = ClipLoss(queue_size=8).train()
    a, b = _batch(0)
    b = (3 * b).requires_grad_(True)
    loss(a, b)["clip_loss"].backward()  # the current batch is not its own negative: plain loss, then enqueued
    q, _ = loss.queued()
    torch.testing.assert_close(q, F.normalize(b.detach(), dim=-1))
    assert not q.requires_grad


def test_masked_rows_are_not_enqueued_nor_negatives():
    loss = _filled(queue_size=12, steps=1)
    queue, _ = loss.queued()
    a, b = _batch(0)
    mask = torch.tensor([True, False, True, True, False, True])
    got = loss(a, b, mask=mask)["clip_loss"]
    torch.testing.assert_close(got, naive_queue_clip(a[mask], b[mask], queue, 10.0), atol=1e-5, rtol=1e-5)
    q, _ = loss.queued()
    torch.testing.assert_close(q, torch.cat([queue, F.normalize(b[mask], dim=-1)]))  # 6 + the 4 valid rows


def test_same_group_queue_entries_are_left_out():
    loss = ClipLoss(logit_scale=10.0, queue_size=12, false_negatives="mask").train()
    loss(*_batch(0), groups=torch.tensor([7, 8, 9, 10, 11, 12]))  # this batch's own b rows, queued (a new epoch)
    queue, queue_groups = loss.queued()
    torch.testing.assert_close(queue_groups, torch.tensor([7, 8, 9, 10, 11, 12]))
    a, b = _batch(0)
    groups = torch.tensor([7, 1, 1, 10, 3, 4])  # rows 1-2 share a concept; rows 0 and 3 meet their own copy queued
    got = loss(a, b, groups=groups)["clip_loss"]
    want = naive_queue_clip(a, b, queue, 10.0, groups=groups, queue_groups=queue_groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unmasked = naive_queue_clip(a, b, queue, 10.0, groups=groups, queue_groups=queue_groups - 100)
    assert got < unmasked - 0.1  # a queued copy of the positive, kept, costs a lot


def test_unlabelled_rows_match_no_queued_group():
    loss = ClipLoss(queue_size=8, false_negatives="mask").train()
    loss(*_batch(1), groups=torch.tensor([-1, -2, -3, -4, -5, -6]))  # group_ids' ids of rows without a concept
    _, queue_groups = loss.queued()
    assert bool((queue_groups == torch.iinfo(torch.int64).min).all())


@pytest.mark.parametrize("kw", [{}, {"false_negatives": "mask"}])
def test_blocked_equals_dense_with_a_queue(kw):
    groups = torch.tensor([0, 1, 1, 2, 3, 0]) if kw else None
    mask = torch.tensor([True, True, False, True, True, True])
    for m in (None, mask):
        dense, blocked = _filled(**kw), _filled(block_size=4, **kw)
        a, b = _batch(0)
        a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
        l1 = dense(a1, b, groups=groups, mask=m)["clip_loss"]
        l2 = blocked(a2, b, groups=groups, mask=m)["clip_loss"]
        torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-6)
        l1.backward()
        l2.backward()  # the checkpointed blocks recompute with this step's queue, not the updated one
        torch.testing.assert_close(a2.grad, a1.grad, atol=1e-6, rtol=1e-6)
        g1, g2 = dense.logit_scale.log_scale.grad, blocked.logit_scale.log_scale.grad
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(blocked.queued()[0], dense.queued()[0])


def test_eval_neither_enqueues_nor_uses_the_queue():
    loss = _filled(queue_size=10, steps=1)
    before = loss.queued()[0].clone()
    loss.eval()
    a, b = _batch(0)
    torch.testing.assert_close(loss(a, b)["clip_loss"], ClipLoss(logit_scale=10.0)(a, b)["clip_loss"])
    torch.testing.assert_close(loss.queued()[0], before)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    loss = _filled(queue_size=10, steps=3)
    torch.save(nn.ModuleDict({"loss": loss}).state_dict(), tmp_path / "ckpt.pt")
    fresh = nn.ModuleDict({"loss": ClipLoss(logit_scale=10.0, queue_size=10)})  # lazy: an empty queue
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    fresh.train()
    for x, y in zip(fresh["loss"].queued(), loss.queued()):
        torch.testing.assert_close(x, y)
    a, b = _batch(0)
    torch.testing.assert_close(fresh["loss"](a, b)["clip_loss"], loss(a, b)["clip_loss"])  # same step after resume
    torch.testing.assert_close(fresh["loss"].queued()[0], loss.queued()[0])
    # a checkpoint saved before any step (empty queue) loads into a used loss: the queue is empty again
    empty = ClipLoss(logit_scale=10.0, queue_size=10).state_dict()
    loss.load_state_dict(empty)
    assert loss.queued()[0].numel() == 0
    with pytest.raises(RuntimeError, match="queue_size=4"):
        ClipLoss(queue_size=4).load_state_dict(_filled(queue_size=10).state_dict())


def test_queue_is_in_the_checkpoint_not_in_the_export():
    from mmalign.export.writer import export_state

    module = SimpleNamespace(towers={"a": SimpleNamespace(projector=nn.Linear(D, D))},
                             objectives=[Objective(_filled(), ["a", "b"])])
    assert "loss.queue" in module.objectives[0].state_dict()
    assert set(export_state(module)) == {"towers.a.projector.weight", "towers.a.projector.bias",
                                         "objectives.0.loss.logit_scale.log_scale"}


def test_alignment_module_checkpoint_holds_the_queue():
    from tests.test_module import make_module

    module = make_module()
    module.objectives[0].loss = ClipLoss(queue_size=8)
    module.train()
    module.compute_losses({"image": torch.randn(4, 32), "text": torch.randn(4, 32)})  # one step's loss
    state = module.state_dict()
    assert state["objectives.0.loss.queue"].shape == (8, 32) and int(state["objectives.0.loss.queue_filled"]) == 4
    other = Objective(ClipLoss(queue_size=8), ["image", "text"])  # the resumed module's objective
    other.load_state_dict({k[len("objectives.0."):]: v for k, v in state.items() if k.startswith("objectives.0.")})
    torch.testing.assert_close(other.loss.queued()[0], module.objectives[0].loss.queued()[0])


def test_gradcache_runs_the_queue_once_per_step_with_the_same_gradient():
    from mmalign.training.gradcache import grad_cache_backward

    torch.manual_seed(0)
    proj = nn.Linear(D, D)
    a, b = _batch(0, n=8)
    losses = [_filled(queue_size=10), _filled(queue_size=10)]
    proj(a).sum()  # warm
    out_direct = losses[0](proj(a), b)["clip_loss"]
    out_direct.backward()
    direct = proj.weight.grad.clone()
    proj.weight.grad = None
    chunks = [(0, 3), (3, 8)]
    out = grad_cache_backward(lambda i: {"a": proj(a[slice(*chunks[i])]), "b": b[slice(*chunks[i])]}, 2,
                              lambda e: losses[1](e["a"], e["b"]))
    torch.testing.assert_close(out.loss, out_direct.detach())
    torch.testing.assert_close(proj.weight.grad, direct, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses[1].queued()[0], losses[0].queued()[0])  # enqueued once, the full batch


def test_sweep_refuses_a_queue():
    import projectors
    from mmalign.training.sweep import PairMember, Sweep, build_members

    members = build_members(lambda: PairMember(projectors.Linear(12, 8), projectors.Linear(10, 8), ClipLoss(queue_size=16)), [0, 1])
    sweep = Sweep(members)
    with pytest.raises(RuntimeError, match="sweep"):
        sweep.step(torch.randn(6, 12), torch.randn(6, 10))


def test_memory_figure_counts_the_queue_columns():
    assert contrastive_memory_bytes(128, queue_size=4096) == 16 * 128 * (128 + 4096)
    assert contrastive_memory_bytes(128) == 16 * 128 * 128


# -- DDP: every rank holds the same queue, the one a single process fills on the global batches --------
WORLD, B = 2, 4


def _ddp_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g),
             torch.tensor([0, 1, 2, 3, 1, 5, 6, 7]), torch.tensor([True, True, False, True, True, True, True, False]))
            for _ in range(3)]


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        loss = ClipLoss(logit_scale=10.0, queue_size=10, false_negatives="mask").train()
        rows, values = slice(rank * B, (rank + 1) * B), []
        for a, b, groups, mask in _ddp_batches():
            value = loss(a[rows], b[rows], groups=groups[rows], mask=mask[rows])["clip_loss"].detach().clone()
            dist.all_reduce(value)  # DDP averages the ranks' losses' gradients: the mean is the global loss
            values.append(value / WORLD)
        queue, queue_groups = loss.queued()
        torch.save({"losses": torch.stack(values), "queue": queue, "groups": queue_groups}, Path(out_dir) / f"rank{rank}.pt")
        finish_worker()  # exits here: gloo teardown at exit can abort a finished worker
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_the_same_queue(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = ClipLoss(logit_scale=10.0, queue_size=10, false_negatives="mask").train()
    want = torch.stack([single(a, b, groups=g, mask=m)["clip_loss"].detach() for a, b, g, m in _ddp_batches()])
    for res in got:
        torch.testing.assert_close(res["queue"], single.queued()[0])
        torch.testing.assert_close(res["groups"], single.queued()[1])
        torch.testing.assert_close(res["losses"], want, atol=1e-5, rtol=1e-5)
    assert len(got[0]["queue"]) == 10  # 3 steps x 6 valid rows, wrapped


# -- through Lightning: `mmalign fit` checkpoints the queue and `--ckpt_path` resumes it ------------------
QUEUE_OVERLAY = """
model:
  init_args:
    objectives:
      - class_path: mmalign.Objective
        init_args:
          towers: [student, teacher]
          loss: {class_path: mmalign.ClipLoss, init_args: {queue_size: 40}}
      - class_path: mmalign.Objective
        init_args: {towers: [student, teacher], loss: {class_path: mmalign.MSELoss}}
"""


def test_fit_checkpoints_the_queue_and_resumes_it(synthetic_data, tmp_path, monkeypatch):
    from mmalign.recipe import MMAlignCLI, recipe_files

    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "queue.yaml"
    overlay.write_text(QUEUE_OVERLAY, encoding="utf-8")
    files = [*recipe_files("uclip_pivot", "tiny"), overlay]  # the tiny pivot: a frozen teacher without projector
    args = [a for f in files for a in ("--config", str(f))] + [
        f"--data.init_args.{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")] + [
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.towers.student.init_args.projector.init_args.dropout=0.0"]

    def fit(steps, *extra):
        cli = MMAlignCLI(args=["fit", *args, f"--trainer.max_steps={steps}", *extra], save_config_callback=None)
        return cli.trainer, cli.model.objectives[0].loss

    trainer, loss = fit(2)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    saved = torch.load(tmp_path / "q.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    filled, ptr = int(saved["objectives.0.loss.queue_filled"]), int(saved["objectives.0.loss.queue_ptr"])
    assert 0 < filled <= 40 and saved["objectives.0.loss.queue"].shape[0] == 40
    torch.testing.assert_close(saved["objectives.0.loss.queue"], loss.queue)
    # Mark the checkpoint's queue (the frozen teacher's rows would come out the same on a fresh run), then resume.
    ckpt = torch.load(tmp_path / "q.ckpt", map_location="cpu", weights_only=False)
    marker = F.normalize(torch.randn(saved["objectives.0.loss.queue"].shape), dim=-1)
    ckpt["state_dict"]["objectives.0.loss.queue"] = marker
    torch.save(ckpt, tmp_path / "q.ckpt")
    _, resumed = fit(3, f"--ckpt_path={tmp_path / 'q.ckpt'}")  # one more step from the checkpoint's queue
    new = (int(resumed.queue_ptr) - ptr) % 40 or 40  # rows the third step wrote (a batch of 40 rows or fewer)
    assert 0 < new < 40 and int(resumed.queue_filled) == min(filled + new, 40)
    kept = (ptr + new + torch.arange(40 - new)) % 40  # every slot the third step did not overwrite
    torch.testing.assert_close(resumed.queue[kept], marker[kept])
