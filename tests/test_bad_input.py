"""Fuzz-style test of the bad-input policy: a manifest with every kind of bad item goes through the
manifest reader and the collator with the real encoders' preprocessing (tiny timm image encoder,
tiny Whisper twin). Default policy: an error naming the id and field. ``skip``: exact counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmalign.data.collate import TowerCollator
from mmalign.data.manifest import ManifestDataset, ManifestError, ManifestRowError, read_manifest
from mmalign.data.policy import BadInputCallback, BadInputError, BadInputReport, check_finite, is_known_language

SR = 16000
FIELDS = ["image", "audio", "text"]


def _text_preprocess(items):
    return {"lengths": torch.tensor([len(t) for t in items])}


@pytest.fixture(scope="module")
def towers():
    from encoders import TimmImageEncoder
    from encoders.whisper import WhisperSpeechEncoder

    image = TimmImageEncoder("tiny:timm-vit")
    speech = WhisperSpeechEncoder("tiny:whisper")
    return {"image": ("image", image.preprocess), "speech": ("audio", speech.preprocess), "text": ("text", _text_preprocess)}


def _tone(seconds=0.3, sr=SR, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave


def _good_image(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


#: Bad media kinds -> expected reason. Stereo and 8 kHz audio are fine (down-mixed / resampled).
MEDIA_BAD = {
    "corrupt-image": ("image", "bad image"),
    "truncated-image": ("image", "bad image"),
    "corrupt-audio": ("audio", "bad audio"),
    "empty-audio": ("audio", "empty audio"),
    "silent-audio": ("audio", "silent audio"),
    "lowrate-audio": ("audio", "bad sample rate"),
    "nan-audio": ("audio", "non-finite audio"),
}
#: Manifest-level bad rows -> (field, reason).
MANIFEST_BAD = {
    "missing-text": ("text", "missing text"),
    "empty-text": ("text", "empty text"),
    "space-text": ("text", "empty text"),
    "bad-lang": ("lang", "unknown language"),
    "missing-image-file": ("image", "missing file"),
    "missing-audio-file": ("audio", "missing file"),
}
GOOD_EXTRA = ["stereo-audio", "8khz-audio", "und-lang"]


def _write_media(root: Path) -> dict[str, dict]:
    """Write media for every row kind; returns ``{id: row}`` (paths relative to ``root``)."""
    (root / "m").mkdir(parents=True, exist_ok=True)
    rows = {}

    def row(rid, image=None, audio=None, **kw):
        if image is None:
            image = f"m/{rid}.png"
            _good_image(root / image, len(rows))
        if audio is None:
            audio = f"m/{rid}.wav"
            sf.write(root / audio, _tone(), SR)
        r = {"id": rid, "concept": rid, "lang": "en", "text": f"caption {rid}", "image": image, "audio": audio}
        r.update(kw)
        rows[rid] = r

    for i in range(6):
        row(f"good-{i}")
    # raw media
    (root / "m/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png" * 10)
    row("corrupt-image", image="m/corrupt.png")
    _good_image(root / "m/full.png", 99)
    data = (root / "m/full.png").read_bytes()
    (root / "m/truncated.png").write_bytes(data[: len(data) // 2])
    row("truncated-image", image="m/truncated.png")
    (root / "m/corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" + bytes(range(256)))
    row("corrupt-audio", audio="m/corrupt.wav")
    sf.write(root / "m/empty.wav", np.zeros(0, np.float32), SR)
    row("empty-audio", audio="m/empty.wav")
    sf.write(root / "m/silent.wav", np.zeros(SR // 4, np.float32), SR)
    row("silent-audio", audio="m/silent.wav")
    sf.write(root / "m/lowrate.wav", _tone(sr=1000), 1000)
    row("lowrate-audio", audio="m/lowrate.wav")
    nan = _tone()
    nan[100:110] = np.nan
    sf.write(root / "m/nan.wav", nan, SR, subtype="FLOAT")
    row("nan-audio", audio="m/nan.wav")
    # fine after conversion
    sf.write(root / "m/stereo.wav", _tone(channels=2), SR)
    row("stereo-audio", audio="m/stereo.wav")
    sf.write(root / "m/8k.wav", _tone(sr=8000), 8000)
    row("8khz-audio", audio="m/8k.wav")
    row("und-lang", lang="und")
    # manifest level
    row("missing-text")
    del rows["missing-text"]["text"]
    row("empty-text", text="")
    row("space-text", text=" \t\u3000 ")
    row("bad-lang", lang="english")
    row("missing-image-file", image="m/nope.png")
    row("missing-audio-file", audio="m/nope.wav")
    return rows


def _write_manifest(path: Path, rows: list[dict], extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("fuzz")
    return root, _write_media(root)


def _good(rows):
    return [r for k, r in rows.items() if k.startswith("good")]


def test_skip_policy_counts_every_kind(media, towers):
    root, rows = media
    extra = ['{"id": "broken", "text": ', "[1, 2, 3]", json.dumps(rows["good-0"] | {"text": "dup"})]
    path = _write_manifest(root / "fuzz.jsonl", list(rows.values()), extra)
    ds = ManifestDataset(path, required_fields=FIELDS, on_error="skip")
    expected_manifest = {"malformed json": 2, "duplicate id": 1, "missing text": 1, "empty text": 2,
                         "unknown language": 1, "missing file": 2}
    assert ds.skipped == expected_manifest
    assert {r["id"] for r in ds.rows} == {r["id"] for r in _good(rows)} | set(MEDIA_BAD) | set(GOOD_EXTRA)

    collate = TowerCollator(towers, on_error="skip", silent_audio="skip")
    callback = BadInputCallback()
    seen = []
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=1)
    for batch in loader:
        callback.on_train_batch_start(None, None, batch, 0)
        ids = batch["meta"]["id"]
        seen += ids
        if not ids:  # every item of this batch was bad: an empty batch that still reports its counts
            assert batch["inputs"] == {} and sum(batch["skipped"].values()) == 4
            continue
        # Dropped items are gone from every tower and from meta/keys alike.
        assert batch["inputs"]["image"]["pixel_values"].shape[0] == len(ids)
        assert batch["inputs"]["speech"]["input_features"].shape[0] == len(ids)
        assert batch["inputs"]["text"]["lengths"].tolist() == [len(t) for t in batch["keys"]["text"]]
        assert [Path(p).stem for p in batch["keys"]["image"]] == [Path(r["image"]).stem for r in ds.rows if r["id"] in ids]
    assert sorted(seen) == sorted([r["id"] for r in _good(rows)] + GOOD_EXTRA)
    expected_media = {}
    for _, reason in MEDIA_BAD.values():
        expected_media[reason] = expected_media.get(reason, 0) + 1
    assert callback.report.as_dict() == expected_media
    total = BadInputReport().merge(ds.report).merge(callback.report)
    assert total.total == sum(expected_manifest.values()) + len(MEDIA_BAD)
    assert "silent audio: 1" in total.summary() and "malformed json: 2" in total.summary()


@pytest.mark.parametrize("kind", sorted(MANIFEST_BAD))
def test_default_policy_names_manifest_item(media, kind, tmp_path):
    root, rows = media
    path = _write_manifest(root / f"one-{kind}.jsonl", _good(rows) + [rows[kind]])
    field, reason = MANIFEST_BAD[kind]
    with pytest.raises(BadInputError, match=f"id='{kind}' field '{field}': {reason}"):
        ManifestDataset(path, required_fields=FIELDS)


def test_default_policy_manifest_structure(media):
    root, rows = media
    good = _good(rows)
    bad_json = _write_manifest(root / "badjson.jsonl", good, ['{"id": "x",'])
    with pytest.raises(ManifestError, match=r"malformed json.*badjson.jsonl:7"):
        read_manifest(bad_json)
    dup = _write_manifest(root / "dup.jsonl", good + [good[2]])
    with pytest.raises(ManifestError, match="id='good-2' field 'id': duplicate id.*first seen on line 3"):
        read_manifest(dup)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(root / "absent.jsonl")
    with pytest.raises(ValueError, match="on_error must be one of"):
        ManifestDataset(dup, on_error="ignore")


@pytest.mark.parametrize("kind", sorted(MEDIA_BAD))
def test_default_policy_names_media_item(media, towers, kind):
    root, rows = media
    batch_rows = read_manifest(_write_manifest(root / f"media-{kind}.jsonl", _good(rows)[:3] + [rows[kind]]))
    field, reason = MEDIA_BAD[kind]
    with pytest.raises(BadInputError, match=f"id='{kind}' field '{field}': {reason}"):
        TowerCollator(towers)(batch_rows)


def test_silent_audio_allow_and_stereo_kept(media, towers):
    root, rows = media
    batch_rows = read_manifest(_write_manifest(root / "ok.jsonl", [rows[k] for k in ("silent-audio", *GOOD_EXTRA)]))
    batch = TowerCollator(towers, silent_audio="allow")(batch_rows)
    assert batch["meta"]["id"] == ["silent-audio", *GOOD_EXTRA]
    assert "skipped" not in batch
    # Silence may be skipped while other bad input still raises.
    batch = TowerCollator(towers, on_error="error", silent_audio="skip")(batch_rows)
    assert batch["meta"]["id"] == GOOD_EXTRA and batch["skipped"] == {"silent audio": 1}


def test_check_finite_features():
    feats = torch.randn(4, 3, 8)
    feats[1, 2, 0] = float("nan")
    feats[3, 0, 5] = float("inf")
    ids = ["a", "b", "c", "d"]
    with pytest.raises(BadInputError, match="id='b' field 'features/image/tokens': non-finite features"):
        check_finite(feats, ids, "features/image/tokens")
    report = BadInputReport()
    keep = check_finite(feats, ids, "features/image/tokens", on_error="skip", report=report)
    assert keep.tolist() == [True, False, True, False]
    assert report.as_dict() == {"non-finite features": 2} and report.examples["non-finite features"] == ["b", "d"]
    assert check_finite(torch.ones(2, 3), ["x", "y"], "pooled").all()


def test_language_codes():
    assert all(is_known_language(c) for c in ["en", "de", "zh", "und", "pt-BR", "zh-Hant", "sh"])
    assert not any(is_known_language(c) for c in ["english", "EN", "xx", "", None, "q"])
    babel = pytest.importorskip("babel")
    from mmalign.data.policy import ISO_639_1

    cldr = {k for k in babel.Locale("en").languages if len(k) == 2 and k.isalpha() and k.islower()}
    assert ISO_639_1 == cldr


def test_a_language_name_in_a_manifest_gets_did_you_mean(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "hello", "lang": "english"}) + "\n")
    with pytest.raises(ManifestRowError, match=r"id='a'.*unknown language.*'english'.*did you mean 'en'\?"):
        read_manifest(path)
