"""Speech synthesis engines for the offline generators: espeak-ng, flite and festival behind one call (issue 17.3).

The styled speech of :mod:`mmalign.datasets.espeak` and :mod:`mmalign.datasets.words` comes from espeak-ng only,
and a student trained on it maps espeak-ng's formant voices (docs/results_speech.md). This module adds other
Debian synthesisers as further "speakers":

* ``espeak-ng`` (package ``espeak-ng``): every language of :data:`mmalign.data.langs.ESPEAK_VOICES`, with the
  voice variants of :data:`mmalign.datasets.espeak.VOICE_VARIANTS` (``en-us+m3``);
* ``flite`` (package ``flite``): CMU Flite's built-in English voices (``kal`` 8 kHz diphone, ``kal16``, ``awb``,
  ``rms``, ``slt`` clustergen);
* ``festival`` (package ``festival`` plus one ``festvox-*`` package per voice): English diphone voices
  ``kal_diphone``/``ked_diphone``, the HTS statistical voice ``cmu_us_slt_arctic_hts``, the Italian diphone
  voices ``lp_diphone``/``pc_diphone`` and, where the release has it, the Spanish ``el_diphone``.

:func:`available_voices` discovers at run time which of these are installed (the registry :data:`VOICES` says
which package brings each); :func:`speak` writes one clip as a 16 kHz mono PCM16 wav atomically (temporary file,
validated by :func:`mmalign.datasets.espeak.wav_problem`, then ``os.replace``). The text always goes through stdin
or a file, never the command line, so a name can never be read as an option.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SAMPLE_RATE = 16_000  # every engine's clip is resampled to this (Whisper's rate)
ENGINES: tuple[str, ...] = ("espeak-ng", "flite", "festival")
#: Debian package that provides each engine's executable.
ENGINE_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival"}
_EXECUTABLES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "text2wave"}


@dataclass(frozen=True)
class Voice:
    """One synthesiser voice: ``engine``, its own ``name``, the language it speaks and the package it needs."""

    engine: str
    name: str
    lang: str
    package: str

    @property
    def key(self) -> str:
        """``engine:name`` (what options, tags and cache keys use)."""
        return f"{self.engine}:{self.name}"

    @property
    def tag(self) -> str:
        """A filename-safe short name: ``fl-slt``, ``fe-kal_diphone``, ``es-m3`` (espeak variant)."""
        short = {"espeak-ng": "es", "flite": "fl", "festival": "fe"}[self.engine]
        name = self.name.split("+", 1)[1] if self.engine == "espeak-ng" and "+" in self.name else self.name
        return f"{short}-{name}"


#: Every non-espeak voice this module knows (installed or not): engine -> {voice name: (language, package)}.
VOICES: dict[str, dict[str, tuple[str, str]]] = {
    "flite": {"kal": ("en", "flite"), "kal16": ("en", "flite"), "awb": ("en", "flite"), "rms": ("en", "flite"),
              "slt": ("en", "flite")},
    "festival": {"kal_diphone": ("en", "festvox-kallpc16k"), "ked_diphone": ("en", "festvox-kdlpc16k"),
                 "cmu_us_slt_arctic_hts": ("en", "festvox-us-slt-hts"), "lp_diphone": ("it", "festvox-italp16k"),
                 "pc_diphone": ("it", "festvox-itapc16k"), "el_diphone": ("es", "festvox-ellpc11k")},
}
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")
#: Festival's diphone voices read ISO-8859-1 text (UTF-8 accents would be spelled out byte by byte).
_FESTIVAL_ENCODING = "latin-1"


def find_engine(engine: str) -> str:
    """Path of ``engine``'s executable.

    Raises:
        ValueError: Unknown engine.
        FileNotFoundError: Not installed; the message names the Debian package.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown speech engine {engine!r}; known: {', '.join(ENGINES)}")
    exe = shutil.which(_EXECUTABLES[engine])
    if exe is None:
        raise FileNotFoundError(f"speech engine {engine!r} is not installed ({_EXECUTABLES[engine]} is not on PATH); "
                                f"install it with `apt-get install {ENGINE_PACKAGES[engine]}`")
    return exe


