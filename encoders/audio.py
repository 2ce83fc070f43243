"""Decoding, down-mixing and resampling of speech inputs for the speech encoders.

Every speech encoder funnels its raw items through :func:`load_audio`, so a path, a NumPy array or a
torch tensor all become one mono ``float32`` waveform at the encoder's sampling rate, and bad input
fails early with an error that names the item: undecodable, empty, NaN/Inf samples, a WAV file cut
short of the length its header declares (a truncated download), or a clip too short to hold speech
(below :data:`MIN_AUDIO_SECONDS`, or below ``min_samples``: speech encoders declare their own minimum as
``min_audio_samples``, e.g. wav2vec2's convolutions need 400 samples for one frame).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Peak amplitude under which a waveform counts as silent (about -80 dBFS).
SILENCE_PEAK = 1e-4
#: Clips shorter than this (10 ms, the hop of every speech front end here) hold no speech: refused
#: whatever the encoder (a 1-3 sample clip otherwise becomes a one-frame row of silence).
MIN_AUDIO_SECONDS = 0.01


class AudioError(ValueError):
    """A speech item could not be turned into a usable waveform.

    Attributes:
        reason: The bad-input reason it is counted under (:mod:`mmalign.data.policy`): ``"bad audio"``,
            ``"empty audio"``, ``"non-finite audio"``, ``"short audio"``, ``"truncated audio"``,
            ``"bad sample rate"``.
    """

    def __init__(self, message: str, reason: str = "bad audio") -> None:
        super().__init__(message)
        self.reason = reason


def min_samples_for(encoder: Any, target_sr: int) -> int:
    """Fewest samples (at ``target_sr``) a clip needs: the encoder's ``min_audio_samples`` or the 10 ms floor."""
    return max(int(getattr(encoder, "min_audio_samples", 0) or 0), math.ceil(MIN_AUDIO_SECONDS * target_sr))


