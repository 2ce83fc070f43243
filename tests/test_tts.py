"""The speech-engine layer (``mmalign.datasets.tts``): registry, style tags, and real flite/festival/espeak-ng clips."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mmalign.datasets import tts

sf = pytest.importorskip("soundfile")

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed (apt-get install flite)")
needs_festival = pytest.mark.skipif(
    shutil.which("text2wave") is None or not (tts.FESTIVAL_VOICE_DIR / "english" / "kal_diphone").is_dir(),
    reason="festival with festvox-kallpc16k not installed")


@pytest.fixture
def fake_installed(monkeypatch):
    """Pretend espeak-ng (en-us, de) and flite (slt, kal) are installed and festival is not."""
    installed = {"espeak-ng": frozenset({"en-us", "de"}), "flite": frozenset({"slt", "kal"}), "festival": frozenset()}
    monkeypatch.setattr(tts, "_installed_names", lambda engine: installed[engine])
    monkeypatch.setattr(tts, "find_engine", lambda engine: _fake_find(engine, installed))
    tts._pool.cache_clear()
    yield installed
    tts._pool.cache_clear()


def _fake_find(engine, installed):
    if engine not in tts.ENGINES:
        raise ValueError(f"unknown speech engine {engine!r}")
    if engine == "festival":
        raise FileNotFoundError("install it with `apt-get install festival`")
    return f"/usr/bin/{engine}"


def test_registry_lists_installed_voices_per_language_and_falls_back_to_espeak(fake_installed):
    en = tts.available_voices("en", ["flite"])
    assert [v.key for v in en] == ["flite:kal", "flite:slt"]  # registry order, only the installed ones
    assert tts.available_voices("de", ["flite"]) == []
    pool, fallback = tts.engine_pool("de", ["flite"])
    assert fallback and {v.engine for v in pool} == {"espeak-ng"} and all(v.name.startswith("de+") for v in pool)
    pool, fallback = tts.engine_pool("en", ["flite", "espeak-ng"])
    assert not fallback and {v.engine for v in pool} == {"flite", "espeak-ng"}
    with pytest.raises(FileNotFoundError, match="apt-get install festival"):
        tts.engine_pool("en", ["festival"])
    with pytest.raises(ValueError, match="unknown speech engine"):
        tts.available_voices("en", ["pico"])


def test_get_voice_names_the_missing_package(fake_installed):
    assert tts.get_voice("flite:slt") == tts.Voice("flite", "slt", "en", "flite")
    assert tts.get_voice("espeak-ng:de+m3").lang == "de"
    with pytest.raises(FileNotFoundError, match="flite voice 'rms'.*apt-get install flite"):
        tts.get_voice("flite:rms")
    with pytest.raises(ValueError, match="unknown flite voice"):
        tts.get_voice("flite:nobody")
    with pytest.raises(ValueError, match="engine:name"):
        tts.get_voice("slt")
    with pytest.raises(ValueError, match="bad voice name"):  # festival would evaluate it as Scheme
        tts._command(tts.Voice("festival", "kal_diphone) (system \"x\"", "en", "x"), "text2wave",
                     tts.Path("t.txt"), tts.Path("o.wav"), 1.0, None)


def test_style_tags_name_engine_voice_rate_and_augmentation_and_are_deterministic(fake_installed):
    a = [tts.sample_engine_style(np.random.default_rng(7), "en", ["flite", "espeak-ng"]) for _ in range(2)]
    assert a[0]["tag"] == a[1]["tag"] and a[0]["voice"] == a[1]["voice"]
    tags = set()
    for seed in range(40):
        st = tts.sample_engine_style(np.random.default_rng(seed), "en", ["flite", "espeak-ng"])
        assert st["tag"].startswith(st["voice"].tag + f"_r{st['rate']:g}") and st["tag"].endswith(st["aug"].name)
        assert tts.RATE_RANGE[0] <= st["rate"] <= tts.RATE_RANGE[1]
        assert (st["pitch"] is None) == (st["voice"].engine != "espeak-ng")  # only espeak-ng takes a pitch
        record = tts.style_record(st)
        assert record["engine"] == st["voice"].engine and json.loads(json.dumps(record)) == record
        assert record.get("espeak_pitch") == st["pitch"] and record["pitch"] == st["aug"].pitch  # no key clash
        tags.add(st["voice"].engine)
    assert tags == {"flite", "espeak-ng"}  # engines weighted equally: both drawn
    # a language no engine speaks draws exactly what the espeak-ng pool draws (same clip, same tag)
    fb = tts.sample_engine_style(np.random.default_rng(3), "de", ["flite"])
    es = tts.sample_engine_style(np.random.default_rng(3), "de", ["espeak-ng"])
    assert fb["fallback"] and not es["fallback"] and fb["tag"] == es["tag"]


def test_robust_jobs_with_engines_tag_every_clip_and_count_fallbacks(fake_installed):
    from mmalign.datasets.espeak import _robust_jobs, engine_counts

    rows = [{"id": "apple-en", "concept": "apple", "lang": "en", "text": "apple"},
            {"id": "apple-de", "concept": "apple", "lang": "de", "text": "Apfel"}]
    jobs = _robust_jobs(rows, variants=2, sentences=1, seed=0, engines=["flite"])
    assert len(jobs) == 6 and len({j["tag"] for j in jobs}) == 6
    assert all(j["tag"].split("_", 1)[1] == j["style"]["tag"] for j in jobs)
    counts = engine_counts(jobs, [None] * 5 + ["failed"])
    assert counts["espeak_fallback"] == {"de": 2} and counts["clips"] == {"espeak-ng": 2, "flite": 3}
    assert _robust_jobs(rows, 2, 1, 0, engines=["flite"])[0]["tag"] == jobs[0]["tag"]


@needs_flite
@needs_festival
@needs_espeak
def test_real_engines_write_valid_16k_mono_clips(tmp_path):
    from mmalign.data.augment import SpeechAugment
    from mmalign.datasets.espeak import wav_problem

    tts._installed_names.cache_clear()
    voices = {v.key for v in tts.available_voices("en")}
    assert {"flite:slt", "flite:kal", "festival:kal_diphone", "espeak-ng:en-us+m3"} <= voices
    text = "-v --help; I can see the apple."  # a leading dash must be spoken, never parsed as an option
    for key in ("flite:slt", "flite:kal", "festival:kal_diphone", "espeak-ng:en-us+m3"):
        out = tmp_path / f"{key.replace(':', '_')}.wav"
        assert tts.speak(text, key, out, rate=1.1, pitch=40) is None, key
        wave, rate = sf.read(out, dtype="float32", always_2d=True)
        assert rate == tts.SAMPLE_RATE and wave.shape[1] == 1 and wave.shape[0] > tts.SAMPLE_RATE // 2
        assert wav_problem(out, sample_rate=tts.SAMPLE_RATE) is None
    slow, fast = tmp_path / "slow.wav", tmp_path / "fast.wav"
    assert tts.speak("I can see the apple.", "flite:slt", slow, rate=0.8) is None
    assert tts.speak("I can see the apple.", "flite:slt", fast, rate=1.2) is None
    assert sf.info(slow).frames > sf.info(fast).frames
    aug = SpeechAugment(speed=1.1, noise="pink", snr_db=10.0)
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    assert tts.speak("apple", "festival:kal_diphone", a, aug=aug, seed=1) is None
    assert tts.speak("apple", "festival:kal_diphone", b, aug=aug, seed=1) is None
    assert a.read_bytes() == b.read_bytes()  # deterministic, augmentation included
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@needs_flite
@needs_espeak
def test_build_robust_speech_with_engines_names_them_and_counts_the_fallback(tmp_path):
    from mmalign.datasets.espeak import build_robust_speech

    tts._installed_names.cache_clear()
    tts._pool.cache_clear()
    rows = [{"id": "apple-en", "concept": "apple", "lang": "en", "text": "apple"},
            {"id": "apple-de", "concept": "apple", "lang": "de", "text": "Apfel"}]
    info = build_robust_speech(tmp_path / "a", rows, variants=1, sentences=1, seed=0, engines=["flite"],
                               progress=False)
    again = build_robust_speech(tmp_path / "b", rows, variants=1, sentences=1, seed=0, engines=["flite"],
                                progress=False)
    assert info == again and info["clips"] == 4 and info["args"]["engines"] == ["flite"]
    assert info["engines"]["espeak_fallback"] == {"de": 2} and info["engines"]["clips"] == {"espeak-ng": 2, "flite": 2}
    out = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    for r in out:
        engine = r["augment"]["engine"]
        assert engine == ("flite" if r["lang"] == "en" else "espeak-ng")
        assert ("~n0_" if r["kind"] == "name" else "~s1_") in r["id"]
        assert r["audio"] == f"audio/{r['id']}.wav" and sf.info(tmp_path / "a" / r["audio"]).samplerate == 16_000
        assert (tmp_path / "a" / r["audio"]).read_bytes() == (tmp_path / "b" / r["audio"]).read_bytes()
    legacy = build_robust_speech(tmp_path / "c", rows[1:], variants=1, sentences=0, seed=0, progress=False)
    assert "engines" not in legacy and "engines" not in legacy["args"]  # the default path is unchanged


@needs_flite
@needs_espeak
def test_styled_words_with_engines(tmp_path):
    pytest.importorskip("wordfreq")
    from mmalign.datasets.words import build_words_dataset, word_style

    tts._installed_names.cache_clear()
    tts._pool.cache_clear()
    kw = dict(languages=("en", "de"), words_per_language=2, skip_top=100, progress=False, workers=1, styled=True,
              seed=3)
    info = build_words_dataset(tmp_path / "w", engines=["flite"], **kw)
    rows = [json.loads(x) for x in info.manifest.read_text(encoding="utf-8").splitlines()]
    meta = json.loads((tmp_path / "w" / "info.json").read_text())
    assert meta["args"]["engines"] == ["flite"] and meta["engines"]["espeak_fallback"] == {"de": 2}
    for r in rows:
        st = word_style(3, r["lang"], r["text"], engines=["flite"])
        assert r["audio"].endswith(f"~{st['tag']}.wav") and r["augment"]["engine"] == st["voice"].engine
        assert sf.info(tmp_path / "w" / r["audio"]).samplerate == 16_000
    assert build_words_dataset(tmp_path / "w", engines=["flite"], **kw).cached  # resumes as finished
    with pytest.raises(ValueError, match="styled=True"):
        build_words_dataset(tmp_path / "x", engines=["flite"], **{**kw, "styled": False})