@functools.lru_cache(maxsize=None)
def _installed_names(engine: str) -> frozenset[str]:
    """Voice names ``engine`` has on this machine (empty when the engine is missing)."""
    try:
        exe = find_engine(engine)
    except FileNotFoundError:
        return frozenset()
    if engine == "espeak-ng":
        out = subprocess.run([exe, "--voices"], capture_output=True, text=True, timeout=60).stdout
        return frozenset(line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1)
    if engine == "flite":
        out = subprocess.run([exe, "-lv"], capture_output=True, text=True, timeout=60).stdout
        return frozenset(out.split(":", 1)[-1].split())
    return frozenset(p.name for p in FESTIVAL_VOICE_DIR.glob("*/*") if p.is_dir())  # festival: voices/<lang>/<name>


def available_voices(lang: str | None = None, engines: Iterable[str] = ENGINES) -> list[Voice]:
    """The installed voices of ``engines`` (that speak ``lang`` when given), in registry order.

    espeak-ng contributes its voice for the language with every variant of
    :data:`mmalign.datasets.espeak.VOICE_VARIANTS` (``en-us+m3``...).
    """
    from mmalign.data.langs import ESPEAK_VOICES
    from mmalign.datasets.espeak import VOICE_VARIANTS

    out: list[Voice] = []
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"unknown speech engine {engine!r}; known: {', '.join(ENGINES)}")
        names = _installed_names(engine)
        if engine == "espeak-ng":
            for code, base in ESPEAK_VOICES.items():
                if (lang is None or code == lang) and base in names:
                    out += [Voice(engine, f"{base}+{v}", code, "espeak-ng") for v in VOICE_VARIANTS]
            continue
        for name, (code, package) in VOICES[engine].items():
            if (lang is None or code == lang) and name in names:
                out.append(Voice(engine, name, code, package))
    return out


def get_voice(key: str) -> Voice:
    """The installed voice ``engine:name`` (e.g. ``flite:slt``, ``festival:kal_diphone``, ``espeak-ng:de+m3``).

    Raises:
        ValueError: Malformed key, unknown engine or a voice this module does not know.
        FileNotFoundError: The engine or the voice's package is not installed (the message names the package).
    """
    engine, sep, name = key.partition(":")
    if not sep or not name:
        raise ValueError(f"a voice is 'engine:name', got {key!r}")
    find_engine(engine)  # ValueError / FileNotFoundError naming the engine's package
    if engine == "espeak-ng":
        from mmalign.data.langs import ESPEAK_VOICES

        base = name.split("+", 1)[0]
        langs = [code for code, voice in ESPEAK_VOICES.items() if voice == base]
        if not langs:
            raise ValueError(f"espeak-ng voice {base!r} is not one of the generator's voices {sorted(ESPEAK_VOICES.values())}")
        if base not in _installed_names(engine):
            raise FileNotFoundError(f"espeak-ng has no voice {base!r}; see `espeak-ng --voices`")
        return Voice(engine, name, langs[0], "espeak-ng")
    if name not in VOICES[engine]:
        raise ValueError(f"unknown {engine} voice {name!r}; known: {', '.join(VOICES[engine])}")
    lang, package = VOICES[engine][name]
    if name not in _installed_names(engine):
        raise FileNotFoundError(f"{engine} voice {name!r} is not installed; install it with `apt-get install {package}`")
    return Voice(engine, name, lang, package)


