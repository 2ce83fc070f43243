"""The offline emoji dataset: schema, concept-disjoint splits, determinism, caching, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("emoji")
sf = pytest.importorskip("soundfile")
from PIL import Image

from mmalign.datasets.emoji import build as emoji_data
from mmalign.datasets.emoji import render as emoji_render
from mmalign.datasets.emoji import SPLITS, EmojiRenderer, build_emoji_dataset, find_emoji_font

try:
    FONT = find_emoji_font()
except FileNotFoundError:
    FONT = None
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_font = pytest.mark.skipif(FONT is None, reason="fonts-noto-color-emoji not installed")
needs_tools = pytest.mark.skipif(FONT is None or not HAVE_ESPEAK, reason="font or espeak-ng not installed")

LANGS = ("en", "de", "ja", "zh", "ar")
SPEECH = ("en", "de")
KWARGS = dict(languages=LANGS, speech_languages=SPEECH, max_concepts=12, image_size=48, seed=3, progress=False)
ROW_KEYS = {"id", "concept", "lang", "text", "text_en", "image"}


def read_rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoji") / "ds"
    if FONT is None or not HAVE_ESPEAK:
        pytest.skip("font or espeak-ng not installed")
    build_emoji_dataset(root, **KWARGS)
    return root


@needs_tools
def test_manifest_schema_and_concept_disjoint_splits(built):
    info = json.loads((built / "info.json").read_text(encoding="utf-8"))
    concepts_by_split = {}
    for split in SPLITS:
        rows = read_rows(built, split)
        assert rows, f"{split} is empty"
        for row in rows:
            has_audio = row["lang"] in SPEECH
            assert set(row) == ROW_KEYS | ({"audio"} if has_audio else set()), row
            assert row["id"] == f"{row['concept']}-{row['lang']}"
            assert row["text"] and row["text_en"] and ":" not in row["text"] and "_" not in row["text"]
            assert (built / row["image"]).is_file()
            if has_audio:
                assert row["audio"] == f"audio/{row['concept']}_{row['lang']}.wav"
                assert (built / row["audio"]).is_file()
        # every concept has exactly one row per language, in the requested order
        concepts = sorted({r["concept"] for r in rows})
        assert [r["lang"] for r in rows] == list(LANGS) * len(concepts)
        assert len({r["id"] for r in rows}) == len(rows)
        assert len(rows) == info["num_rows"][split] and len(concepts) == info["num_concepts"][split]
        concepts_by_split[split] = set(concepts)
    train, val, test = (concepts_by_split[s] for s in SPLITS)
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train | val | test) == 12
    assert (len(train), len(val), len(test)) == (9, 1, 2)  # round(12 * 0.1), round(12 * 0.2), the rest
    # the English text is the English row's text
    for split in SPLITS:
        english = {r["concept"]: r["text"] for r in read_rows(built, split) if r["lang"] == "en"}
        assert all(r["text_en"] == english[r["concept"]] for r in read_rows(built, split))
    assert (built / ".complete").is_file()
    assert not list(built.rglob("*.tmp"))


@needs_tools
def test_skipped_emoji_are_counted_not_dropped(built):
    skipped = json.loads((built / "info.json").read_text(encoding="utf-8"))["skipped"]
    # skin-tone, flag, keycap and ZWJ variants are all present in the emoji package and counted
    for reason in ("skin_tone_variant", "flag", "keycap", "multi_codepoint_sequence", "not_fully_qualified"):
        assert skipped.get(reason, 0) > 0, reason
    renderer = EmojiRenderer(FONT, 32)
    assert renderer.render("\ue000") == (None, "not_in_font")  # private-use code point: no glyph
    assert renderer.render("\U0001f418\U0001f98a") == (None, "multi_glyph")  # elephant + fox
    image, reason = renderer.render("\U0001f418")
    assert reason is None and image.size == (32, 32)


@needs_tools
def test_images_are_real_and_not_blank(built):
    paths = sorted((built / "images").glob("*.png"))
    assert len(paths) == 12
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (48, 48)
            pixels = np.asarray(image, dtype=np.float32)  # [H, W, 3]
        assert (pixels < 200).mean() > 0.05, f"{path.name} is nearly blank"
        assert pixels[0, 0].tolist() == [255.0, 255.0, 255.0]  # white background in the corner


@needs_tools
def test_audio_is_valid_speech(built):
    rows = [r for s in SPLITS for r in read_rows(built, s) if "audio" in r]
    assert len(rows) == 12 * len(SPEECH)
    for row in rows:
        audio, sample_rate = sf.read(str(built / row["audio"]), dtype="float32")
        assert sample_rate == 22050 and audio.ndim == 1
        assert audio.shape[0] > 0.2 * sample_rate, row["audio"]
        assert np.sqrt(np.mean(audio**2)) > 0.01, f"{row['audio']} is silent"


@needs_tools
def test_same_arguments_give_byte_identical_folders(built, tmp_path):
    other = tmp_path / "again"
    build_emoji_dataset(other, **KWARGS)
    assert snapshot(other) == snapshot(built)
    reshuffled = tmp_path / "seed"
    build_emoji_dataset(reshuffled, **{**KWARGS, "seed": 4, "speech": False})
    assert read_rows(reshuffled, "test") != read_rows(built, "test")


@needs_tools
def test_second_call_is_a_cache_hit(built, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not render or speak anything")

    monkeypatch.setattr(emoji_data.EmojiRenderer, "render", fail)
    monkeypatch.setattr(emoji_data, "synthesize", fail)
    info = build_emoji_dataset(built, **KWARGS)
    assert info.cached
    assert info.num_concepts == {"train": 9, "val": 1, "test": 2}
    assert info.manifests["train"] == built / "train.jsonl"
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*")} == before


@needs_tools
def test_other_arguments_need_overwrite(tmp_path):
    root = tmp_path / "ds"
    build_emoji_dataset(root, **{**KWARGS, "max_concepts": 4})
    with pytest.raises(FileExistsError, match="max_concepts: 4 -> 5.*overwrite=True"):
        build_emoji_dataset(root, **{**KWARGS, "max_concepts": 5})
    info = build_emoji_dataset(root, **{**KWARGS, "max_concepts": 5, "speech": False}, overwrite=True)
    assert not info.cached and sum(info.num_concepts.values()) == 5
    assert info.speech_languages == [] and sum(info.num_audio.values()) == 0
    assert not list((root / "audio").glob("*.wav"))  # stale files of the old build are removed
    assert len(list((root / "images").glob("*.png"))) == 5


@needs_tools
def test_interrupted_build_resumes_and_keeps_valid_files(built, tmp_path, monkeypatch):
    root = tmp_path / "ds"
    shutil.copytree(built, root)
    # Simulate a crash: no completion marker, one file lost, a temp file left behind.
    (root / ".complete").unlink()
    lost_image = sorted((root / "images").glob("*.png"))[0]
    lost_image.unlink()
    lost_wav = sorted((root / "audio").glob("*.wav"))[0]
    lost_wav.unlink()
    (root / "audio" / f".{lost_wav.name}.123.tmp").write_bytes(b"half a wav")
    calls = []
    real = emoji_data.synthesize
    monkeypatch.setattr(emoji_data, "synthesize", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    info = build_emoji_dataset(root, **KWARGS)
    assert not info.cached
    assert calls == [lost_wav]  # only the missing wav is spoken again
    assert snapshot(root) == snapshot(built)


def test_missing_font_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(emoji_render.FONT_ENV, raising=False)
    monkeypatch.setattr(emoji_render, "FONT_CANDIDATES", (str(tmp_path / "nope.ttf"),))
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        build_emoji_dataset(tmp_path / "ds", **{**KWARGS, "speech": False})
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        build_emoji_dataset(tmp_path / "ds", **{**KWARGS, "speech": False}, font_path=tmp_path / "x.ttf")
    assert not (tmp_path / "ds" / ".complete").exists()


@needs_font
def test_missing_espeak_only_matters_for_speech(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng.*speech=False"):
        build_emoji_dataset(tmp_path / "a", **KWARGS)
    info = build_emoji_dataset(tmp_path / "b", **{**KWARGS, "max_concepts": 4, "speech": False})
    rows = [r for s in SPLITS for r in read_rows(tmp_path / "b", s)]
    assert len(rows) == 4 * len(LANGS) and not any("audio" in r for r in rows)
    assert info.speech_languages == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"languages": ("en", "xx")}, "'xx'"),
        ({"speech_languages": ("fr",)}, "Speech language 'fr'"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "split fractions"),
        ({"max_concepts": 0}, "max_concepts"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_emoji_dataset(tmp_path / "ds", **{**KWARGS, **kwargs})


@needs_font
def test_refuses_a_foreign_non_empty_folder(tmp_path):
    # The builder prunes stale files in images/ and audio/: it must never do that in someone else's folder.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "holiday.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not made by build_emoji_dataset"):
        build_emoji_dataset(tmp_path, **{**KWARGS, "speech": False}, overwrite=True)
    assert (tmp_path / "images" / "holiday.png").read_bytes() == b"not ours"
