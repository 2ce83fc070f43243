"""What happens to bad input: one policy for manifests, raw media and cached features.

Default (``on_error="error"``): the first bad item raises :class:`BadInputError`, whose message names
the item id, the field and the reason. Explicit ``on_error="skip"``: bad items are dropped, every drop
is logged (logger ``mmalign.data``) and counted per reason in a :class:`BadInputReport`, whose summary
is printed at the end of a run by :class:`BadInputCallback`. Nothing is ever dropped silently.

Reasons (the keys of the counts) are short fixed strings, e.g. ``"malformed json"``,
``"invalid utf-8"``, ``"duplicate id"``, ``"missing text"``, ``"empty text"``, ``"unknown language"``,
``"missing file"``, ``"bad image"``, ``"huge image"``, ``"bad audio"``, ``"short audio"``,
``"truncated audio"``, ``"silent audio"``, ``"bad sample rate"``, ``"non-finite features"``.

Counts are of *items*, not of passes: :class:`BadInputCallback` counts an item once per split however
many epochs (and the sanity check) see it again.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

log = logging.getLogger("mmalign.data")

ON_ERROR = ("error", "skip")
SILENT_AUDIO = ("error", "skip", "allow")

#: ISO 639-1 two-letter codes (CLDR's list, which keeps the deprecated ``sh``), plus ``und`` (undetermined).
ISO_639_1: frozenset[str] = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz
    ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik
    io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml
    mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd
    se sg sh si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve
    vi vo wa wo xh yi yo za zh zu""".split()
)
UNDETERMINED = "und"


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def is_known_language(code: Any) -> bool:
    """True for an ISO 639-1 code or ``und``, optionally with BCP-47 subtags (``pt-BR``, ``zh-Hant``)."""
    if not isinstance(code, str) or not code:
        return False
    primary = code.replace("_", "-").split("-")[0]
    return primary == UNDETERMINED or (primary == primary.lower() and primary in ISO_639_1)


class BadInputError(ValueError):
    """An input item is unusable; the message names the item id, the field and the reason.

    Attributes:
        item_id: The item's ``id`` (or a position when it has none).
        field: The sample field (``image``, ``audio``, ``text``, ``lang``, ``features/<tower>``...).
        reason: A short fixed reason, the key it is counted under with ``on_error="skip"``.
    """

    def __init__(self, item_id: Any, field: str, reason: str, detail: str = "") -> None:
        self.item_id, self.field, self.reason, self.detail = item_id, field, reason, detail
        msg = f"bad input: item id={item_id!r} field {field!r}: {reason}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