def _command(voice: Voice, exe: str, text_file: Path, out: Path, rate: float, pitch: int | None) -> list[str]:
    """The engine's command line; the text is in ``text_file`` (espeak-ng reads it through stdin instead)."""
    if not re.fullmatch(r"[A-Za-z0-9_+-]+", voice.name):  # festival evaluates it as Scheme: names only
        raise ValueError(f"bad voice name {voice.name!r}")
    if voice.engine == "espeak-ng":
        cmd = [exe, "-v", voice.name, "-w", str(out), "-s", str(int(round(175 * rate)))]
        return cmd + (["-p", str(int(pitch))] if pitch is not None else []) + ["--stdin"]
    if voice.engine == "flite":  # duration_stretch > 1 is slower
        return [exe, "-voice", voice.name, "--setf", f"duration_stretch={1 / rate:.3f}", "-o", str(out),
                "-f", str(text_file)]
    return [exe, "-o", str(out), "-eval", f"(voice_{voice.name})",
            "-eval", f"(Parameter.set 'Duration_Stretch {1 / rate:.3f})", str(text_file)]


def synthesize_wave(text: str, voice: Voice | str, workdir: Path, rate: float = 1.0,
                    pitch: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """Speak ``text`` and return ``(wave, None)``: float32 mono at :data:`SAMPLE_RATE`; ``(None, why)`` on failure.

    Args:
        voice: A :class:`Voice` or its key (``flite:slt``).
        workdir: Folder for the engine's temporary files (removed afterwards).
        rate: Speaking-rate factor (> 1 faster; espeak-ng ``-s 175*rate``, flite/festival duration stretch 1/rate).
        pitch: espeak-ng ``-p`` (0-99); ignored by the other engines.
    """
    import soundfile as sf
    import torch
    import torchaudio.functional as F

    voice = get_voice(voice) if isinstance(voice, str) else voice
    if not 0.5 <= rate <= 2.0:
        raise ValueError(f"rate must be in [0.5, 2], got {rate}")
    exe = find_engine(voice.engine)
    stem = f".tts.{os.getpid()}.{uuid.uuid4().hex}"
    text_file, raw = workdir / f"{stem}.txt", workdir / f"{stem}.wav"
    encoding = _FESTIVAL_ENCODING if voice.engine == "festival" else "utf-8"
    data = text.replace("\n", " ").encode(encoding, errors="replace")
    try:
        text_file.write_bytes(data)
        cmd = _command(voice, exe, text_file, raw, rate, pitch)
        try:
            proc = subprocess.run(cmd, input=data if voice.engine == "espeak-ng" else None, capture_output=True,
                                  timeout=120)
        except subprocess.TimeoutExpired:
            return None, f"{voice.engine} took more than 120 s"
        if proc.returncode != 0 or not raw.is_file():
            return None, f"{voice.engine} exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}"
        try:
            wave, rate_in = sf.read(str(raw), dtype="float32", always_2d=True)
        except (OSError, RuntimeError, sf.LibsndfileError) as err:
            return None, f"unreadable ({err})"
        x = torch.from_numpy(wave.mean(1))
        if rate_in != SAMPLE_RATE:
            x = F.resample(x, int(rate_in), SAMPLE_RATE)
        return x.numpy().astype(np.float32), None
    finally:
        text_file.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)


