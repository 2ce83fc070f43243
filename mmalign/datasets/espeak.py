"""Speech from espeak-ng for the offline generators: find the binary, check voices, synthesize and validate WAVs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

from mmalign.data.langs import ESPEAK_VOICES


SAMPLE_RATE = 22050  # espeak-ng's native rate; we check every file has it
_INSTALL_ESPEAK = "install it with `apt-get install espeak-ng`"


def find_espeak() -> str:
    """Path of the ``espeak-ng`` executable.

    Raises:
        FileNotFoundError: espeak-ng is not on PATH, with the apt command that installs it.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            f"espeak-ng is not on PATH but is needed to synthesise speech; {_INSTALL_ESPEAK} "
            "(or pass speech=False to build images and text only)."
        )
    return exe


def wav_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable espeak-ng wav (None when it is: 22050 Hz, mono, not silent)."""
    import soundfile as sf

    try:
        audio, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (OSError, RuntimeError, sf.LibsndfileError) as err:
        return f"unreadable ({err})"
    if sample_rate != SAMPLE_RATE:
        return f"sample rate {sample_rate} != {SAMPLE_RATE}"
    if audio.shape[1] != 1:
        return f"{audio.shape[1]} channels, expected mono"
    if audio.shape[0] < SAMPLE_RATE // 20:
        return f"only {audio.shape[0]} samples"
    if float(np.abs(audio).max()) < 1e-3:
        return "silent"
    return None


def synthesize(text: str, voice: str, path: Path, espeak: str) -> str | None:
    """Speak ``text`` with espeak-ng into ``path`` atomically.

    Returns:
        None on success, else why it failed (the target is then left untouched).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Text goes through stdin so a name can never be parsed as an option.
        proc = subprocess.run(
            [espeak, "-v", voice, "-w", str(tmp), "--stdin"],
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0:
            return f"espeak-ng exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}"
        problem = wav_problem(tmp)
        if problem is not None:
            return problem
        os.replace(tmp, path)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def check_voices(espeak: str, languages: Sequence[str]) -> None:
    listing = subprocess.run([espeak, "--voices"], capture_output=True, text=True).stdout
    available = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    for lang in languages:
        voice = ESPEAK_VOICES[lang]
        if voice not in available:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} for language {lang!r}; see `espeak-ng --voices`.")


# --------------------------------------------------------------------------- files
