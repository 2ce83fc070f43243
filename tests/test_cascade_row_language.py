"""``WhisperCascadeEncoder(language="row")``: each clip is decoded in its own row's language, and every path that
feeds an encoder (the collator, the feature cache, an export) tells it that language."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import projectors
from encoders.cascade import WhisperCascadeEncoder
from mmalign import AlignmentModule, ClipLoss, Objective, Tower
from mmalign.cache import CacheError, CachedSplit, write_split
from mmalign.data.collate import TowerCollator

SR = 16_000
TINY_TEXT = {"text_encoder": "encoders.HFTextEncoder", "text_encoder_args": {"model_name_or_path": "tiny:bert-text"}}


def _clips() -> list[np.ndarray]:
    t = np.arange(SR) / SR
    return [(0.3 * np.sin(2 * np.pi * f * t[: int(s * SR)])).astype(np.float32) for s, f in ((1.0, 440), (0.6, 330))]


def _enc(language, **kw) -> WhisperCascadeEncoder:
    return WhisperCascadeEncoder("tiny:whisper-asr", language=language, max_new_tokens=4, **TINY_TEXT, **kw)


@pytest.mark.parametrize("pad_seconds", [None, 0.5])
def test_row_language_is_forced_clip_by_clip(pad_seconds):
    clips = _clips()
    row = _enc("row", pad_seconds=pad_seconds, output="decoder+transcript")
    assert row.reads_language and not _enc("de").reads_language
    inputs = row.preprocess(clips, sampling_rate=SR, languages=["de", "en"])
    gen = row.asr.generation_config
    assert inputs["language_ids"].tolist() == [gen.lang_to_id["<|de|>"], gen.lang_to_id["<|en|>"]]
    got = row(inputs).pooled
    for i, lang in enumerate(["de", "en"]):  # the same as an encoder told that language, on that clip alone
        forced = _enc(lang, pad_seconds=pad_seconds, output="decoder+transcript")
        torch.testing.assert_close(got[i:i + 1], forced(forced.preprocess([clips[i]], sampling_rate=SR)).pooled,
                                   atol=1e-5, rtol=1e-5)
    # A language Whisper lacks (or none) is detected among the ones it has, as language=[...all of them...] does.
    detect = _enc(sorted(c[2:-2] for c in gen.lang_to_id), pad_seconds=pad_seconds)
    plain = _enc("row", pad_seconds=pad_seconds)
    assert plain.transcribe(clips, sampling_rate=SR, languages=["fr", "und"]) == detect.transcribe(clips, sampling_rate=SR)
    assert plain.transcribe(clips, sampling_rate=SR) == detect.transcribe(clips, sampling_rate=SR)
    assert plain.preprocess(clips, sampling_rate=SR)["language_ids"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="1 codes for 2 items"):
        plain.preprocess(clips, sampling_rate=SR, languages=["de"])
    # Other settings do not read languages; the cache key names the setting.
    assert "language_ids" not in _enc("de").preprocess(clips, sampling_rate=SR, languages=["en", "en"])
    assert plain.cache_key != _enc(None).cache_key
    assert WhisperCascadeEncoder(**plain.init_args()).reads_language


@pytest.fixture(scope="module")
def module() -> AlignmentModule:
    torch.manual_seed(0)
    towers = {
        "speech": Tower(_enc("row", pad_seconds=0.5), "audio", lambda i, o: projectors.Linear(i, o)),
        "text": Tower(_enc("row", pad_seconds=0.5).text, "text", lambda i, o: projectors.Linear(i, o)),
    }
    return AlignmentModule(towers, [Objective(ClipLoss(), ["speech", "text"])], embed_dim=8)


@pytest.fixture()
def rows(tmp_path) -> list[dict]:
    """One clip in two rows of different languages, another clip, and a text-only row (partial modality)."""
    paths = []
    for i, clip in enumerate(_clips()):
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], clip, SR)
    return [
        {"id": "a-de", "concept": "a", "lang": "de", "audio": str(paths[0]), "text": "eins"},
        {"id": "a-en", "concept": "a", "lang": "en", "audio": str(paths[0]), "text": "one"},
        {"id": "t-en", "concept": "t", "lang": "en", "text": "three"},
        {"id": "b-en", "concept": "b", "lang": "en", "audio": str(paths[1]), "text": "two"},
    ]


def test_collator_tells_the_encoder_each_rows_language(module, rows):
    enc = module.towers["speech"].encoder
    collate = TowerCollator({n: (t.field, t.encoder.preprocess) for n, t in module.towers.items()})
    batch = collate(rows)
    gen = enc.asr.generation_config
    assert batch["inputs"]["speech"]["language_ids"].tolist() == [gen.lang_to_id[f"<|{c}|>"] for c in ("de", "en", "en")]
    assert batch["present"]["speech"].tolist() == [True, True, False, True]


def test_cache_items_are_clip_language_pairs(module, rows, tmp_path):
    towers = dict(module.towers.items())
    split = tmp_path / "cache" / "train"
    manifest = write_split(rows, towers, split, split="train", shard_size=2, batch_size=2, progress=False)
    entry = next(e for e in manifest["entries"].values() if e["field"] == "audio")
    assert entry["num_items"] == 3 and entry["item_by"] == "lang"  # clip0 in de, clip0 in en, clip1 in en
    got = CachedSplit(split, rows, towers).__getitems__([0, 1, 2, 3])
    enc = module.towers["speech"].encoder
    want = enc(enc.preprocess([rows[i]["audio"] for i in (0, 1, 3)], languages=["de", "en", "en"])).pooled
    torch.testing.assert_close(got["features"]["speech"]["pooled"].float(), want, atol=2e-2, rtol=1e-2)
    assert got["present"]["speech"].tolist() == [True, True, False, True]
    changed = [dict(r) for r in rows]
    changed[3]["lang"] = "de"  # the features of that row were decoded in English: the cache is stale
    with pytest.raises(CacheError, match="stale cache"):
        CachedSplit(split, changed, towers)


def test_export_tells_the_encoder_the_items_languages(module, tmp_path):
    from mmalign.export import AlignedModel, export_module

    module.eval()
    export_module(module, tmp_path / "export")
    loaded = AlignedModel.from_pretrained(tmp_path / "export")
    clips = _clips()
    tower = module.towers["speech"]
    with torch.no_grad():
        want = tower(tower.encoder.preprocess(clips, sampling_rate=SR, languages=["de", "en"]))
        detected = tower(tower.encoder.preprocess(clips, sampling_rate=SR))
    torch.testing.assert_close(loaded.embed_speech(clips, sampling_rate=SR, lang=["de", "en"]), want.float(),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.embed_speech(clips, sampling_rate=SR), detected.float(), atol=1e-4, rtol=1e-4)


def test_items_by_language_for_waveform_values():
    """Rows whose values are not strings (decoded waveforms) are paired with their language as well."""
    from mmalign.cache.rowtable import RowTable, items_digests

    wave = [0.0, 0.5, 0.25]
    rows = [{"id": "x", "concept": "c", "lang": "de", "audio": wave}, {"id": "y", "concept": "c", "lang": "en", "audio": wave},
            {"id": "z", "concept": "c", "lang": "de", "audio": list(wave)}, {"id": "w", "concept": "c", "lang": "de"}]
    table = RowTable.of(rows, ["audio"])
    assert table.unique_index("audio")[1].tolist() == [0, 0, 0, -1]
    first, index = table.unique_index("audio", by="lang")
    assert first.tolist() == [0, 1] and index.tolist() == [0, 1, 0, -1]
    digests = items_digests(table, "audio", first, "rows", by="lang")
    assert len(set(digests.tolist())) == 2 and not np.isin(digests, items_digests(table, "audio", first, "rows")).any()


class _LangText:
    """A text 'encoder' that reads languages and refuses one of them (to reach the collator's item-by-item search)."""

    modality = "text"
    reads_language = True

    def preprocess(self, items, languages=None):
        assert languages is not None and len(languages) == len(items)
        if "xx" in languages:
            raise ValueError("no such language")
        return {"codes": list(languages)}


def test_collator_finds_a_bad_item_with_its_own_language():
    """The item-by-item retry hands each item its own language: only the row the encoder refuses is bad."""
    rows = [{"id": "a", "concept": "a", "lang": "de", "text": "eins"}, {"id": "b", "concept": "b", "lang": "xx", "text": "zwei"},
            {"id": "c", "concept": "c", "lang": "en", "text": "three"}]
    batch = TowerCollator({"t": ("text", _LangText().preprocess)}, on_error="skip")(rows)
    assert batch["meta"]["id"] == ["a", "c"] and batch["inputs"]["t"]["codes"] == ["de", "en"]
    assert batch["skipped_ids"] == {"bad text": ["b"]}


def test_an_n_best_cascade_tower_exports_and_embeds_the_same(tmp_path):
    """num_hypotheses travels in the export's encoder arguments: the loaded tower averages the same hypotheses."""
    from mmalign.export import AlignedModel, export_module

    enc = _enc("row", pad_seconds=0.5, num_beams=2, num_hypotheses=2)
    towers = {"speech": Tower(enc, "audio", lambda i, o: projectors.Linear(i, o)),
              "text": Tower(enc.text, "text", lambda i, o: projectors.Linear(i, o))}
    module = AlignmentModule(towers, [Objective(ClipLoss(), ["speech", "text"])], embed_dim=8).eval()
    export_module(module, tmp_path / "export")
    loaded = AlignedModel.from_pretrained(tmp_path / "export")
    assert loaded.towers["speech"].encoder.init_args()["num_hypotheses"] == 2
    clips = _clips()
    with torch.no_grad():
        want = module.towers["speech"](enc.preprocess(clips, sampling_rate=SR, languages=["de", "en"]))
    torch.testing.assert_close(loaded.embed_speech(clips, sampling_rate=SR, lang=["de", "en"]), want.float(), atol=1e-4, rtol=1e-4)
