"""Device-resident cached features (issue 21.2): same batches as the memmap reader, DDP shards,
mid-epoch resume through Lightning checkpoints, automatic fallback with a reason."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import encoders
import projectors
from mmalign import AlignmentModule, ClipLoss, Objective, Tower
from mmalign.cache import CachedSplit
from mmalign.cache.command import cache
from mmalign.cache.resident import ResidentLoader, ResidentStore, choose_placement, parse_resident, split_bytes
from mmalign.data import AlignmentDataModule


def _module(tokens: bool = True) -> AlignmentModule:
    torch.manual_seed(0)
    proj = (lambda i, o: projectors.AttentionPool(i, o, num_heads=2)) if tokens else None
    towers = {
        "image": Tower(encoders.TimmImageEncoder("tiny:timm-vit"), "image", proj or (lambda i, o: projectors.Linear(i, o))),
        "text": Tower(encoders.HFTextEncoder("tiny:xlmr-text"), "text", lambda i, o: projectors.AttentionPool(i, o, num_heads=2)),
    }
    return AlignmentModule(towers, [Objective(ClipLoss(), ["image", "text"])], embed_dim=16)


@pytest.fixture(scope="module")
def cached(synthetic_data, tmp_path_factory) -> dict:
    model = _module()
    out = tmp_path_factory.mktemp("resident") / "cache"
    manifest = str(synthetic_data / "val.jsonl")
    dm = AlignmentDataModule(train=manifest, val=manifest, batch_size=8, cache_dir=str(out))
    cache(model, dm, shard_size=10, progress=False)
    dm.connect(model)
    dm.setup("fit")
    return {"dir": out, "manifest": manifest, "split": dm.datasets["train"], "model": model}


def test_store_batches_equal_memmap_batches(cached):
    split: CachedSplit = cached["split"]
    store = ResidentStore(split, torch.device("cpu"), torch.float16)
    idx = [5, 0, 17, 3, 11, 2]
    a, b = split.__getitems__(idx), store.batch(torch.tensor(idx))
    assert a["meta"] == b["meta"] and a["keys"] == b["keys"]
    for name, fa in a["features"].items():
        fb = b["features"][name]
        assert torch.equal(fa["pooled"], fb["pooled"])
        if "tokens" in fa:  # the memmap reader trims padding no row needs; resident keeps the full length
            t = fa["tokens"].shape[1]
            assert torch.equal(fa["tokens"], fb["tokens"][:, :t]) and torch.equal(fa["mask"], fb["mask"][:, :t])
            assert not fb["mask"][:, t:].any()
    assert split_bytes(split, torch.float32) == 2 * split_bytes(split, torch.float16) - sum(
        int(v.starts[-1] + v.shards[-1]["count"]) * max(s["token_len"] for s in v.shards) for v in split.views.values() if v.tokens)


def test_ranks_get_disjoint_rows_and_each_epoch_a_new_order(cached):
    store = ResidentStore(cached["split"], torch.device("cpu"))
    n = len(store)
    ranks = [ResidentLoader(store, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == n // 8
    ids = [[i for b in loader for i in b["meta"]["id"]] for loader in ranks]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == n // 8 * 4
    single = ResidentLoader(store, 8, seed=3)
    assert sorted(ids[0] + ids[1]) == sorted(i for b in single for i in b["meta"]["id"])
    first, second = ([i for b in single for i in b["meta"]["id"]] for _ in range(2))  # epochs 1 and 2
    assert first != second and sorted(first) != [] and single.epoch == 3


def test_state_dict_resumes_mid_epoch(cached):
    store = ResidentStore(cached["split"], torch.device("cpu"))
    full = [b["meta"]["id"] for b in ResidentLoader(store, 4, seed=7)]
    loader = ResidentLoader(store, 4, seed=7)
    it = iter(loader)
    head = [next(it)["meta"]["id"] for _ in range(2)]
    state = loader.state_dict()
    assert state == {"seed": 7, "epoch": 0, "served": 2}
    again = ResidentLoader(store, 4, seed=0)
    again.load_state_dict(state)
    again.set_epoch(0)  # what Lightning calls before the resumed epoch
    assert head + [b["meta"]["id"] for b in again] == full


def test_placement_falls_back_with_a_reason(cached):
    split = cached["split"]
    place, reason = choose_placement(split, torch.device("cpu"), "auto", torch.float16, 0.5)
    assert place == "device" and "fit the budget" in reason
    place, reason = choose_placement(split, torch.device("cpu"), "auto", torch.float16, 1e-12)
    assert place == "memmap" and "exceed the budget" in reason
    with pytest.raises(ValueError, match="resident=true"):
        choose_placement(split, torch.device("cpu"), True, torch.float16, 1e-12)
    assert parse_resident("true") is True and parse_resident("auto") == "auto"
    with pytest.raises(ValueError):
        parse_resident("sometimes")


class _Killed(Exception):
    pass


class _Record(L.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.ids: dict[int, list] = {}
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids[trainer.global_step] = list(batch["meta"]["id"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            raise _Killed  # like a kill: the run stops, its last checkpoint is an earlier step


def _fit(cached, root: Path, record: _Record, ckpt: str | None = None, resident="auto") -> tuple[L.Trainer, AlignmentModule]:
    L.seed_everything(0)
    model = _module()
    dm = AlignmentDataModule(train=cached["manifest"], val=cached["manifest"], batch_size=8, cache_dir=str(cached["dir"]),
                             resident=resident)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, save_last=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record, saver], default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return trainer, model


def test_lightning_resume_mid_epoch_sees_the_same_batches(cached, tmp_path, capsys):
    full = _Record()
    _, model_full = _fit(cached, tmp_path / "full", full)
    assert "resident on cpu" in capsys.readouterr().out
    steps_per_epoch = len(cached["split"]) // 8
    assert len(full.ids) == 3 * steps_per_epoch
    killed = _Record(stop_at=steps_per_epoch + 2)  # mid-epoch 2
    with pytest.raises(_Killed):
        _fit(cached, tmp_path / "killed", killed)
    ckpts = sorted((tmp_path / "killed").glob("*step=*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    last = ckpts[-1]
    at = int(last.stem.split("step=")[1])
    assert 0 < at <= steps_per_epoch + 2
    resumed = _Record()
    _, model_resumed = _fit(cached, tmp_path / "resumed", resumed, ckpt=str(last))
    assert min(resumed.ids) == at
    assert {s: resumed.ids[s] for s in resumed.ids} == {s: full.ids[s] for s in full.ids if s >= at}
    for (k, a), (_, b) in zip(model_full.state_dict().items(), model_resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
