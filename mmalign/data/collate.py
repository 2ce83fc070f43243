"""Collation of manifest rows into tower inputs, with the bad-input policy of :mod:`mmalign.data.policy`.

Each tower's encoder preprocesses the field it reads on the whole batch (in DataLoader workers). Speech
is decoded here first, one clip at a time (:func:`encoders.audio.load_audio`: stereo is down-mixed,
other rates resampled), so each clip is checked by id: undecodable or truncated, empty, NaN/Inf samples,
shorter than the encoder's ``min_audio_samples`` (or 10 ms), a sampling rate below ``min_sample_rate``,
and (``silent_audio``) silence. Image files above the pixel budget (``max_image_pixels``, see
:mod:`encoders.image_io`) are refused before decoding. When a tower's batch preprocessing still
fails, every item is preprocessed alone to find the bad ones: under ``on_error="error"`` the error names
the item id and field; under ``"skip"`` the bad items are dropped from *every* tower and from ``meta``,
the rest is collated again (a batch whose items were all bad comes out with no items and empty
``inputs``; the module should skip it), and the counts travel in ``batch["skipped"]`` (``{reason: count}``)
and the item ids in ``batch["skipped_ids"]`` (``{reason: [id]}``) to the main process, where
:class:`~mmalign.data.policy.BadInputCallback` counts each item once per split.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from dataclasses import field as dc_field
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


def reads_language(preprocess: Preprocess) -> bool:
    """Whether ``preprocess`` (an encoder's) takes ``languages=``, one row ``lang`` per item (``reads_language``)."""
    return bool(getattr(_encoder_of(preprocess), "reads_language", False))


def _accepts_sampling_rate(preprocess: Preprocess) -> bool:
    try:
        return "sampling_rate" in inspect.signature(preprocess).parameters
    except (TypeError, ValueError):
        return False


def _reason(field: str, preprocess: Preprocess, error: Exception) -> str:
    from encoders.image_io import ImageTooLargeError

    if isinstance(error, FileNotFoundError):
        return "missing file"
    if isinstance(error, ImageTooLargeError):
        return "huge image"
    if isinstance(getattr(error, "reason", None), str):  # AudioError says what is wrong
        return error.reason  # type: ignore[attr-defined]
    modality = str(getattr(_encoder_of(preprocess), "modality", ""))
    return {"image": "bad image", "speech": "bad audio", "text": "bad text"}.get(modality, f"bad {field}")


def _audio_reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing file"
    if isinstance(getattr(error, "reason", None), str):
        return error.reason  # type: ignore[attr-defined]
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
        max_image_pixels: Pixel budget of image files (``None``: :func:`encoders.image_io.max_image_pixels`,
            i.e. ``MMALIGN_MAX_IMAGE_PIXELS`` or 50 MP; ``0``: no limit). Larger files are ``huge image``.
    """

    def __init__(
        self,
        towers: dict[str, tuple[str, Preprocess]],
        on_error: str = "error",
        silent_audio: str = "error",
        min_sample_rate: int = 4000,
        max_image_pixels: int | None = None,
    ) -> None:
        self.towers = towers
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.silent_audio = check_choice("silent_audio", silent_audio, SILENT_AUDIO)
        self.min_sample_rate = min_sample_rate
        if max_image_pixels is not None and max_image_pixels < 0:
            raise ValueError(f"max_image_pixels must be >= 0 (0: no limit), got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels

    # -- speech: decode and check each clip by id ---------------------------------------------------
    def _load_clip(self, item: Any, item_id: str, field: str, target_sr: int, min_samples: int = 0) -> Any:
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
            wave = load_audio(item, target_sr, name=f"id={item_id!r} ({item})", min_samples=min_samples)
        except BadInputError:
            raise
        except Exception as e:  # noqa: BLE001 - every decoding failure is bad input of this item
            raise BadInputError(item_id, field, _audio_reason(e), str(e)) from e
        if self.silent_audio != "allow" and is_silent(wave):
            raise BadInputError(item_id, field, "silent audio", f"{item}: every sample is below the silence threshold")
        return wave

    def _decode_speech(self, rows: list[dict], report: BadInputReport) -> tuple[list[dict], dict[str, list]]:
        """Decode the speech fields of ``rows``; returns the good rows and ``{field: [waveform]}``."""
        from encoders.audio import min_samples_for

        fields = sorted({f for f, p in self.towers.values() if _is_speech(p) and _accepts_sampling_rate(p)})
        rates = {f: _encoder_of(p).sampling_rate for f, p in self.towers.values() if f in fields}
        # Several towers may read one field: a clip must be long enough for each of their encoders.
        need = {f: max(min_samples_for(_encoder_of(p), rates[f]) for g, p in self.towers.values() if g == f) for f in fields}
        waves: dict[str, list] = {f: [] for f in fields}
        if not fields:
            return rows, waves
        kept = []
        for row in rows:
            clips = {}
            try:
                for f in fields:  # a row without the field feeds no tower reading it (partial-modality batch)
                    clips[f] = None if row.get(f) is None else self._load_clip(row[f], row["id"], f, rates[f], need[f])
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
        for j, (item, item_id) in enumerate(zip(items, ids)):
            one = {k: [v[j]] if k == "languages" else v for k, v in kwargs.items()}
            try:
                preprocess([item], **one)
            except Exception as e:  # noqa: BLE001
                err = BadInputError(item_id, field, _reason(field, preprocess, e), f"tower {name!r}: {e}")
                err.__cause__ = e
                bad.append(err)
        return bad

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from encoders.image_io import pixel_limit

        report = _Dropped()
        with pixel_limit(self.max_image_pixels):  # in the worker: the budget travels with the collator
            batch = self._collate(rows, report)
        if report:
            batch["skipped"] = report.as_dict()
            batch["skipped_ids"] = report.ids()
        return batch

    def collate(self, rows: list[dict[str, Any]], report: BadInputReport) -> dict[str, Any]:
        """Like calling the collator, but bad items go through ``report.handle`` (a caller's own policy).

        The feature cache writer uses it with a report that records instead of raising, so that the
        main process (not a DataLoader worker) raises or skips with the row id, field and path.
        """
        from encoders.image_io import pixel_limit

        with pixel_limit(self.max_image_pixels):
            return self._collate(rows, report)

    def _collate(self, rows: list[dict[str, Any]], report: BadInputReport) -> dict[str, Any]:
        rows, waves = self._decode_speech(list(rows), report)
        while True:
            if not rows:  # every item was bad (only possible under "skip"): an empty batch, counts kept
                inputs = {}
                break
            ids = [r["id"] for r in rows]
            inputs, bad, present = {}, [], {}
            for name, (field, preprocess) in self.towers.items():
                if field in waves:
                    values, kwargs = waves[field], {"sampling_rate": _encoder_of(preprocess).sampling_rate}
                else:
                    values, kwargs = [r.get(field) for r in rows], {}
                # Rows without the field are absent for this tower, not bad input: it preprocesses the others.
                has = [v is not None for v in values]
                items = [v for v in values if v is not None]
                item_ids = [i for i, h in zip(ids, has) if h]
                if reads_language(preprocess):  # the encoder conditions on each row's own language
                    kwargs = {**kwargs, "languages": [str(r.get("lang") or "und") for r, h in zip(rows, has) if h]}
                if not all(has):
                    present[name] = has
                if not items:
                    continue
                try:
                    inputs[name] = preprocess(items, **kwargs)
                except Exception as e:  # noqa: BLE001 - find the culprits, name them
                    bad = self._find_bad(name, field, preprocess, items, item_ids, kwargs)
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
        keys = {f: [None if r.get(f) is None else str(r[f]) for r in rows] for f in fields}
        batch = {"meta": meta, "keys": keys, "inputs": inputs}
        if rows and present:  # partial-modality batch: [B] bool per tower (towers not named: every row)
            import torch

            batch["present"] = {name: torch.tensor(has, dtype=torch.bool) for name, has in present.items()}
        return batch


@dataclass
class _Dropped(BadInputReport):
    """A report that also keeps every dropped item's id (sent to the main process for de-duplication)."""

    dropped: dict[str, list[str]] = dc_field(default_factory=dict)

    def add(self, reason: str, item_id: Any = None, detail: str = "", field: str | None = None) -> None:
        super().add(reason, item_id, detail, field)
        self.dropped.setdefault(reason, []).append(str(item_id))

    def ids(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in sorted(self.dropped.items())}


def tower_fields(module: Any) -> dict[str, tuple[str, Callable]]:
    return {name: (t.field, t.encoder.preprocess) for name, t in module.towers.items()}


def usable_rows(
    rows: Sequence[dict[str, Any]], fields: Sequence[str], field_sets: Sequence[Sequence[str]], path: Any,
    report: BadInputReport, on_error: str, check_files: bool = True,
) -> list[dict[str, Any]]:
    """Rows a partial-modality recipe can use: the fields a row has are checked, a field it lacks is absent.

    A row is kept when it holds both fields of at least one objective: ``field_sets``.
    Missing fields no such pair needs are not bad input (an image-text row in an image-text + speech-text
    recipe). A row no pair can use is ``missing <field>`` (the first absent field of the first pair); a
    present field that is unusable (blank text, missing file) is bad input as before.

    Args:
        rows: Manifest rows (already filtered by language).
        fields: Every field the towers read.
        field_sets: Field sets of the objectives.
        path: The manifest (named in errors).
        report: Where skipped rows are counted.
        on_error: ``"error"`` raises the first bad row; ``"skip"`` drops it.
        check_files: Check that media files exist.
    """
    from mmalign.data.manifest import ManifestRowError, check_row

    kept = []
    for row in rows:
        has = [f for f in fields if row.get(f) is not None]
        try:
            check_row(row, has, Path(str(path)), check_files)
            if not any(all(f in has for f in fs) for fs in field_sets):
                first = next(f for f in field_sets[0] if f not in has)
                raise ManifestRowError(Path(str(path)), None, row["id"], first, f"missing {first}",
                                       f"no objective or evaluated pair can use a row with only {has}")
        except ManifestRowError as e:
            report.handle(e, on_error)
            continue
        kept.append(row)
    return kept
