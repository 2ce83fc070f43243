"""Write the feature cache of one split: encode every unique item once, in shards, resumably.

Several processes may write the same split at once (``rank``/``world_size``): shard ``k`` of every
entry belongs to rank ``k % world_size``. Each shard's arrays are written through temporary files and
``os.replace``, then its marker; a shard without a valid marker is (re)encoded, a marked one is kept.
Whichever process finds every marker present writes ``manifest.json`` (the merge), so the last rank to
finish completes the cache without a barrier; :func:`merge_split` can also be run on its own to verify.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from encoders.base import Encoder
from mmalign.cache.claim import SplitClaim
from mmalign.cache.encode import encode_shard
from mmalign.cache.rowtable import RowTable, id_buffers, item_by, items_digests
from mmalign.cache.format import (
    DTYPES, FORMAT_VERSION, MANIFEST, NON_FINITE, ROW_IDS_DATA, ROW_IDS_OFFSETS, CacheError, atomic_save_npy,
    atomic_write_json, digest, entry_name, read_json, remove_dead_tmp_tree, shard_name,
)
from mmalign.data.policy import ON_ERROR, SILENT_AUDIO, BadInputError, BadInputReport, check_choice


class _Lazy(Sequence):
    """``plan.items`` / ``plan.item_ids``: values of column ``name`` at the items' first rows, read on access."""

    def __init__(self, table: RowTable, name: str, rows: np.ndarray) -> None:
        self.table, self.name, self.rows = table, name, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.table.take(self.name, self.rows[index])
        return self.table.take(self.name, [self.rows[index]])[0]


@dataclass
class EntryPlan:
    """What one entry (one encoder over one field) of a split holds.

    Nothing per row or item is held as a Python object: the rows are a :class:`RowTable` (Arrow columns),
    items are numbered by their first row, and their values are read shard by shard.

    Attributes:
        name: Directory name ``<field>--<cache_key>``.
        field: The manifest field encoded.
        encoder: The frozen encoder.
        tokens: Whether token sequences + masks are stored (a projector of some tower uses them).
        towers: Names of the recipe's towers this entry feeds.
        table: The split's rows.
        item_rows: ``[M]`` first row of each unique field value, in first-appearance order.
        row_index: ``[N]`` row -> item.
        digests: ``[M]`` uint64 item digests (see :func:`~mmalign.cache.format.item_digests`).
        shards: ``(start, count)`` item ranges.
        by: ``"lang"`` when the encoder reads each row's language (``reads_language``): an item is a
            (value, language) pair, and its rows' ``lang`` is handed to ``preprocess``; else ``None``.
    """

    name: str
    field: str
    encoder: Encoder
    tokens: bool
    towers: list[str]
    table: RowTable
    item_rows: np.ndarray
    row_index: np.ndarray
    digests: np.ndarray
    shards: list[tuple[int, int]]
    by: str | None = None

    @property
    def items(self) -> Sequence[Any]:
        """Unique field values (read on access)."""
        return _Lazy(self.table, self.field, self.item_rows)

    @property
    def item_ids(self) -> Sequence[str]:
        """``[M]`` id of the first row using each item (named in errors), read on access."""
        return _Lazy(self.table, "id", self.item_rows)

    @property
    def item_langs(self) -> Sequence[str | None]:
        """``[M]`` language of each item's first row (what a language-reading encoder is told), read on access."""
        return _Lazy(self.table, "lang", self.item_rows)

    def shard_fingerprint(self, k: int, dtype: str) -> str:
        start, count = self.shards[k]
        return digest(self.encoder.cache_key, self.tokens, dtype, start, count, self.digests[start:start + count])


