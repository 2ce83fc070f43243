"""Waveform augmentations for speech students, applied BEFORE the frozen encoder (issue 17.3).

A frozen encoder's features of an augmented clip are not a cheap function of the clean clip's features, so
augmentations are materialised: each augmented clip is written as its own file whose name carries
:attr:`SpeechAugment.name`, and the feature cache (which keys an item by its path and file stat/content) then
holds it as a distinct feature row. ``mmalign.datasets.espeak.build_robust_speech`` does that for espeak-ng
clips; the operations here are plain functions of ``(waveform, sampling rate, augmentation, seed)``:

* speed perturbation (Ko et al., 2015): resampling by ``speed`` (tempo and pitch together),
  ``torchaudio.functional.resample``;
* pitch shift by ``pitch`` semitones at constant tempo, ``torchaudio.functional.pitch_shift``;
* reverberation: convolution with a synthetic room impulse response (exponentially decaying noise whose
  decay gives ``reverb_rt60`` seconds to -60 dB, plus the direct path), ``torchaudio.functional.fftconvolve``;
* additive noise of a synthetic colour (``white``, ``pink`` 1/f, ``brown`` 1/f^2, or ``hum``: mains hum and
  harmonics) at ``snr_db``, ``torchaudio.functional.add_noise``;
* gain in dB.

Everything random (noise, impulse response) is drawn from a generator seeded by ``seed``: the same
``(clip, augmentation, seed)`` gives the same samples, bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

NOISES = ("white", "pink", "brown", "hum")


@dataclass(frozen=True)
class SpeechAugment:
    """One augmentation of a clip (the identity when every field is at its default).

    Attributes:
        speed: Speed factor (> 1 is faster and higher); 1 leaves the clip alone.
        pitch: Pitch shift in semitones at constant tempo.
        reverb_rt60: Reverberation time of the synthetic room in seconds (``None``: dry).
        noise: Colour of the additive noise (one of :data:`NOISES`) or ``None``.
        snr_db: Signal-to-noise ratio of that noise in dB.
        gain_db: Output gain in dB (the result is then limited to [-1, 1]).
    """

    speed: float = 1.0
    pitch: float = 0.0
    reverb_rt60: float | None = None
    noise: str | None = None
    snr_db: float = 20.0
    gain_db: float = 0.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.speed <= 2.0:
            raise ValueError(f"speed must be in [0.5, 2], got {self.speed}")
        if abs(self.pitch) > 12:
            raise ValueError(f"pitch must be within +-12 semitones, got {self.pitch}")
        if self.reverb_rt60 is not None and not 0.05 <= self.reverb_rt60 <= 3.0:
            raise ValueError(f"reverb_rt60 must be in [0.05, 3] s, got {self.reverb_rt60}")
        if self.noise is not None and self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES} or None, got {self.noise!r}")

    @property
    def name(self) -> str:
        """A short, filename-safe name that differs for every distinct augmentation (``"clean"`` for none)."""
        parts = []
        if self.speed != 1.0:
            parts.append(f"sp{self.speed:g}")
        if self.pitch != 0.0:
            parts.append(f"ps{self.pitch:+g}")
        if self.reverb_rt60 is not None:
            parts.append(f"rv{self.reverb_rt60:g}")
        if self.noise is not None:
            parts.append(f"{self.noise}{self.snr_db:g}dB")
        if self.gain_db != 0.0:
            parts.append(f"g{self.gain_db:+g}")
        return "_".join(parts) or "clean"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeechAugment":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown augmentation fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from strings/numbers (stable across processes, unlike ``hash``)."""
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def colored_noise(n: int, color: str, sampling_rate: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` unit-RMS synthetic noise: white, pink (1/f power), brown (1/f^2) or mains hum with harmonics."""
    if color == "hum":
        t = torch.arange(n, dtype=torch.float64) / sampling_rate
        f0 = 50.0 if torch.rand((), generator=generator) < 0.5 else 60.0
        phases = torch.rand(4, generator=generator, dtype=torch.float64) * 2 * math.pi
        x = sum(torch.sin(2 * math.pi * f0 * (k + 1) * t + phases[k]) / (k + 1) for k in range(4))
        x = x + 0.05 * torch.randn(n, generator=generator, dtype=torch.float64)
    else:
        white = torch.randn(n, generator=generator, dtype=torch.float64)
        if color == "white":
            x = white
        else:
            spectrum = torch.fft.rfft(white)
            f = torch.fft.rfftfreq(n, d=1.0 / sampling_rate).clamp(min=20.0)  # no DC blow-up
            exponent = {"pink": 0.5, "brown": 1.0}[color]
            x = torch.fft.irfft(spectrum / f**exponent, n=n)
    x = x - x.mean()
    return (x / x.pow(2).mean().sqrt().clamp(min=1e-12)).float()


def room_impulse_response(rt60: float, sampling_rate: int, generator: torch.Generator) -> torch.Tensor:
    """A synthetic RIR: direct path, then exponentially decaying noise (-60 dB after ``rt60`` s), unit energy."""
    n = max(int(rt60 * sampling_rate), 16)
    t = torch.arange(n, dtype=torch.float64) / sampling_rate
    decay = torch.exp(-6.9078 * t / rt60)  # ln(1000): amplitude -60 dB at rt60
    tail = torch.randn(n, generator=generator, dtype=torch.float64) * decay
    delay = int(0.003 * sampling_rate)  # first reflections a few ms after the direct sound
    tail[:delay] = 0.0
    tail[0] = 1.0
    return (tail / tail.norm()).float()


def _percent(ratio: float) -> int:
    return max(int(round(ratio * 100)), 1)


def _resample_ratio(x: torch.Tensor, percent: int) -> torch.Tensor:
    """Resample by ``percent / 100`` (length divided by it), with the fraction reduced first."""
    import torchaudio.functional as F

    g = math.gcd(percent, 100)
    return F.resample(x, percent // g, 100 // g) if percent != 100 else x


def _pitch_shift(x: torch.Tensor, semitones: float, n_fft: int = 512, hop: int = 128) -> torch.Tensor:
    """Pitch shift at constant tempo: phase-vocoder stretch by r = 2^(semitones/12), then resample by r.

    ``torchaudio.functional.pitch_shift`` does the same but resamples at the full rate ratio, whose polyphase
    kernel is enormous for fractional semitones; here r is taken to 1/100 (a 0.6 % pitch error at most).
    """
    import torchaudio.functional as F

    percent = _percent(2 ** (semitones / 12))
    window = torch.hann_window(n_fft)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)  # [F, T]
    advance = torch.linspace(0, math.pi * hop, spec.shape[0])[:, None]
    stretched = F.phase_vocoder(spec, rate=100 / percent, phase_advance=advance)
    y = torch.istft(stretched, n_fft, hop, window=window, length=int(round(x.numel() * percent / 100)))
    y = _resample_ratio(y, percent)
    if y.numel() >= x.numel():
        return y[: x.numel()]
    return torch.nn.functional.pad(y, (0, x.numel() - y.numel()))


def apply_augment(wave: np.ndarray | torch.Tensor, sampling_rate: int, aug: SpeechAugment, seed: int = 0) -> np.ndarray:
    """Return ``wave`` (1-D float) augmented by ``aug``; deterministic in ``(wave, aug, seed)``.

    The output keeps ``sampling_rate`` (speed perturbation changes the length, not the rate).
    """
    import torchaudio.functional as F

    x = torch.as_tensor(np.asarray(wave, dtype=np.float32)).flatten()
    if x.numel() == 0:
        raise ValueError("cannot augment an empty waveform")
    g = torch.Generator().manual_seed(seed_for(seed, aug.name))
    if aug.speed != 1.0:
        # Playing the clip `speed` times faster = reading its samples as if recorded at sr * speed. The ratio is
        # taken to 1/100 so the polyphase kernel stays small (coprime rates like 22050 -> 21202 take minutes).
        x = _resample_ratio(x, _percent(aug.speed))
    if aug.pitch != 0.0:
        x = _pitch_shift(x, aug.pitch)
    if aug.reverb_rt60 is not None:
        rir = room_impulse_response(aug.reverb_rt60, sampling_rate, g)
        wet = F.fftconvolve(x, rir)[: x.numel() + rir.numel() // 2]  # keep part of the tail
        x = wet * (x.abs().max() / wet.abs().max().clamp(min=1e-9))
    if aug.noise is not None:
        noise = colored_noise(x.numel(), aug.noise, sampling_rate, g)
        x = F.add_noise(x[None], noise[None], torch.tensor([float(aug.snr_db)]))[0]
    if aug.gain_db != 0.0:
        x = x * 10 ** (aug.gain_db / 20)
    peak = float(x.abs().max())
    if peak > 1.0:
        x = x / peak
    return x.numpy().astype(np.float32)


#: Ranges the random policy draws from (rounded, so names stay short and rows dedupe).
POLICY = {"speed": (0.85, 1.15), "pitch": (-3.0, 3.0), "rt60": (0.2, 0.9), "snr_db": (5.0, 25.0)}


def sample_augment(rng: np.random.Generator, p_pitch: float = 0.4, p_reverb: float = 0.5,
                   p_noise: float = 0.7) -> SpeechAugment:
    """A random augmentation of the training policy (speed always perturbed; pitch, reverb, noise sometimes)."""
    lo, hi = POLICY["speed"]
    speed = round(float(rng.uniform(lo, hi)), 2)
    pitch = round(float(rng.uniform(*POLICY["pitch"])), 1) if rng.random() < p_pitch else 0.0
    rt60 = round(float(rng.uniform(*POLICY["rt60"])), 1) if rng.random() < p_reverb else None
    noise = str(rng.choice(NOISES)) if rng.random() < p_noise else None
    snr = round(float(rng.uniform(*POLICY["snr_db"]))) if noise else 20.0
    return SpeechAugment(speed=speed if speed != 1.0 else 1.01, pitch=pitch, reverb_rt60=rt60, noise=noise,
                         snr_db=float(snr))


__all__ = ["NOISES", "POLICY", "SpeechAugment", "apply_augment", "colored_noise", "room_impulse_response",
           "sample_augment", "seed_for"]
