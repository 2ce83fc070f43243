"""Synthetic "spoken" pseudo-words whose audio spells the transcript: a learnable speech -> text mapping.

:mod:`mmalign.datasets.synthetic` gives each concept an arbitrary chord, so a model can only memorise
which chord goes with which word: on held-out concepts no audio -> text mapping exists to learn. Here
every syllable of :data:`mmalign.datasets.synthetic._SYLLABLES` has its own two-tone "phone" (a fixed pair
of frequencies), and a word is its syllables' tones in order with short gaps, so a transcript can be
read off the audio syllable by syllable, also for words never heard in training. Words have 2 or 3
syllables (clips of different lengths, so padding and masks are exercised); each recording jitters pitch
(+-3%), timing, loudness and noise. Transcripts are the same deterministic per-language spellings as
:mod:`~mmalign.datasets.synthetic` (``en`` the word, ``de`` capitalised + ``en``, ``es`` ``el`` + reversed
+ ``o``): the language is named in the prompt, the audio is the same word. Splits are by word: val/test
words never occur in train, while every syllable does.

It is a check of plumbing and learning (does the adapter carry what the audio says into the LM?), not of
speech recognition.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from mmalign.datasets.synthetic import _SYLLABLES, SYNTHETIC_LANGS, _spell


def syllable_tones(num: int = len(_SYLLABLES)) -> dict[str, tuple[float, float]]:
    """The two frequencies (Hz) of each syllable: a low one from 8 steps, a high one from 2 per low step
    (log-spaced, far apart on the mel scale so any log-mel front end separates them)."""
    lows = np.geomspace(250.0, 900.0, 8)
    highs = np.geomspace(1200.0, 3600.0, 2 * len(lows))
    tones = {}
    for i, syl in enumerate(_SYLLABLES[:num]):
        tones[syl] = (float(lows[i % len(lows)]), float(highs[(i * 5) % len(highs)]))
    return tones


def build_spoken_words(
    root: str | Path,
    num_words: int = 160,
    languages: tuple[str, ...] = SYNTHETIC_LANGS,
    sample_rate: int = 16000,
    syllable_seconds: float = 0.12,
    gap_seconds: float = 0.03,
    splits: tuple[float, float] = (0.6, 0.2),
    seed: int = 0,
) -> Path:
    """Write ``audio/*.wav`` and ``train/val/test.jsonl`` (split by word) under ``root``; returns ``root``.

    Rows: ``id``, ``concept`` (the word), ``lang``, ``text`` (transcript in ``lang``), ``text_en``, ``audio``.
    Every ``(word, lang)`` pair is its own recording (own jitter and noise).
    """
    root = Path(root)
    if (root / ".complete").exists():
        return root
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tones = syllable_tones()
    words: list[tuple[str, ...]] = []
    while len(words) < num_words:
        n = int(rng.integers(2, 4))  # 2 or 3 syllables
        w = tuple(str(s) for s in rng.choice(_SYLLABLES, size=n))
        if w not in words:
            words.append(w)
    order = rng.permutation(num_words)
    n_train, n_val = int(splits[0] * num_words), int(splits[1] * num_words)
    split_of = {int(c): ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, c in enumerate(order)}
    # every syllable must be heard in training, or no model could transcribe it elsewhere
    heard = {s for i, w in enumerate(words) if split_of[i] == "train" for s in w}
    missing = sorted(set(_SYLLABLES) - heard)
    if missing:
        raise ValueError(f"syllables {missing} occur in no training word; use more words (num_words={num_words})")
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for c, syllables in enumerate(words):
        word = "".join(syllables)
        for lang in languages:
            pieces = [np.zeros(int(rng.uniform(0.02, 0.06) * sample_rate))]
            for syl in syllables:
                dur = syllable_seconds * rng.uniform(0.85, 1.15)
                t = np.arange(int(dur * sample_rate)) / sample_rate
                f1, f2 = (f * rng.uniform(0.97, 1.03) for f in tones[syl])
                envelope = np.clip(np.sin(np.pi * t / t[-1]), 0.0, None) ** 0.5  # no clicks at the edges
                pieces.append(envelope * (np.sin(2 * np.pi * f1 * t) + 0.7 * np.sin(2 * np.pi * f2 * t)) / 1.7)
                pieces.append(np.zeros(int(gap_seconds * rng.uniform(0.7, 1.3) * sample_rate)))
            wave = np.concatenate(pieces) * rng.uniform(0.3, 0.6)
            wave = wave + rng.normal(0, 0.01, wave.shape)
            cid = f"{word}-{lang}"
            sf.write(root / "audio" / f"{cid}.wav", wave.astype(np.float32), sample_rate)
            rows[split_of[c]].append({"id": cid, "concept": word, "lang": lang, "text": _spell(word, lang),
                                      "text_en": word, "audio": f"audio/{cid}.wav"})
    for split, items in rows.items():
        with (root / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
    (root / ".complete").write_text("ok\n")
    return root


__all__ = ["build_spoken_words", "syllable_tones"]
