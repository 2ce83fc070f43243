"""Feature cache: round trip, resume after a (simulated and real SIGKILL) kill, stale and tampered cache
refusal, NaN/Inf features under the bad-input policy, multi-writer, training parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
from mmalign.data.policy import BadInputError, BadInputReport

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
    return load_recipe(["--config", str(ROOT / "configs/lit_contrastive.yaml"), "--config", str(ROOT / "configs/tiny/lit_contrastive.yaml"), *paths, "--trainer.max_epochs=2", *extra])


@pytest.fixture(scope="module")
def recipe(synthetic_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    import yaml

    from mmalign.recipe import load_config  # the tiny recipe composed into one file (recipe + tiny overlay)

    path.write_text(yaml.safe_dump(load_config("lit_contrastive", variant="tiny")).replace("data/synthetic", str(synthetic_data)))
    return path


SHARD = 2  # tiny shards: many of them, so a real kill lands between two


@pytest.fixture(scope="module")
def cli_cache(recipe, tmp_path_factory) -> Path:
    """The recipe's cache written in-process by ``mmalign cache``, uninterrupted. Stored as float32, so that
    training from it must match training from raw files metric for metric (with the default float16, a tiny
    model's per-language R@5 on a dozen queries can flip one rank on a near-tie: 0.083 per query)."""
    from mmalign.cli import main

    out = tmp_path_factory.mktemp("cli") / "cache"
    main(["cache", "--config", str(recipe), "--output", str(out), f"--shard_size={SHARD}", "--dtype=float32", "--progress=false"])
    return out


def test_training_from_cache_matches_raw(synthetic_data, cli_cache, monkeypatch):
    assert sorted(p.name for p in cli_cache.iterdir()) == ["test", "train", "val"]

    raw = _recipe_cli(synthetic_data)
    raw.trainer.fit(raw.model, raw.datamodule)
    raw_metrics = {k: float(v) for k, v in raw.trainer.callback_metrics.items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("cached training must not decode files or run an encoder")

    monkeypatch.setattr(Encoder, "forward", forbidden)
    monkeypatch.setattr(Encoder, "encode", forbidden)
    monkeypatch.setattr("PIL.Image.open", forbidden)
    monkeypatch.setattr("soundfile.read", forbidden)
    cached = _recipe_cli(synthetic_data, f"--data.init_args.cache_dir={cli_cache}")
    cached.trainer.fit(cached.model, cached.datamodule)
    cached_metrics = {k: float(v) for k, v in cached.trainer.callback_metrics.items()}

    assert {"train/loss", "val/loss", "val/R@1"} <= set(raw_metrics)
    assert set(raw_metrics) == set(cached_metrics)
    for key, value in raw_metrics.items():
        assert cached_metrics[key] == pytest.approx(value, abs=0.02), key


def _cache_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mmalign.cli", "cache", "--config", str(recipe), "--output", str(out),
            "--split", "train", f"--shard_size={SHARD}", "--dtype=float32", "--progress=false"]


def test_real_sigkill_then_resume(recipe, cli_cache, tmp_path):
    """``mmalign cache`` in a subprocess, SIGKILLed after its first finished shard, then re-run."""
    out = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(_cache_cmd(recipe, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # generous: a loaded 2-core CI machine starts the subprocess slowly
    try:
        while not list((out / "train").glob("*/shard-*.json")):  # a marker: the first shard is finished
            assert proc.poll() is None, f"mmalign cache exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard finished within 600 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    split = out / "train"
    assert not (split / "manifest.json").exists(), "killed before the merge: there must be no manifest"
    total = sum(len(list(e.glob("shard-*.json"))) for e in (cli_cache / "train").iterdir() if e.is_dir())
    finished = {m: [(p, p.stat()) for p in m.parent.glob(m.name.replace(".json", ".*"))] for m in split.glob("*/shard-*.json")}
    assert 1 <= len(finished) < total, (len(finished), total)

    done = subprocess.run(_cache_cmd(recipe, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for files in finished.values():  # finished shards were kept: same inode, same mtime
        for path, st in files:
            now = path.stat()
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), path
    assert not list(split.glob("*/.*.tmp")), "temporary files of the killed writer are cleaned up"
    # The resumed cache equals the uninterrupted one, file by file.
    ref = cli_cache / "train"
    ref_files = sorted(p.relative_to(ref) for p in ref.glob("*/*.npy"))
    assert sorted(p.relative_to(split) for p in split.glob("*/*.npy")) == ref_files
    for rel in ref_files:
        assert np.array_equal(np.load(split / rel), np.load(ref / rel)), rel
    manifest, ref_manifest = (json.loads((d / "manifest.json").read_text()) for d in (split, ref))
    assert manifest == ref_manifest


# -- NaN/Inf features (issue 6's bad-input policy) -------------------------------------------------


class Poisoned(Encoder):
    """Wraps a tiny encoder; returns NaN (pooled) or Inf (tokens) for the items in ``bad``."""

    def __init__(self, inner: Encoder, bad: list[str], where: str = "pooled") -> None:
        super().__init__()
        self.inner, self.bad, self.where = inner, set(bad), where
        self.modality, self.output_dim, self.has_tokens = inner.modality, inner.output_dim, inner.has_tokens
        self.freeze()

    def spec(self) -> dict:
        return {**self.inner.spec(), "poison": sorted(self.bad), "where": self.where}

    def preprocess(self, items):
        return {**self.inner.preprocess(items), "poison": torch.tensor([str(i) in self.bad for i in items])}

    def encode(self, inputs):
        inputs = dict(inputs)
        poison = inputs.pop("poison")
        out = self.inner.encode(inputs)
        if self.where == "pooled":
            out.pooled[poison] = float("nan")
        else:
            out.tokens[poison, 0] = float("inf")  # the first token is real in every row
        return out


@pytest.fixture(scope="module")
def poisoned(module, rows):
    """Towers whose image of one row is NaN and whose ``text_en`` of one concept (an item shared by
    several rows) has an Inf token."""
    image, text = module.towers["image"], module.towers["text"]
    bad_image = rows[0]["image"]
    bad_text = next(r["text_en"] for r in rows if r["concept"] != rows[0]["concept"])
    towers = {
        "image": Tower(Poisoned(image.encoder, [bad_image]), "image", lambda i, o: projectors.Linear(i, o)),
        "text": Tower(Poisoned(text.encoder, [bad_text], where="tokens"), "text_en", lambda i, o: projectors.AttentionPool(i, o, num_heads=2)),
    }
    for t in towers.values():
        t.build(16)
    bad_ids = [r["id"] for r in rows if r["image"] == bad_image or r["text_en"] == bad_text]
    assert len(bad_ids) == 4  # 1 image row + the 3 rows sharing the poisoned text_en
    return towers, bad_ids, bad_image


def test_nan_features_error_names_row_and_field(rows, poisoned, tmp_path):
    towers, bad_ids, _ = poisoned
    with pytest.raises(BadInputError, match=rf"id='{bad_ids[0]}' field 'features/image/pooled': non-finite features"):
        write_split(rows, towers, tmp_path / "val", shard_size=10, batch_size=8, progress=False)
    with pytest.raises(BadInputError, match=rf"id='{bad_ids[1]}' field 'features/text_en/tokens': non-finite features"):
        write_split(rows, {"text": towers["text"]}, tmp_path / "val", shard_size=10, batch_size=8, progress=False)


def test_nan_features_skipped_rows_left_out(rows, module, poisoned, tmp_path):
    towers, bad_ids, _ = poisoned
    path = tmp_path / "val"
    report = BadInputReport()
    manifest = write_split(rows, towers, path, shard_size=10, batch_size=8, progress=False, on_error="skip", report=report)
    assert sorted(manifest["skipped_rows"]) == sorted(bad_ids)
    assert manifest["num_cached_rows"] == len(rows) - len(bad_ids) and manifest["skipped"] == {"non-finite features": len(bad_ids)}
    assert report.as_dict() == {"non-finite features": len(bad_ids)}
    for npy in path.glob("*/shard-*.npy"):  # skipped items are stored as zeros: every shard stays finite
        arr = np.load(npy)
        assert arr.dtype == bool or np.isfinite(arr).all(), npy

    ds = CachedSplit(path, rows, towers)
    kept = [r for r in rows if r["id"] not in bad_ids]
    assert len(ds) == len(kept) and ds.report.as_dict() == {"non-finite features": len(bad_ids)}
    # Row/feature alignment: every kept row's features are its own item's (compared with direct encoding).
    order = list(np.random.default_rng(1).permutation(len(kept)))
    batch = ds.__getitems__(order)
    picked = [kept[i] for i in order]
    assert batch["meta"]["id"] == [r["id"] for r in picked]
    for name, field in (("image", "image"), ("text", "text_en")):
        enc = module.towers[name].encoder
        direct = enc(enc.preprocess([r[field] for r in picked]))
        torch.testing.assert_close(batch["features"][name]["pooled"].float(), direct.pooled, atol=2e-2, rtol=1e-2)
    m = direct.mask.unsqueeze(-1)
    torch.testing.assert_close(batch["features"]["text"]["tokens"].float() * m, direct.tokens * m, atol=2e-2, rtol=1e-2)

    # The DataModule assigns the manifest's report: the cache's skips stay counted beside it.
    other = BadInputReport()
    other.add("empty text", "x")
    ds.report = other
    assert ds.report.as_dict() == {"empty text": 1, "non-finite features": len(bad_ids)}
    # A reader (or writer) under on_error="error" refuses the rows left out.
    with pytest.raises(CacheError, match="left out .* non-finite features"):
        CachedSplit(path, rows, towers, on_error="error")
    with pytest.raises(BadInputError, match=bad_ids[0]):
        write_split(rows, towers, path, shard_size=10, batch_size=8, progress=False)
    # A recipe that does not read the poisoned field keeps every row (skips are per entry).
    assert len(CachedSplit(path, rows, {"image": towers["image"]})) == len(rows) - sum(r["image"] == poisoned[2] for r in rows)


def test_skipped_rows_never_reach_training(rows, poisoned, synthetic_data, tmp_path, capsys):
    import lightning as L

    from mmalign.cache.command import cache
    from mmalign.data import AlignmentDataModule
    from mmalign.data.policy import BadInputCallback

    towers, bad_ids, _ = poisoned
    model = AlignmentModule(dict(towers.items()), [Objective(ClipLoss(), ["image", "text"])], embed_dim=16)
    manifest = str(synthetic_data / "val.jsonl")
    rows_fields = ManifestDataset(manifest, required_fields=["image", "text_en"]).rows
    assert [r["id"] for r in rows_fields] == [r["id"] for r in rows]
    dm = AlignmentDataModule(train=manifest, val=manifest, batch_size=8, on_error="skip", cache_dir=str(tmp_path / "c"))
    summary = cache(model, dm, shard_size=10, progress=False)
    assert summary["train"]["skipped"] == {"non-finite features": len(bad_ids)}
    assert f"rows left out of the cache: {len(bad_ids)}" in capsys.readouterr().out

    seen: list[str] = []

    class Ids(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(batch["meta"]["id"])
            for name, f in batch["features"].items():
                assert torch.isfinite(f["pooled"]).all(), name

    callback = BadInputCallback()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Ids(), callback])
    trainer.fit(model, datamodule=dm)
    assert not set(seen) & set(bad_ids) and len(seen) == (len(rows) - len(bad_ids)) // 8 * 8  # drop_last
    assert dm.datasets["train"].report.as_dict() == {"non-finite features": len(bad_ids)}
    assert dm.skipped()["train"] == {"non-finite features": len(bad_ids)}
    assert callback.report.counts["non-finite features"] == 2 * len(bad_ids)  # train and val (the same manifest)

    # the same cache under the default policy is refused: its skips were made under on_error="skip"
    strict = AlignmentDataModule(train=manifest, val=manifest, batch_size=8, cache_dir=str(tmp_path / "c"))
    strict.connect(model)
    with pytest.raises(Exception, match="non-finite|skip"):
        strict.setup("fit")


def test_tampered_cache_refused(rows, module, tmp_path):
    towers = dict(module.towers.items())
    path = tmp_path / "val"
    _write(rows, module, path)
    entry = next(p for p in path.iterdir() if p.name.startswith("text--"))
    shard = np.load(entry / "shard-00001.pooled.npy", mmap_mode="r+")
    shard[3, 0] = np.nan
    shard.flush()
    del shard
    # Item 13 of the text entry is the text of row 13 (texts are unique per row).
    with pytest.raises(CacheError, match=rf"shard-00001.pooled.npy: row 3 \(item of row id='{rows[13]['id']}'\) holds NaN/Inf"):
        CachedSplit(path, rows, towers)
    assert len(CachedSplit(path, rows, towers, verify=False)) == len(rows)  # the value scan is what verify_cache adds
    np.save(entry / "shard-00002.pooled.npy", np.zeros((3, 4), dtype=np.float16))  # wrong shape: always refused
    with pytest.raises(CacheError, match=r"shard-00002.pooled.npy: shape \(3, 4\)"):
        CachedSplit(path, rows, towers, verify=False)


def test_appending_a_manifest_encodes_only_the_new_shards(rows, module, synthetic_data, tmp_path):
    """``train: [a, b]`` after ``train: a``: the shards of a are kept (this is how extra vocabulary is added)."""
    from mmalign.cache.command import cache
    from mmalign.data import AlignmentDataModule

    full = [json.loads(line) for line in (synthetic_data / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in full:
        r["image"] = str((synthetic_data / r["image"]).resolve())
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in full[:20]), encoding="utf-8")
    b.write_text("".join(json.dumps(r) + "\n" for r in full[20:]), encoding="utf-8")

    def run(train):
        written: list[tuple[str, int]] = []
        dm = AlignmentDataModule(train=train, val=str(a), batch_size=8, cache_dir=str(tmp_path / "c"))
        from mmalign.cache import command

        original = command.write_split
        command.write_split = lambda *args, **kw: original(*args, **{**kw, "on_shard": lambda n, k: written.append((n, k))})
        try:
            cache(module, dm, shard_size=10, progress=False)
        finally:
            command.write_split = original
        return dm, written

    _, first = run(str(a))
    assert sorted({k for _, k in first}) == [0, 1]
    dm, second = run([str(a), str(b)])
    assert second and all(k >= 2 for _, k in second), second  # shards 0-1 (rows of a) were not re-encoded
    dm.connect(module)
    dm.setup("fit")
    assert [r["id"] for r in dm.datasets["train"].rows] == [r["id"] for r in full]
