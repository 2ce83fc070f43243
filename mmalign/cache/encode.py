"""Encode one shard of a cache entry, with the recipe's bad-input policy applied item by item.

Items are decoded in DataLoader workers by the same :class:`~mmalign.data.collate.TowerCollator` that
``mmalign fit`` uses on raw data, so a corrupt, truncated, huge, too short or silent medium is judged
exactly as in training. The workers only *record* what is bad; the main process applies the policy:
under ``on_error="error"`` it raises :class:`~mmalign.data.policy.BadInputError` naming the row id,
the field and the path (a real ``BadInputError``, not a worker's re-raised ``RuntimeError``); under
``"skip"`` the item is stored as zeros, logged, and listed in the shard's marker so that every row
using it is left out of the cache (see :func:`mmalign.cache.writer.merge_split`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmalign.cache.format import CacheError
from mmalign.data.collate import TowerCollator
from mmalign.data.manifest import PATH_FIELDS
from mmalign.data.policy import BadInputError, BadInputReport, check_finite

if TYPE_CHECKING:
    from mmalign.cache.writer import EntryPlan

log = logging.getLogger("mmalign.cache")
#: ``(position in batch, item id, field, reason, detail, policy)`` of one bad item, as a worker sends it.
Bad = tuple[int, str, str, str, str, str]


@dataclass
class _Record(BadInputReport):
    """Records each bad item with the policy that applies to it; never raises and never logs (workers)."""

    found: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def handle(self, error: BadInputError, on_error: str) -> None:
        self.found.append((str(error.item_id), error.field, error.reason, error.detail, on_error))


class ItemCollate:
    """Picklable collate over ``(item id, value)`` pairs -> ``(inputs | None, kept positions, bad)``.

    Args:
        plan: The entry (its encoder, field and first tower name are used).
        on_error: ``"error"`` or ``"skip"``, as the recipe's ``data.init_args.on_error``.
        silent_audio: ``"error"``, ``"skip"`` or ``"allow"``, as the recipe's.
        max_image_pixels: Pixel budget of image files (``None``: the default one).
    """

    def __init__(self, plan: "EntryPlan", on_error: str, silent_audio: str, max_image_pixels: int | None) -> None:
        self.field = plan.field
        self.preprocess = plan.encoder.preprocess
        self.collator = TowerCollator({plan.towers[0]: (plan.field, self.preprocess)}, on_error, silent_audio,
                                      max_image_pixels=max_image_pixels)
        #: Items the collator would hand to ``preprocess`` unchanged (text: no file, no decoding, no pixel budget).
        self.direct = (plan.field not in PATH_FIELDS and str(getattr(plan.encoder, "modality", "")) == "text"
                       and plan.by is None)

    def direct_batch(self, labels: Sequence[str], values: list[Any]) -> tuple[dict[str, torch.Tensor] | None, list[int], list[Bad]]:
        """What ``self(list(zip(labels, values)))`` returns for direct items, with nothing built per item: one
        ``preprocess`` call on the batch; a batch it fails on (or holding a None) goes through the collator, which
        finds and names the bad items exactly as for ``mmalign fit``."""
        if None not in values:
            try:
                return self.preprocess(values), range(len(values)), []  # type: ignore[return-value]
            except Exception:  # noqa: BLE001 - the collator retries the batch and judges item by item
                pass
        return self(list(zip(labels, values)))

    def __call__(self, pairs: list[tuple[str, Any]] | list[tuple[str, Any, str | None]]
                 ) -> tuple[dict[str, torch.Tensor] | None, list[int], list[Bad]]:
        """``pairs``: ``(item id, value)`` or, for an entry whose items carry a language, ``(item id, value, lang)``."""
        rows = [{"id": p[0], "concept": p[0], "lang": (p[2] if len(p) > 2 else None) or "und", self.field: p[1]}
                for p in pairs]
        record = _Record()
        batch = self.collator.collate(rows, record)
        position = {p[0]: i for i, p in enumerate(pairs)}
        kept = [position[i] for i in batch["meta"]["id"]]
        bad = [(position[item_id], item_id, fld, reason, detail, policy) for item_id, fld, reason, detail, policy in record.found]
        inputs = next(iter(batch["inputs"].values())) if batch["inputs"] else None
        return inputs, kept, bad


def _finite_rows(values: torch.Tensor, ids: Sequence[str], field: str, on_error: str, bad: dict[int, list[str]],
                 positions: Sequence[int]) -> torch.Tensor:
    """``keep [k]`` of :func:`check_finite`; bad rows are recorded in ``bad`` as ``{shard item: [field, detail, reason]}``."""
    keep = check_finite(values, ids, field, on_error, BadInputReport())  # raises under "error"
    for j in torch.nonzero(~keep).flatten().tolist():
        n_bad = int((~torch.isfinite(values[j])).sum())
        bad.setdefault(positions[j], [field, f"{n_bad} NaN/Inf values", "non-finite features"])
    return keep


def encode_shard(
    plan: "EntryPlan", k: int, *, batch_size: int, num_workers: int, device: torch.device, dtype: str,
    on_error: str, bar: tqdm | None, silent_audio: str = "error", max_image_pixels: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, list[str]]]:
    """Encode shard ``k`` of ``plan``.

    Returns:
        ``(arrays, bad)``: ``{"pooled" [n, D], "tokens" [n, T, D_tok], "mask" [n, T]}`` and, under
        ``on_error="skip"``, ``{shard item: [field, detail, reason]}`` of the items that are bad input
        (undecodable media...) or whose features are not finite: stored as zeros (mask False), their
        rows are left out when the cache is read.

    Raises:
        BadInputError: Under ``on_error="error"``: the first bad item, naming its (first) row id, the
            field and, for media, the path.
    """
    start, count = plan.shards[k]
    labels = plan.item_ids[start:start + count]  # this shard's items only: read from the row table now
    values = plan.items[start:start + count]
    collate = ItemCollate(plan, on_error, silent_audio, max_image_pixels)
    if collate.direct and num_workers == 0:  # text in this process: batches sliced, no row dict or DataLoader per item
        loader: Any = (collate.direct_batch(labels[a:a + batch_size], values[a:a + batch_size])
                       for a in range(0, count, batch_size))
    else:
        items = list(zip(labels, values)) if plan.by is None else list(zip(labels, values, plan.item_langs[start:start + count]))
        loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate)
    np_dtype = np.dtype(dtype)
    dim = int(plan.encoder.output_dim)
    tok_dim = getattr(plan.encoder, "token_dim", None) or dim  # only used if no item of the shard is good
    pooled: list[np.ndarray] = []
    tokens: list[np.ndarray | None] = []  # None: a batch whose items were all bad (sizes unknown until the end)
    masks: list[np.ndarray | None] = []
    bad: dict[int, list[str]] = {}
    i0 = 0
    for inputs, kept, dropped in loader:
        b = len(kept) + len(dropped)
        for pos, item_id, fld, reason, detail, policy in sorted(dropped):
            if policy == "error":
                raise BadInputError(item_id, fld, reason, detail)
            log.warning("skipping item id=%r field %r: %s (%s)", item_id, fld, reason, detail)  # rows counted at the merge
            bad[i0 + pos] = [fld, detail, reason]
        pool = torch.zeros(b, dim)  # [b, D]; bad items stay zeros (never read) so every shard stays finite
        tok, mask = None, None
        if kept:
            inputs = {k_: v.to(device) if isinstance(v, torch.Tensor) else v for k_, v in inputs.items()}
            out = plan.encoder(inputs)
            p_kept = out.pooled.float().cpu()  # [k, D]
            dim = int(p_kept.shape[1])
            pool = torch.zeros(b, dim)
            if isinstance(kept, range):  # every item of the batch (the direct path): slices, not lists
                ids_kept, at, kept = labels[i0:i0 + b], range(i0, i0 + b), slice(0, b)
            else:
                ids_kept, at = [labels[i0 + j] for j in kept], [i0 + j for j in kept]
            keep = _finite_rows(p_kept, ids_kept, f"features/{plan.field}/pooled", on_error, bad, at)
            if plan.tokens:
                if out.tokens is None:
                    raise CacheError(f"{plan.name}: the encoder returned no tokens but a projector needs them")
                m_kept = out.mask.cpu().bool() if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
                t_kept = out.tokens.float().cpu().masked_fill(~m_kept.unsqueeze(-1), 0.0)  # padding is not content
                keep &= _finite_rows(t_kept, ids_kept, f"features/{plan.field}/tokens", on_error, bad, at)
                t_kept[~keep] = 0.0
                tok_dim = int(t_kept.shape[2])
                tok = torch.zeros(b, t_kept.shape[1], tok_dim)
                mask = torch.zeros(b, t_kept.shape[1], dtype=torch.bool)
                tok[kept], mask[kept] = t_kept, m_kept & keep.unsqueeze(1)
            p_kept[~keep] = 0.0
            pool[kept] = p_kept
        pooled.append(pool.numpy().astype(np_dtype))
        tokens.append(None if tok is None else tok.numpy().astype(np_dtype))
        masks.append(None if mask is None else mask.numpy())
        i0 += b
        if bar is not None:
            bar.update(b)
    arrays = {"pooled": np.concatenate(pooled)}
    if plan.tokens:
        # Pad to this shard's longest sequence; the mask keeps padding apart from real tokens.
        t_max = max([t.shape[1] for t in tokens if t is not None], default=1)
        padded = np.zeros((count, t_max, tok_dim), dtype=np_dtype)
        mask = np.zeros((count, t_max), dtype=bool)
        i = 0
        for t, m, p in zip(tokens, masks, pooled):
            if t is not None:
                padded[i:i + len(t), : t.shape[1]] = t
                mask[i:i + len(m), : m.shape[1]] = m
            i += len(p)
        arrays["tokens"], arrays["mask"] = padded, mask
    for key, arr in arrays.items():
        if arr.dtype == bool:
            continue
        finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if not finite.all():  # finite in float32 (checked above), so the cast overflowed
            j = int(np.nonzero(~finite)[0][0])
            raise CacheError(
                f"{plan.name} shard {k}: item id={labels[j]!r} field {plan.field!r}: {key} features exceed the range "
                f"of {dtype} (|x| > {np.finfo(np_dtype).max:g}); cache with --dtype float32"
            )
    return arrays, bad
