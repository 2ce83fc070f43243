"""A real-recordings speech evaluation set assembled from Debian packages (issue 17.3).

Real human voices with known transcripts that a registry ships (Debian, Bookworm versions as measured):

* ``asterisk-core-sounds-{en,es,fr,it,ru}-wav`` 1.6.1-1: the Asterisk PBX prompts read by professional voice
  talents (en_US Allison, es_MX Allison, fr_CA June, it_IT Carlo, ru_RU), 8 kHz telephone PCM, sentence length
  ("Please enter your password followed by the pound key."). The English transcripts are in
  ``asterisk-core-sounds-en``'s ``core-sounds-en.txt``; the other languages read translations of the same
  prompt ids, so their rows carry the English prompt: a cross-lingual speech(L) -> English text set.
* ``ktuberling-data`` 4:22.12.3-1: KTuberling's spoken object names ("ball", "camel", "mushroom"...) recorded by
  native speakers of each language, 44.1 kHz; the names are given in English (``en.soundtheme``), so again
  speech(L) -> English word.
* ``alsa-utils`` 1.2.8-1: the speaker-test voice saying "Front left", "Rear right"... (8 English clips).

Nothing here is synthetic. Packages are fetched with the ordinary client (``apt-get download``) and unpacked
with ``dpkg -x`` into a folder of the caller's (:func:`fetch_packages`); :func:`build_real_speech` then copies the
chosen clips as 16 kHz mono PCM into ``root/audio`` and writes ``root/test.jsonl`` (rows ``id``, ``set``,
``lang``, ``text``, ``concept``, ``audio``, ``source``) and ``root/info.json``. Deterministic; rebuilt only
when its arguments change.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Debian packages and the versions the set was measured with.
PACKAGES = {
    "asterisk-core-sounds-en": "1.6.1-1",
    **{f"asterisk-core-sounds-{lang}-wav": "1.6.1-1" for lang in ("en", "es", "fr", "it", "ru")},
    "ktuberling-data": "4:22.12.3-1",
    "alsa-utils": "1.2.8-1",
}
ASTERISK_VOICES = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June", "it": "it_IT_m_Carlo",
                   "ru": "ru_RU_f_IvrvoiceRU"}
#: KTuberling object names as words (theme prefixes dropped, a few joined words split).
KTUBERLING_WORDS = {"fallingstar": "falling star", "palmtree": "palm tree", "sphynx": "sphinx", "brocolli": "broccoli",
                    "ufo": "UFO", "moonwalker": "moon buggy", "shoe": "shoe", "spectacles": "glasses"}
ALSA_CLIPS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Side_Left",
              "Side_Right")
SAMPLE_RATE = 16_000
VERSION = 2


def fetch_packages(dest: str | os.PathLike, packages: Sequence[str] = tuple(PACKAGES)) -> Path:
    """``apt-get download`` the packages into ``dest/debs`` and unpack them (``dpkg -x``) into ``dest/root``.

    Returns:
        The unpacked root (``dest/root``), to pass to :func:`build_real_speech` as ``prefix``.
    """
    dest = Path(dest)
    debs, root = dest / "debs", dest / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, capture_output=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def _asterisk_transcripts(prefix: Path) -> dict[str, str]:
    path = prefix / "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install or unpack asterisk-core-sounds-en")
    out = {}
    for line in gzip.open(path, "rt", encoding="utf-8", errors="replace"):
        name, sep, text = line.partition(":")
        text = " ".join(text.split())
        if not sep or line.startswith(";") or "/" in name or not text or text.startswith("["):
            continue
        text = re.sub(r"\[.*?\]", "", text).strip(" .")  # leading/trailing "..." of prompt fragments
        if len(text.split()) >= 3 and re.fullmatch(r"[A-Za-z0-9'., ?!-]+", text):
            out[name.strip()] = text
    return out


def _ktuberling(prefix: Path, lang: str) -> list[tuple[str, str, Path]]:
    base = prefix / "usr/share/ktuberling/sounds"
    theme = base / f"{lang}.soundtheme"
    if not theme.is_file():
        return []
    rows = []
    for name, file in re.findall(r'<sound name="([^"]+)" file="([^"]+)"', theme.read_text(encoding="utf-8")):
        word = name.split("_", 1)[-1]
        word = KTUBERLING_WORDS.get(word, word)
        if (base / file).is_file():
            rows.append((name, word, base / file))
    return rows


def _to_wav16k(src: Path, dst: Path) -> float:
    """Decode ``src``, downmix, resample to 16 kHz and write PCM16 ``dst`` atomically; returns seconds."""
    import soundfile as sf
    import torch
    import torchaudio.functional as F

    audio, rate = sf.read(str(src), dtype="float32", always_2d=True)
    wave = torch.from_numpy(audio.mean(1))
    if rate != SAMPLE_RATE:
        wave = F.resample(wave, rate, SAMPLE_RATE)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    sf.write(str(tmp), wave.numpy(), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, dst)
    return wave.numel() / SAMPLE_RATE


def build_real_speech(
    root: str | os.PathLike,
    prefix: str | os.PathLike = "/",
    asterisk_languages: Sequence[str] = ("en", "es", "fr", "it", "ru"),
    asterisk_per_language: int = 40,
    ktuberling_languages: Sequence[str] = ("en", "de", "es", "fr", "it", "pt", "ru", "nl"),
    ktuberling_per_language: int | None = None,
    max_words: int = 14,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the real-recordings evaluation set under ``root`` (see the module docstring).

    Args:
        root: Output folder (``test.jsonl``, ``audio/``, ``info.json``).
        prefix: Where the packages are installed (``/``) or unpacked (:func:`fetch_packages`).
        asterisk_languages: Asterisk prompt languages to take.
        asterisk_per_language: Prompts per language, drawn with ``seed`` among the prompts every chosen
            language has (the same prompt ids in every language), at most ``max_words`` words each.
        ktuberling_languages: KTuberling languages.
        ktuberling_per_language: At most this many words per language, drawn with ``seed`` (``None``: all).
        seed: Seed of the prompt draw.

    Returns:
        The ``info.json`` record (clip counts per set and language, total seconds, package versions).
    """
    root, prefix = Path(root), Path(prefix)
    args = {"asterisk_languages": list(asterisk_languages), "asterisk_per_language": asterisk_per_language,
            "ktuberling_languages": list(ktuberling_languages),
            "ktuberling_per_language": ktuberling_per_language, "max_words": max_words, "seed": seed,
            "version": VERSION}
    info_path = root / "info.json"
    if info_path.is_file() and (root / "test.jsonl").is_file():
        info = json.loads(info_path.read_text())
        if info.get("args") == args:
            return info
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    seconds = 0.0

    def add(set_name: str, lang: str, key: str, text: str, src: Path, source: str) -> None:
        nonlocal seconds
        dst = root / "audio" / f"{set_name}_{lang}_{re.sub(r'[^A-Za-z0-9_-]', '_', key)}.wav"
        seconds += _to_wav16k(src, dst)
        rows.append({"id": f"{set_name}-{lang}-{key}", "set": set_name, "lang": lang, "text": text,
                     "concept": f"{set_name}:{key}", "audio": f"audio/{dst.name}", "source": source})

    if asterisk_languages:
        transcripts = _asterisk_transcripts(prefix)
        sounds = prefix / "usr/share/asterisk/sounds"
        common = [k for k, t in sorted(transcripts.items()) if len(t.split()) <= max_words
                  and all((sounds / ASTERISK_VOICES[lang] / f"{k}.wav").is_file() for lang in asterisk_languages)]
        seen, unique = set(), []
        for k in common:  # one prompt per distinct transcript (a gallery of distinct texts)
            if transcripts[k].lower() not in seen:
                seen.add(transcripts[k].lower())
                unique.append(k)
        pick = np.random.default_rng(seed).permutation(len(unique))[:asterisk_per_language]
        for lang in asterisk_languages:
            for j in sorted(pick):
                k = unique[j]
                add("asterisk", lang, k, transcripts[k], sounds / ASTERISK_VOICES[lang] / f"{k}.wav",
                    f"asterisk-core-sounds-{lang}-wav")
    for lang in ktuberling_languages:
        items = _ktuberling(prefix, lang)
        if ktuberling_per_language is not None and len(items) > ktuberling_per_language:
            keep = np.random.default_rng(seed).permutation(len(items))[:ktuberling_per_language]
            items = [items[i] for i in sorted(keep)]
        for name, word, path in items:
            add("ktuberling", lang, name, word, path, "ktuberling-data")
    alsa = prefix / "usr/share/sounds/alsa"
    for clip in ALSA_CLIPS:
        if (alsa / f"{clip}.wav").is_file():
            add("alsa", "en", clip, clip.replace("_", " ").lower(), alsa / f"{clip}.wav", "alsa-utils")
    if not rows:
        raise FileNotFoundError(f"no real recordings found under {prefix}; run fetch_packages() first")
    tmp = root / f".test.jsonl.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, root / "test.jsonl")
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["set"], {}).setdefault(r["lang"], 0)
        counts[r["set"]][r["lang"]] += 1
    info = {"args": args, "clips": len(rows), "seconds": round(seconds, 1), "counts": counts, "packages": PACKAGES}
    info_path.write_text(json.dumps(info, indent=1))
    return info


__all__ = ["PACKAGES", "build_real_speech", "fetch_packages"]