def wav_truncation(path: str | os.PathLike) -> str | None:
    """Why a RIFF/WAVE file is shorter than its header says, or None (not a WAV, or complete).

    libsndfile reads a truncated WAV without complaint (it returns the samples that are there), so a
    cut-off download would pass as a shorter clip. The ``data`` chunk's declared size is compared with
    the bytes that follow it; sizes 0 and 0xFFFFFFFF mean "unknown" (streaming writers) and pass.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                cid, csize = chunk[:4], struct.unpack("<I", chunk[4:8])[0]
                if cid == b"data":
                    have = size - pos - 8
                    if csize not in (0, 0xFFFFFFFF) and have < csize:
                        return f"its data chunk holds {have} of the {csize} bytes its header declares (a truncated file)"
                    return None
                pos += 8 + csize + (csize & 1)  # chunks are padded to an even size
    except OSError:
        return None  # unreadable: decoding reports it
    return None


def _describe(item: Any, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(item, (str, os.PathLike)):
        return repr(str(item))
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return f"<{type(item).__name__} shape={tuple(item.shape)}>"
    return f"<{type(item).__name__}>"


def _decode_file(path: Path, label: str) -> tuple[np.ndarray, int]:
    """Decode ``path`` to ``(samples [N] or [N, C], sampling_rate)``: soundfile, then librosa."""
    if not path.exists():
        raise FileNotFoundError(f"audio file {label} does not exist")
    if path.is_dir():
        raise AudioError(f"audio item {label} is a directory, not an audio file")
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as sf_error:  # noqa: BLE001
        if path.suffix.lstrip(".").upper() in sf.available_formats():
            # A format libsndfile reads (WAV, FLAC, OGG, MP3...) that it cannot decode is corrupt.
            raise AudioError(f"cannot decode audio file {label}: {sf_error!s}") from sf_error
        try:  # other containers (m4a, webm...) through librosa/audioread (needs ffmpeg)
            import librosa

            with warnings.catch_warnings():  # librosa warns on every audioread fallback
                warnings.simplefilter("ignore")
                # mono=False keeps channels ([C, N]); they are averaged below like soundfile's.
                data, sr = librosa.load(str(path), sr=None, mono=False)
        except Exception as lr_error:  # noqa: BLE001
            raise AudioError(
                f"cannot decode audio file {label}: soundfile said {sf_error!s}; librosa said {lr_error!s}"
            ) from lr_error
        data = np.asarray(data, dtype=np.float32)
        return (data.T if data.ndim == 2 else data), int(sr)
    why = wav_truncation(path)
    if why is not None:
        raise AudioError(f"audio file {label} is truncated: {why}", reason="truncated audio")
    return np.asarray(data), int(sr)


def _to_mono(data: np.ndarray, label: str) -> np.ndarray:
    if data.ndim == 1:
        return data
    if data.ndim != 2:
        raise AudioError(f"audio item {label} has shape {data.shape}; expected [samples] or [samples, channels]")
    # Files decode as [N, C]; arrays given by users are often [C, N]: the short axis is channels.
    return data.mean(axis=int(np.argmin(data.shape)))


def load_audio(
    item: Any,
    target_sr: int,
    name: str | None = None,
    sampling_rate: int | None = None,
    min_samples: int = 0,
) -> np.ndarray:
    """Return ``item`` as a mono ``float32`` waveform ``[N]`` sampled at ``target_sr``.

    Args:
        item: A path (``str``/``PathLike``; WAV/FLAC/OGG/MP3 through soundfile, other containers
            through librosa/audioread), or a waveform as a NumPy array / torch tensor, ``[N]`` or ``[N, C]`` / ``[C, N]``
            (multi-channel input is averaged to mono).
        target_sr: Sampling rate the encoder expects (16 kHz for Whisper and wav2vec2).
        name: How to call the item in error messages (default: its path or shape).
        sampling_rate: Rate of an array/tensor ``item``; required for them, ignored for files.
        min_samples: Fewest samples at ``target_sr`` the encoder can use (its ``min_audio_samples``, see
            :func:`min_samples_for`); clips shorter than 10 ms are refused whatever this is.

    Returns:
        ``np.float32`` array ``[N]``. Silent audio is allowed (check it with :func:`is_silent`).

    Raises:
        FileNotFoundError: The path does not exist.
        AudioError: Undecodable or truncated file, array without ``sampling_rate``, empty or too short
            audio, NaN/Inf samples (:attr:`AudioError.reason` says which).
    """
    label = _describe(item, name)
    if isinstance(item, (str, os.PathLike)):
        data, sr = _decode_file(Path(item), label)
        data = _to_mono(data, label)
    elif isinstance(item, (np.ndarray, torch.Tensor, list, tuple)):
        if sampling_rate is None:
            raise AudioError(
                f"audio item {label} is a waveform array but no sampling_rate was given; pass "
                f"sampling_rate=<Hz> (e.g. {target_sr}) or give a file path", reason="bad sample rate",
            )
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().float().numpy()
        data = np.asarray(item, dtype=np.float32)
        data = _to_mono(data, label)
        sr = int(sampling_rate)
    else:
        raise AudioError(f"audio item {label} has unsupported type {type(item).__name__}; give a path or an array")

    if data.size == 0:
        raise AudioError(f"audio item {label} is empty (0 samples)", reason="empty audio")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(f"audio item {label} contains {bad} NaN/Inf samples", reason="non-finite audio")
    if sr <= 0:
        raise AudioError(f"audio item {label} has invalid sampling rate {sr}", reason="bad sample rate")
    need = max(int(min_samples), math.ceil(MIN_AUDIO_SECONDS * target_sr))
    n = math.floor(len(data) * target_sr / sr)  # length after resampling, checked before resampling it
    if n < need:
        raise AudioError(
            f"audio item {label} is too short: {len(data)} samples at {sr} Hz ({1000 * len(data) / sr:.2f} ms); "
            f"the encoder needs at least {need} samples at {target_sr} Hz ({1000 * need / target_sr:.1f} ms)",
            reason="short audio",
        )
    if sr != target_sr:
        import torchaudio.functional as AF

        data = AF.resample(torch.from_numpy(np.ascontiguousarray(data)), sr, target_sr).numpy()
    return np.ascontiguousarray(data, dtype=np.float32)


def is_silent(waveform: np.ndarray | torch.Tensor, peak: float = SILENCE_PEAK) -> bool:
    """True when every sample's magnitude is below ``peak`` (digital silence or near it)."""
    w = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    return w.size == 0 or float(np.abs(w).max()) < peak


def load_batch(items: Any, target_sr: int, sampling_rate: int | None = None, min_samples: int = 0) -> list[np.ndarray]:
    """:func:`load_audio` over a sequence; errors name the item's index as well as the item."""
    if isinstance(items, (str, os.PathLike, np.ndarray, torch.Tensor)):
        raise AudioError("expected a sequence of audio items (paths or waveforms), got a single item")
    out = []
    for i, item in enumerate(items):
        label = f"#{i} ({_describe(item, None)})"
        out.append(load_audio(item, target_sr, name=label, sampling_rate=sampling_rate, min_samples=min_samples))
    return out
