"""Feature cache: round trip, resume after a kill, stale-cache refusal, multi-writer, training parity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import encoders
import projectors
from encoders.base import Encoder
from mmalign import AlignmentModule, ClipLoss, Objective, Tower
from mmalign.cache import CacheError, CachedSplit, write_split
from mmalign.data.manifest import ManifestDataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module() -> AlignmentModule:
    """Both towers pool tokens, so tokens + masks are cached; text tokens have variable length."""
    torch.manual_seed(0)
    towers = {
        "image": Tower(encoders.TimmImageEncoder("tiny:timm-vit"), "image", lambda i, o: projectors.AttentionPool(i, o, num_heads=2)),
        "text": Tower(encoders.HFTextEncoder("tiny:xlmr-text"), "text", lambda i, o: projectors.AttentionPool(i, o, num_heads=2)),
    }
    return AlignmentModule(towers, [Objective(ClipLoss(), ["image", "text"])], embed_dim=16)


@pytest.fixture(scope="module")
def rows(synthetic_data) -> list[dict]:
    return ManifestDataset(synthetic_data / "val.jsonl", required_fields=["image", "text"]).rows


def _write(rows, module, path, **kw):
    kw = {"shard_size": 10, "batch_size": 8, "progress": False, **kw}
    return write_split(rows, dict(module.towers.items()), path, split="val", **kw)


@pytest.fixture(scope="module")
def cache_dir(rows, module, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "val"
    assert _write(rows, module, path) is not None
    return path


def _all_features(split_dir: Path, rows, module, order=None) -> dict:
    ds = CachedSplit(split_dir, rows, dict(module.towers.items()))
    return ds.__getitems__(list(range(len(rows))) if order is None else order)


def test_round_trip_equals_direct_encoding(cache_dir, rows, module):
    order = list(np.random.default_rng(0).permutation(len(rows)))  # crosses shards of different lengths
    batch = _all_features(cache_dir, rows, module, order)
    picked = [rows[i] for i in order]
    assert batch["meta"]["id"] == [r["id"] for r in picked]
    assert batch["keys"]["text"] == [r["text"] for r in picked]
    for name, tower in module.towers.items():
        direct = tower.encoder(tower.encoder.preprocess([r[tower.field] for r in picked]))
        cached = batch["features"][name]
        assert cached["pooled"].dtype == torch.float16
        torch.testing.assert_close(cached["pooled"].float(), direct.pooled, atol=2e-2, rtol=1e-2)
        assert torch.equal(cached["mask"], direct.mask), name  # trimmed to this batch's longest item
        m = direct.mask.unsqueeze(-1)
        torch.testing.assert_close(cached["tokens"].float() * m, direct.tokens * m, atol=2e-2, rtol=1e-2)
    lengths = {int(n) for n in batch["features"]["text"]["mask"].sum(1)}
    assert len(lengths) > 1, "the synthetic texts should have several token lengths"


def test_resume_after_kill_keeps_finished_shards(rows, module, tmp_path, cache_dir):
    path = tmp_path / "val"
    written: list[tuple[str, int]] = []

    def killed_after_first(entry: str, k: int) -> None:
        written.append((entry, k))
        raise KeyboardInterrupt("simulated kill after the first shard")

    with pytest.raises(KeyboardInterrupt):
        _write(rows, module, path, on_shard=killed_after_first)
    first_entry = written[0][0]
    assert (path / first_entry / "shard-00000.json").exists()
    assert not (path / "manifest.json").exists()
    with pytest.raises(CacheError, match="interrupted"):
        CachedSplit(path, rows, dict(module.towers.items()))
    # A half-written shard (arrays but no marker) must be redone, never trusted.
    (path / first_entry / "shard-00001.pooled.npy").write_bytes(b"garbage")
    kept = (path / first_entry / "shard-00000.pooled.npy").stat().st_mtime_ns

    redone: list[tuple[str, int]] = []
    assert _write(rows, module, path, on_shard=lambda e, k: redone.append((e, k))) is not None
    assert (first_entry, 0) not in redone and (first_entry, 1) in redone
    assert (path / first_entry / "shard-00000.pooled.npy").stat().st_mtime_ns == kept
    resumed, fresh = _all_features(path, rows, module), _all_features(cache_dir, rows, module)
    for name in module.towers:
        for key, value in fresh["features"][name].items():
            assert torch.equal(resumed["features"][name][key], value), (name, key)
    # A complete cache re-run writes nothing.
    again: list = []
    _write(rows, module, path, on_shard=lambda e, k: again.append(k))
    assert again == []


def test_stale_cache_refused(cache_dir, rows, module, tmp_path):
    towers = dict(module.towers.items())
    changed = [dict(r) for r in rows]
    changed[5]["text"] = "something else"
    with pytest.raises(CacheError, match=rf"id='{rows[5]['id']}'.*text="):
        CachedSplit(cache_dir, changed, towers)
    with pytest.raises(CacheError, match="ids are gone"):
        CachedSplit(cache_dir, rows[:-1], towers)

    # Another encoder setting: the message names what differs.
    avg = Tower(encoders.TimmImageEncoder("tiny:timm-vit", pool="avg"), "image", projectors.Linear)
    avg.build(16)
    with pytest.raises(CacheError, match="pool: cached 'head', now 'avg'"):
        CachedSplit(cache_dir, rows, {"image": avg})

    # A projector that needs tokens cannot read a pooled-only cache.
    pooled_only = {"text": Tower(towers["text"].encoder, "text", projectors.Linear)}
    pooled_only["text"].build(16)
    _write(rows, type("M", (), {"towers": pooled_only})(), tmp_path / "val")
    with pytest.raises(CacheError, match="uses token sequences"):
        CachedSplit(tmp_path / "val", rows, {"text": towers["text"]})


def test_changed_file_refused(rows, module, tmp_path, synthetic_data):
    # Own copy of the images so touching one does not disturb other tests.
    copied = []
    for r in rows:
        src = Path(r["image"])
        dst = tmp_path / src.name
        dst.write_bytes(src.read_bytes())
        copied.append({**r, "image": str(dst)})
    image_only = {"image": module.towers["image"]}
    _write(copied, type("M", (), {"towers": image_only})(), tmp_path / "val")
    CachedSplit(tmp_path / "val", copied, image_only)  # fresh: accepted
    target = Path(copied[3]["image"])
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    with pytest.raises(CacheError, match=rf"id='{copied[3]['id']}'.*size/mtime"):
        CachedSplit(tmp_path / "val", copied, image_only)


def test_two_writers_fill_disjoint_shards(rows, module, tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "val"
    seen: dict[int, list] = {0: [], 1: []}
    assert _write(rows, module, path, rank=0, world_size=2, on_shard=lambda e, k: seen[0].append((e, k))) is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _write(rows, module, path, on_shard=lambda e, k: seen[1].append((e, k))) is not None  # last one merges
    assert {k % 2 for _, k in seen[0]} == {0} and {k % 2 for _, k in seen[1]} == {1}
    merged, single = _all_features(path, rows, module), _all_features(cache_dir, rows, module)
    for name in module.towers:
        assert torch.equal(merged["features"][name]["pooled"], single["features"][name]["pooled"])


def _recipe_cli(synthetic_data: Path, *extra: str):
    from mmalign.recipe import load_recipe

    paths = [f"--data.init_args.{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")]
    return load_recipe(["--config", str(ROOT / "configs/tiny/lit_contrastive.yaml"), *paths, "--trainer.max_epochs=2", *extra])


def test_training_from_cache_matches_raw(synthetic_data, tmp_path, monkeypatch):
    from mmalign.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "configs/tiny/lit_contrastive.yaml").read_text().replace("data/synthetic", str(synthetic_data)))
    main(["cache", "--config", str(recipe), "--output", str(tmp_path / "cache"), "--progress=false"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["test", "train", "val"]

    raw = _recipe_cli(synthetic_data)
    raw.trainer.fit(raw.model, raw.datamodule)
    raw_metrics = {k: float(v) for k, v in raw.trainer.callback_metrics.items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("cached training must not decode files or run an encoder")

    monkeypatch.setattr(Encoder, "forward", forbidden)
    monkeypatch.setattr(Encoder, "encode", forbidden)
    monkeypatch.setattr("PIL.Image.open", forbidden)
    monkeypatch.setattr("soundfile.read", forbidden)
    cached = _recipe_cli(synthetic_data, f"--data.init_args.cache_dir={tmp_path / 'cache'}")
    cached.trainer.fit(cached.model, cached.datamodule)
    cached_metrics = {k: float(v) for k, v in cached.trainer.callback_metrics.items()}

    assert {"train/loss", "val/loss", "val/R@1"} <= set(raw_metrics)
    assert set(raw_metrics) == set(cached_metrics)
    for key, value in raw_metrics.items():
        assert cached_metrics[key] == pytest.approx(value, abs=0.02), key
