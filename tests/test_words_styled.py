"""`mmalign data words --styled true`: every word by a random espeak-ng speaker, augmented before any encoder."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("wordfreq")
sf = pytest.importorskip("soundfile")

from mmalign.datasets.words import build_words_dataset, word_style

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
KWARGS = dict(languages=("en", "de"), words_per_language=2, skip_top=100, progress=False, workers=1)


@needs_espeak
def test_styled_words_are_deterministic_named_by_their_style_and_a_prefix_of_a_larger_set(tmp_path):
    a = build_words_dataset(tmp_path / "a", styled=True, seed=3, **KWARGS)
    b = build_words_dataset(tmp_path / "b", styled=True, seed=3, **KWARGS)
    lines = a.manifest.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert a.manifest.read_bytes() == b.manifest.read_bytes()
    for r in rows:
        style = word_style(3, r["lang"], r["text"])
        assert r["audio"].endswith(f"~{style['tag']}.wav")  # the file (so the feature cache key) names the style
        assert r["augment"]["voice"] == style["voice"] and r["augment"]["voice"].split("+")[0] in ("en-us", "de")
        assert (a.root / r["audio"]).read_bytes() == (b.root / r["audio"]).read_bytes()
        audio, rate = sf.read(a.root / r["audio"])
        assert rate == 22050 and abs(audio).max() > 0.01
    plain = build_words_dataset(tmp_path / "plain", **KWARGS)
    plain_rows = [json.loads(line) for line in plain.manifest.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in plain_rows] == [r["text"] for r in rows] and "augment" not in plain_rows[0]
    assert (plain.root / plain_rows[0]["audio"]).read_bytes() != (a.root / rows[0]["audio"]).read_bytes()
    with pytest.raises(FileExistsError, match="other settings"):
        build_words_dataset(tmp_path / "a", styled=True, seed=4, **KWARGS)
    bigger = build_words_dataset(tmp_path / "a", styled=True, seed=3, overwrite=True, **{**KWARGS, "words_per_language": 3})
    assert bigger.manifest.read_text(encoding="utf-8").splitlines()[:4] == lines
