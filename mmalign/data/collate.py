"""Collation of manifest rows into tower inputs, with the bad-input policy of :mod:`mmalign.data.policy`.

Each tower's encoder preprocesses the field it reads on the whole batch (in DataLoader workers). Speech
is decoded here first, one clip at a time (:func:`encoders.audio.load_audio`: stereo is down-mixed,
other rates resampled), so each clip is checked by id: undecodable, empty, NaN/Inf samples, a sampling
rate below ``min_sample_rate``, and (``silent_audio``) silence. When a tower's batch preprocessing still
fails, every item is preprocessed alone to find the bad ones: under ``on_error="error"`` the error names
the item id and field; under ``"skip"`` the bad items are dropped from *every* tower and from ``meta``,
the rest is collated again (a batch whose items were all bad comes out with no items and empty
``inputs``; the module should skip it), and the counts travel in ``batch["skipped"]`` (``{reason: count}``) to the
main process, where :class:`~mmalign.data.policy.BadInputCallback` adds them up.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from mmalign.data.manifest import META_FIELDS
from mmalign.data.policy import ON_ERROR, SILENT_AUDIO, BadInputError, BadInputReport, check_choice

Preprocess = Callable[[Sequence[Any]], dict]


def _encoder_of(preprocess: Preprocess) -> Any:
    return getattr(preprocess, "__self__", None)


def _is_speech(preprocess: Preprocess) -> bool:
    enc = _encoder_of(preprocess)
    return str(getattr(enc, "modality", "")) == "speech" and isinstance(getattr(enc, "sampling_rate", None), int)


def _accepts_sampling_rate(preprocess: Preprocess) -> bool:
    try:
        return "sampling_rate" in inspect.signature(preprocess).parameters
    except (TypeError, ValueError):
        return False


def _reason(field: str, preprocess: Preprocess, error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing file"
    modality = str(getattr(_encoder_of(preprocess), "modality", ""))
    return {"image": "bad image", "speech": "bad audio", "text": "bad text"}.get(modality, f"bad {field}")


def _audio_reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing file"
    msg = str(error)
    if "is empty" in msg:
        return "empty audio"
    if "NaN/Inf" in msg:
        return "non-finite audio"
    if "sampling rate" in msg or "sampling_rate" in msg:
        return "bad sample rate"
    return "bad audio"


class TowerCollator:
    """Collate manifest rows into ``{"meta", "keys", "inputs"}`` (+ ``"skipped"`` when items were dropped).

    Args:
        towers: ``{tower_name: (field, preprocess)}``; ``preprocess`` is usually an encoder's bound
            ``preprocess`` method (the encoder's ``modality`` then selects the speech checks).
        on_error: ``"error"`` (default) or ``"skip"`` (drop, count, log).
        silent_audio: ``"error"``, ``"skip"`` or ``"allow"`` clips whose peak is below
            :data:`encoders.audio.SILENCE_PEAK`. ``"error"``/``"skip"`` follow their meaning above
            whatever ``on_error`` is.
        min_sample_rate: Audio files recorded below this rate (Hz) are bad input (a wrong header or
            telephone-band audio far from what speech encoders expect), not resampled.
    """

    def __init__(
        self,
        towers: dict[str, tuple[str, Preprocess]],
        on_error: str = "error",
        silent_audio: str = "error",
        min_sample_rate: int = 4000,
    ) -> None:
        self.towers = towers
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.silent_audio = check_choice("silent_audio", silent_audio, SILENT_AUDIO)
        self.min_sample_rate = min_sample_rate

    # -- speech: decode and check each clip by id ---------------------------------------------------
    def _load_clip(self, item: Any, item_id: str, field: str, target_sr: int) -> Any:
        from encoders.audio import is_silent, load_audio

        try:
            if isinstance(item, (str, os.PathLike)) and Path(item).is_file():
                import soundfile as sf

                try:
                    sr = sf.info(str(item)).samplerate
                except Exception:  # noqa: BLE001 - not a soundfile format: load_audio tries librosa
                    sr = None
                if sr is not None and sr < self.min_sample_rate:
                    raise BadInputError(item_id, field, "bad sample rate",
                                        f"{item} is sampled at {sr} Hz, below min_sample_rate={self.min_sample_rate}")
            wave = load_audio(item, target_sr, name=f"id={item_id!r} ({item})")
        except BadInputError:
            raise
        except Exception as e:  # noqa: BLE001 - every decoding failure is bad input of this item
            raise BadInputError(item_id, field, _audio_reason(e), str(e)) from e
        if self.silent_audio != "allow" and is_silent(wave):
            raise BadInputError(item_id, field, "silent audio", "every sample is below the silence threshold")
        return wave

    def _decode_speech(self, rows: list[dict], report: BadInputReport) -> tuple[list[dict], dict[str, list]]:
        """Decode the speech fields of ``rows``; returns the good rows and ``{field: [waveform]}``."""
        fields = sorted({f for f, p in self.towers.values() if _is_speech(p) and _accepts_sampling_rate(p)})
        rates = {f: _encoder_of(p).sampling_rate for f, p in self.towers.values() if f in fields}
        waves: dict[str, list] = {f: [] for f in fields}
        if not fields:
            return rows, waves
        kept = []
        for row in rows:
            clips = {}
            try:
                for f in fields:
                    clips[f] = self._load_clip(row.get(f), row["id"], f, rates[f])
            except BadInputError as e:
                policy = self.silent_audio if e.reason == "silent audio" else self.on_error
                report.handle(e, policy)
                continue
            kept.append(row)
            for f in fields:
                waves[f].append(clips[f])
        return kept, waves

    # -- the batch -------------------------------------------------------------------------------
    def _find_bad(self, name: str, field: str, preprocess: Preprocess, items: list, ids: list, kwargs: dict) -> list[BadInputError]:
        bad = []
        for item, item_id in zip(items, ids):
            try:
                preprocess([item], **kwargs)
            except Exception as e:  # noqa: BLE001
                err = BadInputError(item_id, field, _reason(field, preprocess, e), f"tower {name!r}: {e}")
                err.__cause__ = e
                bad.append(err)
        return bad

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        report = BadInputReport()
        rows, waves = self._decode_speech(list(rows), report)
        while True:
            if not rows:  # every item was bad (only possible under "skip"): an empty batch, counts kept
                inputs = {}
                break
            ids = [r["id"] for r in rows]
            inputs, bad = {}, []
            for name, (field, preprocess) in self.towers.items():
                if field in waves:
                    items, kwargs = waves[field], {"sampling_rate": _encoder_of(preprocess).sampling_rate}
                else:
                    items, kwargs = [r.get(field) for r in rows], {}
                try:
                    inputs[name] = preprocess(items, **kwargs)
                except Exception as e:  # noqa: BLE001 - find the culprits, name them
                    bad = self._find_bad(name, field, preprocess, items, ids, kwargs)
                    if not bad:  # no single item fails: a batch-level problem, not bad input
                        raise type(e)(f"tower {name!r} could not preprocess field {field!r} of items {ids}: {e}") from e
                    break
            if not bad:
                break
            for err in bad:
                report.handle(err, self.on_error)
            drop = {err.item_id for err in bad}
            keep = [i for i, r in enumerate(rows) if r["id"] not in drop]
            rows = [rows[i] for i in keep]
            waves = {f: [w[i] for i in keep] for f, w in waves.items()}
        meta = {k: [r[k] for r in rows] for k in META_FIELDS}
        fields = sorted({field for field, _ in self.towers.values()})
        keys = {f: [str(r[f]) for r in rows] for f in fields}
        batch: dict[str, Any] = {"meta": meta, "keys": keys, "inputs": inputs}
        if report:
            batch["skipped"] = report.as_dict()
        return batch


def tower_fields(module: Any) -> dict[str, tuple[str, Callable]]:
    return {name: (t.field, t.encoder.preprocess) for name, t in module.towers.items()}