def speak(text: str, voice: Voice | str, path: str | Path, rate: float = 1.0, pitch: int | None = None,
          aug=None, seed: int = 0) -> str | None:
    """Speak ``text`` with ``voice`` into ``path`` (16 kHz mono PCM16 wav) atomically, optionally augmented.

    Args:
        aug: A :class:`mmalign.data.augment.SpeechAugment` applied to the waveform (seeded by ``seed``), or None.

    Returns:
        None on success, else why it failed (the target is then left untouched).
    """
    import soundfile as sf

    from mmalign.datasets.espeak import publish_wav

    path = Path(path)
    wave, problem = synthesize_wave(text, voice, path.parent, rate, pitch)
    if problem is not None:
        return problem
    if aug is not None:
        from mmalign.data.augment import apply_augment

        wave = apply_augment(wave, SAMPLE_RATE, aug, seed=seed)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak > 1.0:
        wave = wave / peak
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(str(tmp), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        return publish_wav(tmp, path, sample_rate=SAMPLE_RATE)
    finally:
        tmp.unlink(missing_ok=True)


def engine_pool(lang: str, engines: Sequence[str]) -> tuple[list[Voice], bool]:
    """The voices a clip in ``lang`` is drawn from, and whether that is the espeak-ng fallback.

    The pool is every installed voice of ``engines`` for ``lang``, the engines weighted equally (see
    :func:`sample_voice`); when none of them speaks ``lang`` (say ``engines=["flite"]`` and German), the pool is
    espeak-ng's variants and ``fallback`` is True (the caller counts those clips).

    Raises:
        ValueError: An unknown engine name.
        FileNotFoundError: An engine of ``engines`` is not installed at all (naming its package).
    """
    for engine in engines:
        find_engine(engine)
    pool = available_voices(lang, engines)
    if pool:
        return pool, False
    return available_voices(lang, ["espeak-ng"]), True


def sample_voice(rng: np.random.Generator, pool: Sequence[Voice]) -> Voice:
    """A voice of ``pool``: first an engine uniformly among the pool's engines, then one of its voices."""
    engines = list(dict.fromkeys(v.engine for v in pool))
    engine = engines[int(rng.integers(len(engines)))]
    voices = [v for v in pool if v.engine == engine]
    return voices[int(rng.integers(len(voices)))]


#: Range of the speaking-rate factor of styled clips (espeak-ng's styled -s 130-210 around its default 175).
RATE_RANGE = (0.74, 1.2)
ESPEAK_PITCH = (25, 75)


def sample_engine_style(rng: np.random.Generator, lang: str, engines: Sequence[str]) -> dict:
    """A random speaker of ``engines`` for ``lang`` (:func:`engine_pool`, :func:`sample_voice`), rate, pitch
    (espeak-ng only) and waveform augmentation: ``{"voice", "rate", "pitch", "aug", "tag", "fallback"}``.

    The draws are the same whatever the pool (the pitch is drawn even when the engine ignores it), so two pools
    that give a language the same voices (e.g. ``["espeak-ng"]`` and ``["flite"]`` for German, which falls back
    to espeak-ng) give it identical clips. The tag names engine, voice, rate, pitch and augmentation (file names
    and feature-cache keys)."""
    from mmalign.data.augment import sample_augment

    pool, fallback = _pool(lang, tuple(engines))
    if not pool:
        raise FileNotFoundError(f"no installed voice speaks {lang!r} (not even espeak-ng's); "
                                "install it with `apt-get install espeak-ng`")
    voice = sample_voice(rng, pool)
    rate = round(float(rng.uniform(*RATE_RANGE)), 2)
    pitch = int(rng.integers(ESPEAK_PITCH[0], ESPEAK_PITCH[1] + 1))
    aug = sample_augment(rng)
    pitch = pitch if voice.engine == "espeak-ng" else None
    tag = f"{voice.tag}_r{rate:g}" + (f"_p{pitch}" if pitch is not None else "") + f"_{aug.name}"
    return {"voice": voice, "rate": rate, "pitch": pitch, "aug": aug, "tag": tag, "fallback": fallback}


def style_record(style: dict) -> dict:
    """The manifest's ``augment`` record of a :func:`sample_engine_style` clip (JSON-ready)."""
    out = {"engine": style["voice"].engine, "voice": style["voice"].name, "rate": style["rate"]}
    if style["pitch"] is not None:  # espeak-ng's -p; "pitch" is the augmentation's shift in semitones
        out["espeak_pitch"] = style["pitch"]
    return {**out, **style["aug"].to_dict()}


@functools.lru_cache(maxsize=None)
def _pool(lang: str, engines: tuple[str, ...]) -> tuple[list[Voice], bool]:
    return engine_pool(lang, engines)


__all__ = ["ENGINES", "ENGINE_PACKAGES", "RATE_RANGE", "SAMPLE_RATE", "VOICES", "Voice", "available_voices", "engine_pool",
           "find_engine", "get_voice", "sample_engine_style", "sample_voice", "speak", "style_record", "synthesize_wave"]