def plan_entries(
    rows: Any, towers: dict[str, Any], shard_size: int, fingerprint: str
) -> list[EntryPlan]:
    """Group the towers by (field, encoder cache_key); one entry each.

    Args:
        rows: Manifest rows of the split, in dataset order (row dicts, a source's rows, or a :class:`RowTable`).
        towers: ``{name: Tower}`` of the recipe (projectors built: ``uses_tokens`` decides token storage).
        shard_size: Items per shard.
        fingerprint: ``"stat"``, ``"content"`` or ``"rows"`` (see :mod:`mmalign.cache.format`).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    table = RowTable.of(rows, sorted({t.field for t in towers.values()}))
    plans: dict[str, EntryPlan] = {}
    for tower_name, tower in towers.items():
        name = entry_name(tower.field, tower.encoder.cache_key)
        uses_tokens = bool(getattr(tower.projector, "uses_tokens", False))
        if uses_tokens and not tower.encoder.has_tokens:
            raise CacheError(f"tower {tower_name!r}: projector uses tokens but {type(tower.encoder).__name__} gives none")
        if name in plans:
            plans[name].tokens |= uses_tokens
            plans[name].towers.append(tower_name)
            continue
        by = item_by(tower.encoder)
        item_rows, row_index = table.unique_index(tower.field, by=by)
        digests = items_digests(table, tower.field, item_rows, fingerprint, by=by)
        shards = [(s, min(shard_size, len(item_rows) - s)) for s in range(0, len(item_rows), shard_size)]
        plans[name] = EntryPlan(name, tower.field, tower.encoder, uses_tokens, [tower_name], table, item_rows, row_index,
                                digests, shards, by)
    return list(plans.values())


def _write_shard(entry_dir: Path, k: int, arrays: dict[str, np.ndarray], marker: dict[str, Any]) -> None:
    for key, arr in arrays.items():
        atomic_save_npy(entry_dir / f"{shard_name(k)}.{key}.npy", arr)
    write_marker(entry_dir / f"{shard_name(k)}.json", marker)


def write_marker(path: Path, marker: dict[str, Any]) -> None:
    """The marker is written after the arrays: its presence is what makes a shard trusted."""
    atomic_write_json(path, marker)


def _marker_ok(entry_dir: Path, k: int, fingerprint: str, shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
    marker = read_json(entry_dir / f"{shard_name(k)}.json")
    if not isinstance(marker, dict) or marker.get("fingerprint") != fingerprint:
        return None
    if shard is not None and (marker.get("start"), marker.get("count")) != shard:
        return None  # a marker that does not describe this shard's items is not trusted (redone)
    names = ["pooled"] + (["tokens", "mask"] if marker.get("tokens") else [])
    if not all((entry_dir / f"{shard_name(k)}.{n}.npy").is_file() for n in names):
        return None
    return marker


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: explicit values, else torch.distributed, else ``RANK``/``WORLD_SIZE`` env."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def write_split(
    rows: Any,
    towers: dict[str, Any],
    split_dir: str | Path,
    *,
    split: str = "",
    batch_size: int | Callable[[Encoder], int] = 32,
    num_workers: int = 0,
    shard_size: int = 4096,
    dtype: str = "float16",
    fingerprint: str = "stat",
    rank: int | None = None,
    world_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_error: str = "error",
    report: BadInputReport | None = None,
    on_shard: Callable[[str, int], None] | None = None,
    silent_audio: str = "error",
    max_image_pixels: int | None = None,
) -> dict[str, Any] | None:
    """Encode this rank's shards of every entry of one split, then merge if every shard is done.

    Media are decoded and judged as ``mmalign fit`` judges raw data (:class:`~mmalign.data.collate.TowerCollator`):
    corrupt, truncated, huge, too short or silent media follow ``on_error`` / ``silent_audio``. Nothing
    is written when the split is already complete (not even the manifest), so a finished cache can be
    re-run on read-only storage; temporary files of killed writers are removed at every level.

    Args:
        rows: Manifest rows of the split (as the DataModule filters them).
        towers: ``{name: Tower}`` with projectors built.
        split_dir: ``<cache_dir>/<split>``.
        split: Split name recorded in the manifest.
        batch_size: Items per encoder forward, or a function of the entry's encoder giving it
            (``mmalign cache`` passes :func:`~mmalign.cache.command.encode_batch_size`).
        num_workers: DataLoader workers for preprocessing (decoding) the items.
        shard_size: Items per shard file.
        dtype: Storage dtype: ``"float16"`` (default) or ``"float32"``.
        fingerprint: How items are fingerprinted: ``"stat"`` (value + file size/mtime), ``"content"``
            (value + file bytes) or ``"rows"`` (values only).
        rank: This process's index among ``world_size`` writers (default: torch.distributed or env).
        world_size: Number of writer processes.
        device: Where the encoders run.
        progress: Show a tqdm bar per entry.
        on_error: Bad-input policy (:mod:`mmalign.data.policy`) for bad media and NaN/Inf features:
            ``"error"`` raises :class:`~mmalign.data.policy.BadInputError` naming the row id, field (and
            path); ``"skip"`` leaves the rows of such items out of the cache (recorded in the manifest
            with their reason, counted in ``report``).
        report: Where skipped rows are counted at the merge (a throwaway one when None).
        on_shard: Called as ``on_shard(entry_name, k)`` after each shard is written (tests, logging).
        silent_audio: ``"error"``, ``"skip"`` or ``"allow"`` silent clips (as the recipe's data).
        max_image_pixels: Pixel budget of image files (``None``: ``MMALIGN_MAX_IMAGE_PIXELS`` or 50 MP).

    Returns:
        The merged manifest, or None when other ranks' shards are still missing.

    Raises:
        BadInputError: Under ``on_error="error"``, an item is bad input or its features are not finite.
        CacheError: Another writer with other settings is writing this split (see :mod:`mmalign.cache.claim`).
        DiskFullError: The disk filled up (the message names the file; nothing half-written is kept).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_choice("on_error", on_error, ON_ERROR)
    check_choice("silent_audio", silent_audio, SILENT_AUDIO)
    rank, world_size = resolve_rank(rank, world_size)
    split_dir = Path(split_dir)
    rows = RowTable.of(rows, sorted({t.field for t in towers.values()}))  # columns, not row dicts
    plans = plan_entries(rows, towers, shard_size, fingerprint)
    device = torch.device(device)
    if split_dir.is_dir():
        remove_dead_tmp_tree(split_dir)  # temporary files of killed writers, at every level
    claim = SplitClaim(split_dir, {
        "dtype": dtype, "shard_size": shard_size, "fingerprint": fingerprint, "world_size": world_size, "on_error": on_error,
        "silent_audio": silent_audio, "max_image_pixels": max_image_pixels,
        "entries": {p.name: p.tokens for p in plans}, "rows": rows.rows_fingerprint(),
    })
    try:
        for plan in plans:
            plan.encoder.to(device)
            entry_dir = split_dir / plan.name
            mine = [k for k in range(len(plan.shards)) if k % world_size == rank]
            todo = []
            for k in mine:
                marker = _marker_ok(entry_dir, k, plan.shard_fingerprint(k, dtype), plan.shards[k])
                # Under "error", a shard that skipped items under "skip" is re-encoded so that it raises.
                if marker is None or (on_error == "error" and marker.get("bad")):
                    todo.append(k)
            total = sum(plan.shards[k][1] for k in todo)
            bar = tqdm(total=total, desc=f"{split} {plan.name}", unit="item", disable=not progress or total == 0)
            for k in todo:
                claim.ensure()  # first write: announce our settings; later: stop if an older writer differs
                arrays, bad = encode_shard(
                    plan, k, batch_size=batch_size(plan.encoder) if callable(batch_size) else batch_size, num_workers=num_workers, device=device, dtype=dtype,
                    on_error=on_error, bar=bar, silent_audio=silent_audio, max_image_pixels=max_image_pixels,
                )
                start, count = plan.shards[k]
                tok = arrays.get("tokens")
                marker = {
                    "start": start, "count": count, "dtype": dtype, "fingerprint": plan.shard_fingerprint(k, dtype),
                    "dim": int(arrays["pooled"].shape[1]), "tokens": plan.tokens,
                    "token_len": None if tok is None else int(tok.shape[1]),
                    "token_dim": None if tok is None else int(tok.shape[2]),
                    "bad": {str(j): v for j, v in sorted(bad.items())},
                }
                claim.ensure()
                entry_dir.mkdir(parents=True, exist_ok=True)
                _write_shard(entry_dir, k, arrays, marker)
                if on_shard is not None:
                    on_shard(plan.name, k)
            bar.close()
        return merge_split(split_dir, plans, split=split, dtype=dtype, fingerprint=fingerprint, rows=rows,
                           on_error=on_error, report=report, before_write=claim.ensure)
    finally:
        claim.release()


def _skipped_rows(plan: EntryPlan, markers: list[dict[str, Any]], on_error: str) -> tuple[dict[str, str], dict[str, str]]:
    """``({row id: "<field>: <detail>"}, {row id: reason})`` of the rows whose item in this entry was left out."""
    bad_items: dict[int, list[str]] = {}
    for m in markers:
        for j, why in (m.get("bad") or {}).items():
            bad_items[m["start"] + int(j)] = why
    if not bad_items:
        return {}, {}
    if on_error == "error":
        item = min(bad_items)
        field, detail, reason = (list(bad_items[item]) + [NON_FINITE])[:3]  # markers before 2-item lists: NaN/Inf
        raise BadInputError(plan.item_ids[item], field, reason, f"{detail}; written under on_error=skip by another writer")
    rows = np.nonzero(np.isin(plan.row_index, np.fromiter(bad_items, dtype=np.int64)))[0]
    why = {rid: bad_items[int(plan.row_index[r])] for r, rid in zip(rows.tolist(), plan.table.ids(rows))}
    return ({rid: f"{w[0]}: {w[1]}" for rid, w in why.items()},
            {rid: (w[2] if len(w) > 2 else NON_FINITE) for rid, w in why.items()})


def _same_npy(path: Path, array: np.ndarray) -> bool:
    """Whether ``path`` already holds exactly ``array`` (then it is not rewritten)."""
    try:
        old = np.load(path, mmap_mode="r", allow_pickle=False)
        return old.dtype == array.dtype and old.shape == array.shape and bool(np.array_equal(old, array))
    except (OSError, ValueError, EOFError):
        return False


def _same_rows(split_dir: Path, old: dict[str, Any], table: RowTable, arrays: dict[Path, np.ndarray]) -> bool:
    """Whether an earlier manifest (format 2: its row-id files; format 1: its ``row_ids`` list) has the rows of ``table``."""
    if old.get("format") == 1 and isinstance(old.get("row_ids"), list):  # upgrading a format-1 cache: once
        return old["row_ids"] == table.ids()
    if old.get("format") != FORMAT_VERSION:
        return False
    return all(_same_npy(split_dir / name, arrays[split_dir / name]) for name in (ROW_IDS_OFFSETS, ROW_IDS_DATA))


def merge_split(
    split_dir: Path, plans: list[EntryPlan], *, split: str, dtype: str, fingerprint: str,
    rows: Any, on_error: str = "error", report: BadInputReport | None = None,
    before_write: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Verify every shard's marker and write ``manifest.json``; None if some shard is still missing.

    Entries of the same rows written earlier by other recipes (other encoders) are kept. Rows left
    out under ``on_error="skip"`` (bad input or non-finite features) are listed per entry
    (``skipped_rows``, ``skip_reasons``) and for the whole split, and counted in ``report``. Files
    whose content would not change are not rewritten (a finished cache is left untouched);
    ``before_write`` is called before the first write (the writer's claim check).
    """
    table = plans[0].table if plans else RowTable.of(rows, ())
    entries: dict[str, Any] = {}
    arrays: dict[Path, np.ndarray] = {}
    for plan in plans:
        entry_dir = split_dir / plan.name
        markers = [_marker_ok(entry_dir, k, plan.shard_fingerprint(k, dtype), plan.shards[k]) for k in range(len(plan.shards))]
        if any(m is None for m in markers):
            return None
        dims = {m["dim"] for m in markers}
        token_dims = {m["token_dim"] for m in markers}
        if not markers:  # no row of the split has this field (partial-modality rows): an entry without items
            dims, token_dims = {int(plan.encoder.output_dim)}, {getattr(plan.encoder, "token_dim", None) if plan.tokens else None}
        if len(dims) != 1 or len(token_dims) != 1:
            raise CacheError(f"{entry_dir}: shards disagree on feature sizes {sorted(dims)} / {sorted(token_dims, key=str)}")
        skipped, reasons = _skipped_rows(plan, markers, on_error)
        arrays[entry_dir / "items.npy"] = plan.digests
        arrays[entry_dir / "rows.npy"] = plan.row_index
        entries[plan.name] = {
            "field": plan.field,
            "cache_key": plan.encoder.cache_key,
            "encoder": plan.encoder.spec(),
            "dim": dims.pop(),
            "token_dim": token_dims.pop(),
            "tokens": plan.tokens,
            "dtype": dtype,
            "num_items": len(plan.item_rows),
            "item_by": plan.by,
            "items_fingerprint": digest(plan.digests, plan.row_index),
            "towers": plan.towers,
            "skipped_rows": skipped,
            "skip_reasons": reasons,
            "shards": [
                {"name": shard_name(k), "start": m["start"], "count": m["count"], "token_len": m["token_len"]}
                for k, m in enumerate(markers)
            ],
        }
    # The row ids as two arrays (offsets + UTF-8 bytes, format 2): no per-row Python list, none in the JSON.
    id_offsets, id_bytes = id_buffers(table.columns["id"])
    arrays[split_dir / ROW_IDS_OFFSETS] = id_offsets
    arrays[split_dir / ROW_IDS_DATA] = id_bytes
    num_rows = len(id_offsets) - 1
    old = read_json(split_dir / MANIFEST)
    if isinstance(old, dict) and old.get("fingerprint_mode") == fingerprint and _same_rows(split_dir, old, table, arrays):
        for name, entry in (old.get("entries") or {}).items():
            if name not in entries and isinstance(name, str) and "/" not in name and (split_dir / name).is_dir():
                entries[name] = entry
    skipped_rows: dict[str, str] = {}
    skip_reasons: dict[str, str] = {}
    for entry in entries.values():
        for rid, why in entry.get("skipped_rows", {}).items():
            skipped_rows.setdefault(rid, why)
            skip_reasons.setdefault(rid, entry.get("skip_reasons", {}).get(rid, NON_FINITE))
    counts = dict(sorted(Counter(skip_reasons.values()).items()))
    if skipped_rows and report is not None:  # each item was logged when it was encoded; count rows here
        for rid, reason in skip_reasons.items():
            report.counts[reason] += 1
            ex = report.examples.setdefault(reason, [])
            if len(ex) < report.max_examples:
                ex.append(rid)
    manifest = {
        "format": FORMAT_VERSION,
        "split": split,
        "fingerprint_mode": fingerprint,
        "num_rows": num_rows,
        "num_cached_rows": num_rows - len(skipped_rows),
        "row_id_bytes": int(len(id_bytes)),
        "on_error": on_error,
        "skipped": counts,
        "skipped_rows": skipped_rows,
        "rows_fingerprint": table.rows_fingerprint(),
        "dataset_fingerprint": digest(table.rows_fingerprint(), *sorted(e["items_fingerprint"] for e in entries.values())),
        "entries": entries,
    }
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))  # as it reads back (tuples -> lists)
    changed = [path for path, arr in arrays.items() if not _same_npy(path, arr)]
    # the manifest is written last (its presence makes the split a cache): the id files come before it
    if changed or old != manifest:
        if before_write is not None:
            before_write()
        for path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)  # an entry without items has no shard folder yet
            atomic_save_npy(path, arrays[path])
        atomic_write_json(split_dir / MANIFEST, manifest)  # last: its presence makes the split a cache
    return manifest
