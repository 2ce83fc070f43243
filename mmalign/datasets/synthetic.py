"""A small generated multilingual trimodal dataset for tests (no model, font or voice needed).

Each concept gets a pseudo-word name, an image (a concept-specific colour pattern plus per-sample
noise) and a clip (a concept-specific chord). "Languages" are deterministic spellings of the name, so
a text encoder sees different token sequences for the same concept. It proves the plumbing; the real
offline benchmark (``mmalign data emoji``) proves the science.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

SYNTHETIC_LANGS = ("en", "de", "es")
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "bo", "fu", "gi", "ha", "ju", "pe", "wo"]


def _spell(word: str, lang: str) -> str:
    if lang == "en":
        return word
    if lang == "de":
        return word.capitalize() + "en"
    if lang == "es":
        return "el " + word[::-1] + "o"
    raise ValueError(f"synthetic data knows languages {SYNTHETIC_LANGS}, not {lang!r}")


def build_synthetic_dataset(
    root: str | Path,
    num_concepts: int = 48,
    languages: tuple[str, ...] = SYNTHETIC_LANGS,
    image_size: int = 32,
    sample_rate: int = 16000,
    seconds: float = 0.5,
    splits: tuple[float, float] = (0.5, 0.25),
    seed: int = 0,
) -> Path:
    """Write images, audio and ``train/val/test.jsonl`` (split by concept) under ``root``; returns ``root``."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < num_concepts:
        word = "".join(rng.choice(_SYLLABLES, size=3))
        if word not in names:
            names.append(word)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    order = rng.permutation(num_concepts)
    n_train, n_val = int(splits[0] * num_concepts), int(splits[1] * num_concepts)
    split_of = {int(c): ("train" if i < n_train else "val" if i < n_train + n_val else "test") for i, c in enumerate(order)}
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for c, word in enumerate(names):
        base = rng.uniform(0, 255, size=(4, 4, 3))
        pattern = np.kron(base, np.ones((image_size // 4, image_size // 4, 1)))
        freqs = rng.uniform(200, 2000, size=3)
        for lang in languages:
            cid = f"{word}-{lang}"
            img = np.clip(pattern + rng.normal(0, 12, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"{cid}.png")
            wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 3 + rng.normal(0, 0.02, t.shape)
            sf.write(root / "audio" / f"{cid}.wav", (0.5 * wave).astype(np.float32), sample_rate)
            rows[split_of[c]].append({
                "id": cid, "concept": word, "lang": lang, "text": _spell(word, lang), "text_en": word,
                "image": f"images/{cid}.png", "audio": f"audio/{cid}.wav",
            })
    for split, items in rows.items():
        with (root / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
    (root / ".complete").write_text("ok\n")
    return root