@dataclass
class BadInputReport:
    """Counts of dropped items per reason, with a few example ids per reason.

    It is filled where items are dropped (manifest reading, the collator in DataLoader workers) and
    merged in the main process: collators return their counts in ``batch["skipped"]``
    (``{reason: count}``), which :class:`BadInputCallback` adds up.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, item_id: Any = None, detail: str = "", field: str | None = None) -> None:
        self.counts[reason] += 1
        if item_id is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples:
                ex.append(str(item_id))
        where = f" field {field!r}" if field else ""
        log.warning("skipping item id=%r%s: %s%s", item_id, where, reason, f" ({detail})" if detail else "")

    def handle(self, error: BadInputError, on_error: str) -> None:
        """Raise ``error`` under ``on_error="error"``, else count it."""
        if on_error == "error":
            raise error
        self.add(error.reason, error.item_id, error.detail, error.field)

    def merge(self, other: "BadInputReport | Mapping[str, int] | None") -> "BadInputReport":
        if other is None:
            return self
        if isinstance(other, BadInputReport):
            self.counts.update(other.counts)
            for reason, ids in other.examples.items():
                ex = self.examples.setdefault(reason, [])
                ex.extend(ids[: max(0, self.max_examples - len(ex))])
        else:
            self.counts.update({k: int(v) for k, v in other.items()})
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self, title: str = "bad inputs skipped") -> str:
        if not self.counts:
            return f"{title}: none"
        lines = [f"{title}: {self.total}"]
        for reason, n in sorted(self.counts.items()):
            ex = self.examples.get(reason)
            lines.append(f"  {reason}: {n}" + (f" (e.g. {', '.join(ex)})" if ex else ""))
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return bool(self.counts)


def check_finite(
    tensor: Tensor,
    ids: Sequence[Any],
    field: str,
    on_error: str = "error",
    report: BadInputReport | None = None,
) -> Tensor:
    """Check that every row of ``tensor`` (``[B, ...]``, e.g. cached features) is finite.

    Args:
        tensor: ``[B, ...]``; row ``i`` belongs to ``ids[i]``.
        ids: Item ids, ``len(ids) == B``.
        field: Named in errors (e.g. ``"features/image/pooled"``).
        on_error: ``"error"`` raises :class:`BadInputError` for the first bad row; ``"skip"`` counts
            every bad row in ``report`` under ``"non-finite features"``.
        report: Where skips are counted (a throwaway one when ``None``).

    Returns:
        ``keep [B]`` bool, True on finite rows (all True, or it raised, under ``"error"``).
    """
    check_choice("on_error", on_error, ON_ERROR)
    if len(ids) != tensor.shape[0]:
        raise ValueError(f"{field}: {len(ids)} ids for {tensor.shape[0]} rows")
    if not tensor.is_floating_point():
        return torch.ones(tensor.shape[0], dtype=torch.bool, device=tensor.device)
    keep = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)  # [B]
    if bool(keep.all()):
        return keep
    report = report if report is not None else BadInputReport()
    for i in torch.nonzero(~keep).flatten().tolist():
        n_bad = int((~torch.isfinite(tensor[i])).sum())
        report.handle(BadInputError(ids[i], field, "non-finite features", f"{n_bad} NaN/Inf values"), on_error)
    return keep


try:  # Lightning is a core dependency; the guard keeps check_finite usable from torch-only code.
    from lightning.pytorch import Callback as _CallbackBase
except ImportError:  # pragma: no cover
    _CallbackBase = object  # type: ignore[misc, assignment]


class BadInputCallback(_CallbackBase):
    """Add up the items that collators skipped in DataLoader workers, log them (``bad_inputs/<reason>``,
    summed over the run) and print a summary when fitting/testing ends.

    Collators send ``batch["skipped_ids"]`` (``{reason: [item id]}``) besides the counts
    ``batch["skipped"]``: an item is counted once per split (train / val / test) however many epochs,
    and the sanity check, decode it again. A batch with counts but no ids (a custom collator) is added
    as it comes.

    Manifest-level skips (rows dropped while reading manifests) are taken from the datamodule's
    datasets' ``report`` when it has them, once per dataset.

    Attributes:
        report: Everything skipped so far in this run (batches and manifests).
    """

    def __init__(self) -> None:
        self.report = BadInputReport()
        self._manifests_seen: set[int] = set()
        self._items_seen: set[tuple[str, str, str]] = set()  # (split, reason, item id)

    def _take(self, trainer: Any, pl_module: Any, batch: Any, split: str = "train") -> None:
        if isinstance(batch, dict) and batch.get("skipped"):
            ids = batch.get("skipped_ids")
            if isinstance(ids, Mapping):
                for reason, items in ids.items():
                    for item_id in items:
                        key = (split, str(reason), str(item_id))
                        if key not in self._items_seen:  # the same bad item seen in a later epoch is not new
                            self._items_seen.add(key)
                            self.report.merge(BadInputReport(Counter({reason: 1}), {reason: [str(item_id)]}))
            else:
                self.report.merge(batch["skipped"])
        self._take_manifests(trainer)

    def _take_manifests(self, trainer: Any) -> None:
        dm = getattr(trainer, "datamodule", None)
        for ds in getattr(dm, "datasets", {}).values():
            rep = getattr(ds, "report", None)
            if isinstance(rep, BadInputReport) and id(ds) not in self._manifests_seen:
                self._manifests_seen.add(id(ds))
                self.report.merge(rep)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._take(trainer, pl_module, batch)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take(trainer, pl_module, batch, "val")

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take(trainer, pl_module, batch, "test")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        for reason, n in self.report.counts.items():
            pl_module.log(f"bad_inputs/{reason.replace(' ', '_')}", float(n), rank_zero_only=True)

    def _print(self) -> None:
        text = self.report.summary()
        log.warning(text) if self.report else log.info(text)
        print(text)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._print()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._print()
