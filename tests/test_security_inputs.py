"""Fuzz suite for issue 14 (caches and inputs): each malicious cache and each bad medium or text, and the
EXACT outcome (exception type + a message fragment naming the item, or the skip count). The table of
kinds is docs/security.md, "Caches and inputs"."""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import encoders
import projectors
from mmalign import AlignmentModule, ClipLoss, Objective, Tower
from mmalign.cache import CacheError, CachedSplit, write_split
from mmalign.cache.format import DiskFullError
from mmalign.data.collate import TowerCollator
from mmalign.data.manifest import ManifestRowError, read_manifest
from mmalign.data.policy import BadInputCallback, BadInputError, BadInputReport

SR = 16000


def _tone(n: int, sr: int = SR) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header says ``w`` x ``h`` with almost no pixel data (a 'huge image' costs nothing to make)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


#: kind -> (field, reason, file name): every bad medium, with the reason it is counted under.
BAD_MEDIA = {
    "corrupt-png": ("image", "bad image", "corrupt.png"),
    "corrupt-jpeg": ("image", "bad image", "corrupt.jpg"),
    "truncated-png": ("image", "bad image", "truncated.png"),
    "truncated-jpeg": ("image", "bad image", "truncated.jpg"),
    "zero-byte-image": ("image", "bad image", "zero.png"),
    "huge-image": ("image", "huge image", "huge.png"),
    "corrupt-wav": ("audio", "bad audio", "corrupt.wav"),
    "zero-byte-wav": ("audio", "bad audio", "zero.wav"),
    "truncated-wav": ("audio", "truncated audio", "truncated.wav"),
    "1-sample": ("audio", "short audio", "s1.wav"),
    "2-sample": ("audio", "short audio", "s2.wav"),
    "3-sample": ("audio", "short audio", "s3.wav"),
    "below-encoder-minimum": ("audio", "short audio", "s200.wav"),
    "nan-audio": ("audio", "non-finite audio", "nan.wav"),
    "inf-audio": ("audio", "non-finite audio", "inf.wav"),
    "silent-audio": ("audio", "silent audio", "silent.wav"),
    "1khz-audio": ("audio", "bad sample rate", "lowrate.wav"),
}
GOOD_EXTRA = {"8khz-audio": "8k.wav", "44khz-audio": "44k.wav"}  # resampled, not bad


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    rows = {}
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"good{i}.png")
        sf.write(root / f"good{i}.wav", _tone(4000 + 800 * i), SR)
        rows[f"good-{i}"] = {"id": f"good-{i}", "lang": "en", "text": f"t{i}", "image": f"good{i}.png", "audio": f"good{i}.wav"}
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png" * 10)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "full.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "full.jpg", quality=90)
    for ext in ("png", "jpg"):
        data = (root / f"full.{ext}").read_bytes()
        (root / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (root / "zero.png").write_bytes(b"")
    _png_header_only(root / "huge.png", 12000, 12000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" + bytes(range(256)))
    (root / "zero.wav").write_bytes(b"")
    sf.write(root / "full.wav", _tone(8000), SR)
    data = (root / "full.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    for n in (1, 2, 3, 200):  # 200 samples (12.5 ms) pass the 10 ms floor, not Whisper's 400
        sf.write(root / f"s{n}.wav", _tone(n), SR)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        wave = _tone(4000)
        wave[10:12] = value
        sf.write(root / f"{name}.wav", wave, SR, subtype="FLOAT")
    sf.write(root / "silent.wav", np.zeros(4000, np.float32), SR)
    sf.write(root / "lowrate.wav", _tone(300, 1000), 1000)
    sf.write(root / "8k.wav", _tone(2000, 8000), 8000)
    sf.write(root / "44k.wav", _tone(11025, 44100), 44100)
    for kind, (field, _, name) in BAD_MEDIA.items():
        rows[kind] = {**rows["good-0"], "id": kind, "text": kind, field: name}
    for kind, name in GOOD_EXTRA.items():
        rows[kind] = {**rows["good-1"], "id": kind, "text": kind, "audio": name}
    return root, rows


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(media, kinds) -> list[dict]:
    root, rows = media
    return read_manifest(_manifest(root / f"m-{abs(hash(tuple(kinds)))}.jsonl", [rows[k] for k in kinds]))


@pytest.fixture(scope="module")
def towers() -> dict[str, Tower]:
    torch.manual_seed(0)
    out = {"image": Tower(encoders.TimmImageEncoder("tiny:timm-vit"), "image", projectors.Linear),
           "speech": Tower(encoders.WhisperSpeechEncoder("tiny:whisper"), "audio", projectors.Linear)}
    for t in out.values():
        t.build(16)
    return out


GOOD = ["good-0", "good-1", "good-2"]


# -- bad media in `mmalign cache` (the writer) and in `mmalign fit` (the collator) ---------------------


@pytest.mark.parametrize("kind", sorted(BAD_MEDIA))
def test_cache_error_names_row_field_and_path(kind, media, towers, tmp_path):
    field, reason, name = BAD_MEDIA[kind]
    tower = {"image": "image", "audio": "speech"}[field]
    with pytest.raises(BadInputError, match=rf"id='{kind}' field '{field}': {reason} \(.*{re.escape(name)}"):
        write_split(_rows(media, GOOD + [kind]), {tower: towers[tower]}, tmp_path / "val", shard_size=2, progress=False)


@pytest.mark.parametrize("kind", sorted(BAD_MEDIA))
def test_fit_collator_names_row_field(kind, media, towers):
    field, reason, _ = BAD_MEDIA[kind]
    collate = TowerCollator({n: (t.field, t.encoder.preprocess) for n, t in towers.items()})
    with pytest.raises(BadInputError, match=rf"id='{kind}' field '{field}': {reason}"):
        collate(_rows(media, GOOD + [kind]))


def test_cache_skip_leaves_out_and_counts_each_bad_medium(media, towers, tmp_path, capsys):
    from mmalign.cache.command import cache
    from mmalign.data import AlignmentDataModule

    root, rows = media
    kinds = GOOD + sorted(BAD_MEDIA) + sorted(GOOD_EXTRA)
    manifest = str(_manifest(root / "all.jsonl", [rows[k] for k in kinds]))
    model = AlignmentModule(dict(towers.items()), [Objective(ClipLoss(), ["image", "speech"])], embed_dim=16)
    dm = AlignmentDataModule(train=manifest, val=manifest, batch_size=4, on_error="skip", silent_audio="skip",
                             cache_dir=str(tmp_path / "c"))
    summary = cache(model, dm, split="train", shard_size=4, progress=False)["train"]
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_MEDIA.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["skipped"] == dict(sorted(expected.items()))
    assert summary["num_cached_rows"] == len(GOOD) + len(GOOD_EXTRA)
    assert f"rows left out of the cache: {len(BAD_MEDIA)}" in capsys.readouterr().out
    written = json.loads((tmp_path / "c/train/manifest.json").read_text())
    assert sorted(written["skipped_rows"]) == sorted(BAD_MEDIA)  # counted with their row ids
    ds = CachedSplit(tmp_path / "c/train", read_manifest(manifest), dict(towers.items()))
    assert [r["id"] for r in ds.rows] == GOOD + sorted(GOOD_EXTRA)
    assert ds.report.as_dict() == dict(sorted(expected.items()))
    # The same cache under on_error=error re-encodes the shards that skipped items, so it raises.
    strict = AlignmentDataModule(train=manifest, val=manifest, batch_size=4, silent_audio="skip", cache_dir=str(tmp_path / "c"))
    with pytest.raises(BadInputError, match="bad input: item id="):
        cache(model, strict, split="train", shard_size=4, progress=False)


def test_audio_below_encoder_minimum_is_short_for_wav2vec2(media, tmp_path):
    enc = encoders.Wav2Vec2SpeechEncoder("tiny:wav2vec2")
    assert enc.min_audio_samples == 400  # its conv receptive field: 399 samples give no frame (a conv RuntimeError)
    root, _ = media
    sf.write(root / "s399.wav", _tone(399), SR)
    collate = TowerCollator({"speech": ("audio", enc.preprocess)})
    rows = [{"id": "short", "concept": "c", "lang": "en", "audio": str(root / "s399.wav")}]
    with pytest.raises(BadInputError, match=r"id='short' field 'audio': short audio .*399 samples.*at least 400"):
        collate(rows)


def test_huge_image_budget_is_configurable(media, towers, monkeypatch):
    root, _ = media
    collate = TowerCollator({"image": ("image", towers["image"].encoder.preprocess)}, max_image_pixels=32 * 32 - 1)
    rows = [{"id": "small", "concept": "c", "lang": "en", "image": str(root / "good0.png")}]
    with pytest.raises(BadInputError, match=r"id='small' field 'image': huge image .*32x32 = 1,024 pixels"):
        collate(rows)
    monkeypatch.setenv("MMALIGN_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(BadInputError, match="huge image"):
        TowerCollator({"image": ("image", towers["image"].encoder.preprocess)})(rows)
    monkeypatch.setenv("MMALIGN_MAX_IMAGE_PIXELS", "0")  # 0: no budget
    assert TowerCollator({"image": ("image", towers["image"].encoder.preprocess)})(rows)["meta"]["id"] == ["small"]


def test_skip_counts_items_not_passes(media, towers):
    collate = TowerCollator({"image": ("image", towers["image"].encoder.preprocess)}, on_error="skip")
    batch = collate(_rows(media, ["good-0", "corrupt-png"]))
    assert batch["skipped"] == {"bad image": 1} and batch["skipped_ids"] == {"bad image": ["corrupt-png"]}
    callback = BadInputCallback()
    for _ in range(4):  # the sanity check and 3 validation epochs decode the same corrupt image again
        callback.on_validation_batch_start(None, None, batch, 0)
    assert callback.report.as_dict() == {"bad image": 1}
    callback.on_train_batch_start(None, None, batch, 0)  # the same id in another split is another item
    assert callback.report.as_dict() == {"bad image": 2}


# -- text: manifests and `mmalign embed` inputs --------------------------------------------------------


def test_manifest_invalid_utf8_names_file_and_line(tmp_path):
    good = json.dumps({"id": "a", "text": "ok"}).encode()
    path = tmp_path / "m.jsonl"
    path.write_bytes(good + b"\n" + b'{"id": "b", "text": "caf\xe9"}\n' + json.dumps({"id": "c", "text": "x"}).encode() + b"\n")
    with pytest.raises(ManifestRowError, match=r"field '<row>': invalid utf-8 \(.*m.jsonl:2: byte 0xe9 at column 25"):
        read_manifest(path)
    report = BadInputReport()
    assert [r["id"] for r in read_manifest(path, "skip", report)] == ["a", "c"]
    assert report.as_dict() == {"invalid utf-8": 1}
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"id,text\na,ok\nb,caf\xe9\nc,x\n")
    with pytest.raises(ManifestRowError, match=r"invalid utf-8 \(.*m.csv:3: byte 0xe9"):
        read_manifest(csv)
    assert [r["id"] for r in read_manifest(csv, "skip")] == ["a", "c"]


def test_embed_input_invalid_utf8_names_file_and_line(tmp_path):
    from mmalign.export.embed import _read_input

    path = tmp_path / "in.txt"
    path.write_bytes(b"hello\nbad \xff\xfe line\nworld\n")
    with pytest.raises(BadInputError, match=r"invalid utf-8 \(.*in.txt:2: byte 0xff at column 5"):
        _read_input(path, "text")
    assert _read_input(path, "text", on_error="skip") == (["hello", "world"], None)


class _StubModel:
    """Stands in for an export: ``embed`` returns ones (the write path is what is tested)."""

    towers = {"text": type("T", (), {"encoder": type("E", (), {"modality": "text"})()})()}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def select_tower(self, field=None, tower=None):
        return "text"

    def embed(self, items, name, **kwargs):
        return torch.ones(len(items), 4)


def test_embed_writes_atomically_and_says_disk_full(tmp_path, monkeypatch):
    embed_mod = importlib.import_module("mmalign.export.embed")  # the module (the package re-exports the function)

    monkeypatch.setattr(embed_mod, "AlignedModel", _StubModel)
    (tmp_path / "in.txt").write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    embed_mod.embed("export", str(tmp_path / "in.txt"), str(out), progress=False)
    before = out.read_bytes()
    assert np.load(out).shape == (2, 4)
    real_save = np.save

    def full(f, arr, *a, **kw):
        real_save(f, arr[:1])  # part of the file reached the disk, then it filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    (tmp_path / "in.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(DiskFullError, match=rf"cannot write {re.escape(str(out))}: the disk is full"):
        embed_mod.embed("export", str(tmp_path / "in.txt"), str(out), progress=False)
    assert out.read_bytes() == before  # the old output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]  # no temp file left


# -- the feature cache as untrusted input ---------------------------------------------------------


@pytest.fixture(scope="module")
def text_tower() -> dict[str, Tower]:
    torch.manual_seed(0)
    t = Tower(encoders.HFTextEncoder("tiny:xlmr-text"), "text", lambda i, o: projectors.AttentionPool(i, o, num_heads=2))
    t.build(16)
    return {"text": t}


@pytest.fixture(scope="module")
def text_rows() -> list[dict]:
    return [{"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"caption number {i} " * (1 + i % 3)} for i in range(10)]


@pytest.fixture(scope="module")
def pristine(text_rows, text_tower, tmp_path_factory) -> Path:
    """A good cache: 10 items in shards of 4, 4, 2, with tokens (the projector pools them)."""
    path = tmp_path_factory.mktemp("pristine") / "val"
    assert write_split(text_rows, text_tower, path, shard_size=4, progress=False) is not None
    return path


def _copy(pristine: Path, tmp_path: Path) -> tuple[Path, dict, Path]:
    split = tmp_path / "cache" / "val"
    shutil.copytree(pristine, split)
    manifest = json.loads((split / "manifest.json").read_text())
    return split, manifest, split / next(iter(manifest["entries"]))


def _save(split: Path, manifest: dict) -> None:
    (split / "manifest.json").write_text(json.dumps(manifest))


def _entry(m: dict) -> dict:
    return next(iter(m["entries"].values()))


def _shard(m: dict, i: int) -> dict:
    return _entry(m)["shards"][i]


def _outside_link(split: Path, entry: Path, m: dict) -> None:
    outside = split.parent.parent / "elsewhere.npy"
    shutil.copy(entry / "shard-00000.pooled.npy", outside)
    (entry / "shard-00000.pooled.npy").unlink()
    (entry / "shard-00000.pooled.npy").symlink_to(outside)


def _entry_link(split: Path, entry: Path, m: dict) -> None:
    outside = split.parent.parent / "elsewhere"
    shutil.move(entry, outside)
    entry.symlink_to(outside, target_is_directory=True)


def _npy(entry: Path, name: str, array: np.ndarray) -> None:
    np.save(entry / name, array, allow_pickle=True)


def _forged_header(entry: Path, m: dict) -> None:
    """Manifest and .npy header agree on 10^9 tokens per row; the file holds a few: nothing may be allocated."""
    _shard(m, 0)["token_len"] = 10**9
    for key, shape, dtype in (("tokens", (4, 10**9, _entry(m)["token_dim"]), "<f2"), ("mask", (4, 10**9), "|b1")):
        path = entry / f"shard-00000.{key}.npy"
        header = {"descr": dtype, "fortran_order": False, "shape": shape}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)


#: kind -> (tamper(split, entry, manifest), fragment of the CacheError; the manifest is saved after tampering)
MALICIOUS = {
    "shard-absolute-path": (lambda s, e, m: _shard(m, 0).update(name="/etc/passwd"),
                            r"entries\[.*\]\.shards\[0\]\.name: '/etc/passwd' is an absolute path"),
    "shard-dotdot": (lambda s, e, m: _shard(m, 1).update(name="../../shard-00001"), r"shards\[1\]\.name: .* climbs out of its folder"),
    "shard-separator": (lambda s, e, m: _shard(m, 1).update(name="sub/shard-00001"), r"shards\[1\]\.name: .* has a path separator"),
    "shard-symlink-escape": (_outside_link, r"shard-00000.pooled.npy resolves to .*elsewhere.npy, outside the cache folder"),
    "entry-symlink-escape": (_entry_link, r"resolves to .*elsewhere.*, outside the cache folder"),
    "entry-dotdot": (lambda s, e, m: m.update(entries={"../x": _entry(m)}), r"entries\['\.\./x'\]: '\.\./x' climbs out"),
    "duplicate-shard": (lambda s, e, m: _shard(m, 1).update(name="shard-00000"), r"shards\[1\]\.name: 'shard-00000' is listed twice"),
    "shifted-start": (lambda s, e, m: _shard(m, 1).update(start=5), r"shards\[1\]\.start: 5, but the shards before it end at item 4 \(a gap"),
    "overlapping-start": (lambda s, e, m: _shard(m, 1).update(start=3), r"shards\[1\]\.start: 3, .*\(an overlap"),
    "num-items-beyond-shards": (lambda s, e, m: _entry(m).update(num_items=11), r"\.num_items: 11, but the shards hold items 0\.\.10"),
    "missing-shard-key": (lambda s, e, m: _shard(m, 0).pop("count"), r"shards\[0\]: missing key 'count'"),
    "missing-entry-key": (lambda s, e, m: _entry(m).pop("dim"), r"manifest.json: entries\[.*\]: missing key 'dim'"),
    "missing-row-ids": (lambda s, e, m: (s / "row_ids.offsets.npy").unlink(), r"row_ids.offsets.npy is missing"),
    "wrong-type": (lambda s, e, m: _entry(m).update(dim="16"), r"\.dim: expected int, got str"),
    "unknown-dtype": (lambda s, e, m: _entry(m).update(dtype="object"), r"\.dtype: 'object' is not one of"),
    # ids r0..r9 are stored as the bytes "r0r1r2..." (cache format 2): rewriting the first four makes row 1 'r0'.
    "duplicate-row-id": (lambda s, e, m: np.save(s / "row_ids.utf8.npy", np.frombuffer(b"r0r0" + np.load(s / "row_ids.utf8.npy").tobytes()[4:], np.uint8)),
                         r"row ids: id 'r0' appears twice"),
    "skipped-unknown-row": (lambda s, e, m: m.update(skipped_rows={"nobody": "x"}), r"skipped_rows must map row ids"),
    "object-dtype-array": (lambda s, e, m: _npy(e, "shard-00000.pooled.npy", np.array([[1]] * 4, dtype=object)),
                           r"shards\[0\] \(pooled\): .*shard-00000.pooled.npy holds dtype object \(Python objects\)"),
    "string-array": (lambda s, e, m: _npy(e, "shard-00001.pooled.npy", np.array([["ab"] * 32] * 4)),
                     r"shard-00001.pooled.npy holds dtype <U2 \(not numbers\)"),
    "shape-mismatch": (lambda s, e, m: _npy(e, "shard-00002.pooled.npy", np.zeros((3, 4), np.float16)),
                       r"shard-00002.pooled.npy: shape \(3, 4\) float16, the manifest says"),
    "truncated-shard": (lambda s, e, m: (e / "shard-00001.pooled.npy").write_bytes((e / "shard-00001.pooled.npy").read_bytes()[:150]),
                        r"shard-00001.pooled.npy holds 150 bytes, its header needs \d+ \(a truncated file\)"),
    "forged-huge-header": (lambda s, e, m: _forged_header(e, m), r"shard-00000.tokens.npy holds \d+ bytes, its header needs"),
    "rows-out-of-range": (lambda s, e, m: _npy(e, "rows.npy", np.arange(10, dtype=np.int64) + 5),
                          r"rows.npy must map every row to one of the 10 items"),
    "not-npy": (lambda s, e, m: (e / "shard-00000.mask.npy").write_bytes(b"\x80\x04pickle"), r"shard-00000.mask.npy is not a readable .npy"),
    "manifest-not-json": (lambda s, e, m: None, r"manifest.json: unreadable cache manifest"),
    "nan-features": (lambda s, e, m: _npy(e, "shard-00001.pooled.npy", np.where(np.arange(4)[:, None] == 2, np.nan,
                                                                                np.load(e / "shard-00001.pooled.npy"))
                                         .astype(np.float16)),
                     r"shard-00001.pooled.npy: row 2 \(item of row id='r6'\) holds NaN/Inf"),
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_malicious_cache_refused_at_open(kind, pristine, text_rows, text_tower, tmp_path):
    split, manifest, entry = _copy(pristine, tmp_path)
    tamper, fragment = MALICIOUS[kind]
    tamper(split, entry, manifest)
    _save(split, manifest)
    if kind == "manifest-not-json":
        (split / "manifest.json").write_text('{"format": 1, "entries": ')
    tracemalloc.start()
    try:
        with pytest.raises(CacheError, match=fragment):
            CachedSplit(split, text_rows, text_tower)  # at open: not mid-fit, never a bare KeyError/IndexError
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"refusing the cache allocated {peak / 2**20:.0f} MB"


# -- writes: atomic, disk full, idempotent re-runs, stale temp files, concurrent writers ---------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_rerun_on_finished_cache_writes_nothing(pristine, text_rows, text_tower, tmp_path, monkeypatch):
    split, _, _ = _copy(pristine, tmp_path)
    before = _tree(split.parent)
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("builtins.open", read_only_open)
    for name in ("replace", "rename", "unlink", "mkdir"):
        monkeypatch.setattr(os, name, refuse)
    manifest = write_split(text_rows, text_tower, split, shard_size=4, progress=False)
    monkeypatch.undo()
    assert manifest is not None and manifest["num_rows"] == len(text_rows)
    assert _tree(split.parent) == before  # no file rewritten, none created (no temp file, no claim)


def test_cache_disk_full_names_file_and_keeps_shards(text_rows, text_tower, tmp_path, monkeypatch):
    split = tmp_path / "val"
    calls = []
    real_save = np.save

    def fill_up(f, arr, *a, **kw):
        calls.append(1)
        if len(calls) == 4:  # shard 0's pooled, tokens, mask are written; shard 1's pooled fills the disk
            real_save(f, arr[:1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(f, arr, *a, **kw)

    monkeypatch.setattr(np, "save", fill_up)
    with pytest.raises(DiskFullError, match=r"cannot write .*shard-00001.pooled.npy: the disk is full"):
        write_split(text_rows, text_tower, split, shard_size=4, progress=False)
    monkeypatch.undo()
    entry = next(p for p in split.iterdir() if p.is_dir())
    assert sorted(p.name for p in entry.iterdir()) == ["shard-00000.json", "shard-00000.mask.npy", "shard-00000.pooled.npy",
                                                       "shard-00000.tokens.npy"]  # nothing half-written, no temp file
    kept = (entry / "shard-00000.pooled.npy").stat().st_mtime_ns
    assert write_split(text_rows, text_tower, split, shard_size=4, progress=False) is not None  # space freed: resumes
    assert (entry / "shard-00000.pooled.npy").stat().st_mtime_ns == kept
    assert len(CachedSplit(split, text_rows, text_tower)) == len(text_rows)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_cleaned_at_every_level(pristine, text_rows, text_tower, tmp_path):
    from mmalign.cache.format import _HOST

    split, _, entry = _copy(pristine, tmp_path)
    pid = _dead_pid()
    stale = [split.parent / f".val.{_HOST}-{pid}.tmp", split / f".manifest.json.{_HOST}-{pid}.tmp",
             entry / f".shard-00001.pooled.npy.{_HOST}-{pid}.tmp", entry / f".rows.npy.{_HOST}-{pid}.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    live = split / f".manifest.json.{_HOST}-{os.getpid()}.tmp"  # a live writer's: left alone
    live.write_bytes(b"busy")
    write_split(text_rows, text_tower, split, shard_size=4, progress=False)
    assert [p for p in stale if p.exists()] == [] and live.exists()


def test_concurrent_writers_with_other_settings_fail_clearly(text_rows, text_tower, tmp_path):
    split = tmp_path / "val"
    errors: list[Exception] = []

    def second_writer(entry: str, k: int) -> None:
        if k == 0:  # while the first writer is between shards, another run starts with another shard size
            try:
                write_split(text_rows, text_tower, split, shard_size=3, progress=False)
            except CacheError as e:
                errors.append(e)

    assert write_split(text_rows, text_tower, split, shard_size=4, progress=False, on_shard=second_writer) is not None
    assert len(errors) == 1
    assert re.search(r"is being written by another `mmalign cache` \(pid \d+ .*shard_size: theirs 4, ours 3", str(errors[0]))
    assert len(CachedSplit(split, text_rows, text_tower)) == len(text_rows)  # the first one finished its cache
    assert not list(split.glob(".writer-*.json"))  # claims are released
    # A claim left by a killed writer (same host, dead pid) does not block a run with other settings.
    from mmalign.cache.format import _HOST

    pid = _dead_pid()
    claim = split / f".writer-{_HOST}-{pid}-deadbeef.json"
    claim.write_text(json.dumps({"host": _HOST, "pid": pid, "key": "other", "time_ns": 0, "settings": {"shard_size": 9}}))
    assert write_split(text_rows, text_tower, split, shard_size=3, progress=False) is not None and not claim.exists()
