"""Speech augmentations before the frozen encoder: determinism by seed, names, and distinct feature-cache items."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mmalign.data.augment import SpeechAugment, apply_augment, colored_noise, sample_augment, seed_for

SR = 16_000


def _wave(seconds: float = 0.8) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * 220 * t) * np.hanning(t.size)).astype(np.float32)


def test_augment_is_deterministic_by_seed():
    w = _wave()
    aug = SpeechAugment(speed=1.1, pitch=2.0, reverb_rt60=0.3, noise="pink", snr_db=10.0)
    a, b, c = apply_augment(w, SR, aug, seed=3), apply_augment(w, SR, aug, seed=3), apply_augment(w, SR, aug, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(apply_augment(w, SR, SpeechAugment(), seed=1), w)  # identity
    assert abs(a.size - w.size * 1.0 / 1.1 - int(0.3 * SR) // 2) < 64  # faster clip, plus half the reverb tail
    assert np.abs(a).max() <= 1.0


def test_noise_at_requested_snr_and_pitch_keeps_length():
    w = _wave()
    noisy = apply_augment(w, SR, SpeechAugment(noise="white", snr_db=10.0), seed=0)
    snr = 10 * np.log10(np.mean(w**2) / np.mean((noisy - w) ** 2))
    assert abs(snr - 10.0) < 0.5
    assert apply_augment(w, SR, SpeechAugment(pitch=-3.0), seed=0).size == w.size
    import torch

    for color in ("white", "pink", "brown", "hum"):
        n = colored_noise(4000, color, SR, torch.Generator().manual_seed(0))
        assert n.shape == (4000,) and abs(float(n.pow(2).mean()) - 1.0) < 1e-3


def test_names_distinct_and_policy_reproducible():
    draws = [sample_augment(np.random.default_rng(seed_for(0, i))) for i in range(50)]
    again = [sample_augment(np.random.default_rng(seed_for(0, i))) for i in range(50)]
    assert draws == again
    by_name = {}
    for a in draws:
        assert by_name.setdefault(a.name, a) == a  # one name, one augmentation
    assert SpeechAugment().name == "clean" and SpeechAugment(speed=0.9, noise="hum", snr_db=5).name == "sp0.9_hum5dB"
    assert SpeechAugment.from_dict(draws[0].to_dict()) == draws[0]
    with pytest.raises(ValueError, match="noise must be one of"):
        SpeechAugment(noise="rain")
    with pytest.raises(ValueError, match="unknown augmentation fields"):
        SpeechAugment.from_dict({"tempo": 1.0})


def test_augmented_clips_are_distinct_cache_items(tmp_path):
    """Each augmentation is its own file, so the feature cache plans (and digests) it as its own item."""
    import soundfile as sf

    from mmalign.cache.format import item_digests, unique_items

    w = _wave()
    rows = [{"id": "apple-en", "audio": str(tmp_path / "apple-en.wav")}]
    sf.write(rows[0]["audio"], w, SR)
    for aug in (SpeechAugment(speed=1.1), SpeechAugment(noise="pink", snr_db=10.0)):
        path = tmp_path / f"apple-en~{aug.name}.wav"
        sf.write(str(path), apply_augment(w, SR, aug, seed=0), SR)
        rows.append({"id": f"apple-en~{aug.name}", "audio": str(path)})
    rows.append(dict(rows[1]))  # the same augmented clip twice is one item
    items, index = unique_items(rows, "audio")
    assert len(items) == 3 and index.tolist() == [0, 1, 2, 1]
    digests = item_digests(items, "audio", "content")
    assert len(set(digests.tolist())) == 3
    assert all(rows[i]["id"].split("~")[-1] in items[j] for i, j in enumerate(index.tolist()) if i)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_build_robust_speech_deterministic(tmp_path):
    from mmalign.datasets.espeak import build_robust_speech

    rows = [{"id": "apple-de", "concept": "apple", "lang": "de", "text": "Apfel"},
            {"id": "pear-de", "concept": "pear", "lang": "de", "text": "Birne"}]
    a = build_robust_speech(tmp_path / "a", rows, variants=1, sentences=1, seed=0, exclude_concepts=["pear"],
                            progress=False)
    b = build_robust_speech(tmp_path / "b", rows, variants=1, sentences=1, seed=0, exclude_concepts=["pear"],
                            progress=False)
    assert a == b and a["clips"] == 2 and a["excluded_rows"] == 1
    ra = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in ra] == ["name", "sentence"] and "Apfel" in ra[1]["text"] and ra[1]["text"] != "Apfel"
    assert len({r["id"] for r in ra}) == 2 and all(r["id"].startswith("apple-de~") for r in ra)
    for r in ra:
        assert (tmp_path / "a" / r["audio"]).read_bytes() == (tmp_path / "b" / r["audio"]).read_bytes()
        assert r["augment"]["voice"].startswith("de+")
