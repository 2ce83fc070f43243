"""The spoken-words generator (extra SONAR training vocabulary) and multi-manifest training splits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("wordfreq")
sf = pytest.importorskip("soundfile")

from mmalign.data.manifest import ManifestDataset, ManifestError, ManifestRowError
from mmalign.datasets.words import build_words_dataset, normalize, select_words

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
KWARGS = dict(languages=("en", "de"), words_per_language=6, skip_top=100, progress=False)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def held_out(tmp_path) -> Path:
    """A held-out manifest naming a frequent English and German word (so both must be excluded)."""
    en = select_words("en", 1, 100, 3, set(), {})[0]
    de = select_words("de", 1, 100, 3, set(), {})[0]
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"id": "x-en", "lang": "en", "text": en.upper()}) + "\n"
                    + json.dumps({"id": "x-de", "lang": "de", "text": de}) + "\n", encoding="utf-8")
    return path


@needs_espeak
def test_rows_exclude_held_out_names_and_are_rank_interleaved(tmp_path, held_out):
    info = build_words_dataset(tmp_path / "w", exclude=[held_out], **KWARGS)
    rows = rows_of(info.manifest)
    assert [r["lang"] for r in rows] == ["en", "de"] * 6
    held = {normalize(r["text"]) for r in rows_of(held_out)}
    assert not held & {r["text"] for r in rows}
    assert info.skipped == {"held_out_name": 2}
    assert info.rows_per_lang == {"en": 6, "de": 6}
    for r in rows:
        assert set(r) == {"id", "concept", "lang", "text", "audio"}
        assert r["concept"] == f"word:{r['text']}" and r["text"].isalpha() and len(r["text"]) >= 3
        audio, rate = sf.read(info.root / r["audio"])
        assert rate == 22050 and len(audio) > 2205 and abs(audio).max() > 0.01  # real speech, not silence


@needs_espeak
def test_deterministic_cached_and_a_prefix_of_a_larger_set(tmp_path, held_out):
    a = build_words_dataset(tmp_path / "a", exclude=[held_out], **KWARGS)
    b = build_words_dataset(tmp_path / "b", exclude=[held_out], **KWARGS)
    assert a.manifest.read_bytes() == b.manifest.read_bytes()
    for r in rows_of(a.manifest):
        assert (a.root / r["audio"]).read_bytes() == (b.root / r["audio"]).read_bytes()
    assert build_words_dataset(tmp_path / "a", exclude=[held_out], **KWARGS).cached
    with pytest.raises(FileExistsError, match="other settings"):
        build_words_dataset(tmp_path / "a", exclude=[held_out], **{**KWARGS, "words_per_language": 9})
    bigger = build_words_dataset(tmp_path / "a", exclude=[held_out], overwrite=True, **{**KWARGS, "words_per_language": 9})
    assert rows_of(bigger.manifest)[:12] == rows_of(b.manifest)  # a feature cache of the smaller set stays valid


@needs_espeak
def test_bad_arguments_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="no espeak-ng voice"):
        build_words_dataset(tmp_path / "x", languages=("en", "xx"), progress=False)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        build_words_dataset(tmp_path / "x", exclude=[tmp_path / "missing.jsonl"], **KWARGS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not made by build_words_dataset"):
        build_words_dataset(tmp_path / "mine", **KWARGS)


def _manifest(path: Path, ids: list[str], lang: str = "en") -> Path:
    path.write_text("".join(json.dumps({"id": i, "lang": lang, "text": f"text {i}"}) + "\n" for i in ids), encoding="utf-8")
    return path


def test_manifest_dataset_concatenates_files_in_order(tmp_path):
    a = _manifest(tmp_path / "a.jsonl", ["a1", "a2"])
    b = _manifest(tmp_path / "b.jsonl", ["b1"], lang="de")
    ds = ManifestDataset([a, b], required_fields=["text"])
    assert [r["id"] for r in ds.rows] == ["a1", "a2", "b1"]
    assert [r["id"] for r in ManifestDataset([str(a), str(b)], languages=["de"]).rows] == ["b1"]


def test_manifest_dataset_names_both_files_of_a_duplicate_id(tmp_path):
    a = _manifest(tmp_path / "a.jsonl", ["x", "y"])
    b = _manifest(tmp_path / "b.jsonl", ["y", "z"])
    with pytest.raises(ManifestRowError, match=r"'y'.*duplicate id.*b\.jsonl: already in .*a\.jsonl"):
        ManifestDataset([a, b])
    skipping = ManifestDataset([a, b], on_error="skip")
    assert [r["id"] for r in skipping.rows] == ["x", "y", "z"] and skipping.skipped == {"duplicate id": 1}
    with pytest.raises(ManifestError, match="no manifest given"):
        ManifestDataset([])


def test_bad_row_error_names_its_own_file(tmp_path):
    a = _manifest(tmp_path / "a.jsonl", ["x"])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"id": "blank", "lang": "en", "text": "  "}) + "\n", encoding="utf-8")
    with pytest.raises(ManifestRowError, match=r"'blank'.*empty text.*b\.jsonl"):
        ManifestDataset([a, b], required_fields=["text"])
