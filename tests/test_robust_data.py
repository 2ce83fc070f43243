"""``mmalign data robust``: styled speech of a training manifest, held-out concepts left out and counted."""

from __future__ import annotations

import json
import shutil

import pytest

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _manifest(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@needs_espeak
def test_mmalign_data_robust_speaks_training_names_not_held_out_ones(tmp_path):
    from mmalign.cli import main
    from mmalign.data.manifest import read_manifest

    train = _manifest(tmp_path / "train.jsonl", [
        {"id": "apple-en", "concept": "apple", "lang": "en", "text": "apple"},
        {"id": "apple-de", "concept": "apple", "lang": "de", "text": "Apfel"},
        {"id": "pear-en", "concept": "pear", "lang": "en", "text": "pear"},  # also in the held-out split
        {"id": "apple-ja", "concept": "apple", "lang": "ja", "text": "りんご"},  # not a language it speaks
    ])
    test = _manifest(tmp_path / "test.jsonl", [{"id": "pear-de", "concept": "pear", "lang": "de", "text": "Birne"}])
    root = tmp_path / "robust"
    main(["data", "robust", "--root", str(root), "--manifest", str(train), "--exclude", f"[{test}]",
          "--languages", "[en, de]", "--variants", "1", "--sentences", "1", "--workers", "1", "--progress", "false"])
    rows = read_manifest(root / "train.jsonl")
    info = json.loads((root / "info.json").read_text())
    assert sorted({r["concept"] for r in rows}) == ["apple"] and info["excluded_rows"] == 1  # pear left out, counted
    assert sorted(r["lang"] for r in rows) == ["de", "de", "en", "en"] and info["clips"] == 4
    assert {r["kind"] for r in rows} == {"name", "sentence"} and all(r["id"].split("~")[0] in ("apple-en", "apple-de") for r in rows)
    assert all((root / "audio" / r["audio"].rsplit("/", 1)[-1]).stat().st_size > 1000 for r in rows)
    again = (root / "train.jsonl").read_bytes()
    main(["data", "robust", "--root", str(root), "--manifest", str(train), "--exclude", f"[{test}]",
          "--languages", "[en, de]", "--variants", "1", "--sentences", "1", "--workers", "1", "--progress", "false"])
    assert (root / "train.jsonl").read_bytes() == again  # deterministic; existing clips kept


def test_bad_arguments_are_named(tmp_path):
    from mmalign.datasets.robust import build_robust_dataset

    train = _manifest(tmp_path / "train.jsonl", [{"id": "a-ja", "concept": "a", "lang": "ja", "text": "りんご"}])
    with pytest.raises(ValueError, match="not both 0"):
        build_robust_dataset(tmp_path / "r", train, variants=0, sentences=0)
    with pytest.raises(ValueError, match="did you mean"):
        build_robust_dataset(tmp_path / "r", train, languages=["english"])
    with pytest.raises(ValueError, match="no row with a text in a language this generator speaks"):
        build_robust_dataset(tmp_path / "r", train, progress=False)
