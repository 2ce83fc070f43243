"""``best.ckpt`` beside ``last.ckpt``, and ``--ckpt_path best|last|RUN_DIR`` resolved by a trainer that never
saw the fit (what a fresh ``mmalign test`` process has: Lightning's own ``"best"`` needs the fitting trainer)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from mmalign.training.callbacks import (
    BestCheckpoint, checkpoint_in_folder, find_run_checkpoint, link_atomically, resolve_ckpt_path,
)

SCORES = [0.1, 0.5, 0.3]  # val score per epoch: the best is epoch 1, and stays epoch 1


class Scored(BoringModel):
    """Logs a scripted ``score`` per validation epoch and records where ``best.ckpt`` pointed after each."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str | None] = []

    def validation_step(self, batch, batch_idx):
        self.log("score", SCORES[self.current_epoch])
        return super().validation_step(batch, batch_idx)

    def on_train_epoch_start(self) -> None:  # after the previous epoch's checkpoint and link
        link = self.trainer.checkpoint_callback.dirpath and os.path.join(self.trainer.checkpoint_callback.dirpath, "best.ckpt")
        self.seen.append(os.path.realpath(link) if link and os.path.exists(link) else None)


def _trainer(root, **kwargs) -> L.Trainer:
    kwargs.setdefault("callbacks", [ModelCheckpoint(monitor="score", mode="max", save_last=True), BestCheckpoint()])
    return L.Trainer(default_root_dir=root, max_epochs=len(SCORES), limit_train_batches=2, limit_val_batches=1,
                     enable_progress_bar=False, enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(root),
                     **kwargs)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = Scored()
    trainer = _trainer(root)
    trainer.fit(model)
    return root, trainer, model


def test_best_ckpt_follows_the_best_checkpoint(fitted):
    root, trainer, model = fitted
    cb = trainer.checkpoint_callback
    best = os.path.join(cb.dirpath, "best.ckpt")
    assert os.path.realpath(best) == os.path.realpath(cb.best_model_path)
    assert "epoch=1" in os.path.basename(os.path.realpath(best))
    assert os.path.isfile(os.path.join(cb.dirpath, "last.ckpt"))
    # updated when the best changed (after epoch 0: epoch 0; after epoch 1: epoch 1), not only at the end
    assert [os.path.basename(p) if p else None for p in model.seen] == [None, "epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    state = torch.load(best, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert not [p for p in os.listdir(cb.dirpath) if p.endswith(".tmp")]  # no temporary left behind


def test_last_ckpt_is_the_latest_state_after_the_monitor_stopped_improving(fitted):
    # Lightning 2.6's save_last copies only a step's top-k save: without BestCheckpoint last.ckpt stays at epoch 1's
    root, trainer, model = fitted
    last = torch.load(os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt"), map_location="cpu", weights_only=True)
    assert last["global_step"] == trainer.global_step == 2 * len(SCORES)  # saved at the fit's end (epoch 1 holds step 4)
    torch.testing.assert_close(last["state_dict"]["layer.weight"], model.layer.weight.detach())


def test_a_new_trainer_resolves_best_last_and_folders(fitted):
    root, trainer, _ = fitted
    cb = trainer.checkpoint_callback
    fresh = _trainer(root)  # as `mmalign test` builds it: the same recipe, no fit in this trainer
    best = os.path.realpath(cb.best_model_path)
    for value in ("best", "best.ckpt"):
        assert os.path.realpath(resolve_ckpt_path(fresh, value, "test")) == best
    assert os.path.realpath(resolve_ckpt_path(fresh, "last", "test")) == os.path.realpath(os.path.join(cb.dirpath, "last.ckpt"))
    run_dir = os.path.dirname(cb.dirpath)  # lightning_logs/version_0
    assert os.path.realpath(resolve_ckpt_path(fresh, run_dir, "test")) == best
    assert os.path.realpath(resolve_ckpt_path(None, root, "test")) == best  # a default_root_dir: its newest run
    assert resolve_ckpt_path(None, "best", "test", root_dir=root) is not None  # mmalign eval: no trainer
    assert resolve_ckpt_path(fresh, cb.best_model_path, "test") == cb.best_model_path
    assert resolve_ckpt_path(fresh, None, "test") is None


def test_missing_checkpoints_say_where_they_looked(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no best.ckpt in this recipe's checkpoint folders"):
        resolve_ckpt_path(trainer, "best", "test")
    assert resolve_ckpt_path(trainer, "last", "fit") is None  # fit --ckpt_path last before any run: from scratch
    with pytest.raises(FileNotFoundError, match="no such directory: .*nowhere"):
        resolve_ckpt_path(trainer, str(tmp_path / "nowhere" / "x.ckpt"), "test")
    with pytest.raises(FileNotFoundError, match="holds no best.ckpt or last.ckpt"):
        checkpoint_in_folder(tmp_path)


def test_links_are_atomic_and_never_leave_their_folder(tmp_path):
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "a.ckpt").write_bytes(b"a")
    (ckpts / "b.ckpt").write_bytes(b"b")
    link = link_atomically(ckpts / "a.ckpt", ckpts / "best.ckpt")
    assert link.read_bytes() == b"a"
    link_atomically(ckpts / "b.ckpt", link)  # replaced in one os.replace
    assert link.read_bytes() == b"b" and sorted(p.name for p in ckpts.iterdir()) == ["a.ckpt", "b.ckpt", "best.ckpt"]
    # a shared run folder whose best.ckpt points outside it is not followed
    outside = tmp_path / "secret.ckpt"
    outside.write_bytes(b"x")
    link.unlink()
    link.symlink_to(outside)
    assert find_run_checkpoint(None, "best.ckpt", root_dir=tmp_path) is None
