"""Write the feature cache of one split: encode every unique item once, in shards, resumably.

Several processes may write the same split at once (``rank``/``world_size``): shard ``k`` of every
entry belongs to rank ``k % world_size``. Each shard's arrays are written through temporary files and
``os.replace``, then its marker; a shard without a valid marker is (re)encoded, a marked one is kept.
Whichever process finds every marker present writes ``manifest.json`` (the merge), so the last rank to
finish completes the cache without a barrier; :func:`merge_split` can also be run on its own to verify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from encoders.base import Encoder
from mmalign.cache.format import (
    DTYPES, FORMAT_VERSION, MANIFEST, CacheError, atomic_save_npy, atomic_write_json, digest, entry_name,
    NON_FINITE, item_digests, read_json, remove_dead_tmp, rows_fingerprint, shard_name, unique_items,
)
from mmalign.data.policy import ON_ERROR, BadInputError, BadInputReport, check_choice, check_finite


@dataclass
class EntryPlan:
    """What one entry (one encoder over one field) of a split holds.

    Attributes:
        name: Directory name ``<field>--<cache_key>``.
        field: The manifest field encoded.
        encoder: The frozen encoder.
        tokens: Whether token sequences + masks are stored (a projector of some tower uses them).
        towers: Names of the recipe's towers this entry feeds.
        items: Unique field values, in first-appearance order.
        row_index: ``[N]`` row -> item.
        digests: ``[M]`` uint64 item digests (see :func:`~mmalign.cache.format.item_digests`).
        shards: ``(start, count)`` item ranges.
        item_ids: ``[M]`` id of the first row using each item (named in errors).
        row_ids: ``[N]`` row ids.
    """

    name: str
    field: str
    encoder: Encoder
    tokens: bool
    towers: list[str]
    items: list[Any]
    row_index: np.ndarray
    digests: np.ndarray
    shards: list[tuple[int, int]]
    item_ids: list[str]
    row_ids: list[str]

    def shard_fingerprint(self, k: int, dtype: str) -> str:
        start, count = self.shards[k]
        return digest(self.encoder.cache_key, self.tokens, dtype, start, count, self.digests[start:start + count])


def plan_entries(
    rows: Sequence[dict[str, Any]], towers: dict[str, Any], shard_size: int, fingerprint: str
) -> list[EntryPlan]:
    """Group the towers by (field, encoder cache_key); one entry each.

    Args:
        rows: Manifest rows of the split, in dataset order.
        towers: ``{name: Tower}`` of the recipe (projectors built: ``uses_tokens`` decides token storage).
        shard_size: Items per shard.
        fingerprint: ``"stat"``, ``"content"`` or ``"rows"`` (see :mod:`mmalign.cache.format`).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
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
        items, row_index = unique_items(rows, tower.field)
        digests = item_digests(items, tower.field, fingerprint)
        shards = [(s, min(shard_size, len(items) - s)) for s in range(0, len(items), shard_size)]
        row_ids = [str(r["id"]) for r in rows]
        first_row = np.unique(row_index, return_index=True)[1]  # [M]: items are numbered in first-appearance order
        plans[name] = EntryPlan(
            name, tower.field, tower.encoder, uses_tokens, [tower_name], items, row_index, digests, shards,
            [row_ids[i] for i in first_row], row_ids,
        )
    return list(plans.values())


class _Preprocess:
    """Picklable collate: raw items -> the encoder's CPU tensors (runs in DataLoader workers)."""

    def __init__(self, encoder: Encoder, field: str) -> None:
        self.encoder, self.field = encoder, field

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        try:
            return self.encoder.preprocess(items)
        except Exception as e:
            raise type(e)(f"could not preprocess {self.field!r} items {[str(i)[:80] for i in items[:4]]}: {e}") from e


def _finite_rows(values: torch.Tensor, ids: Sequence[str], field: str, on_error: str, bad: dict[int, list[str]], offset: int) -> torch.Tensor:
    """``keep [b]`` of :func:`check_finite`; bad rows are recorded in ``bad`` as ``{shard item: [field, detail]}``."""
    keep = check_finite(values, ids, field, on_error, BadInputReport())  # raises under "error"
    for j in torch.nonzero(~keep).flatten().tolist():
        n_bad = int((~torch.isfinite(values[j])).sum())
        bad.setdefault(offset + j, [field, f"{n_bad} NaN/Inf values"])
    return keep


def _encode_shard(
    plan: EntryPlan, k: int, *, batch_size: int, num_workers: int, device: torch.device, dtype: str,
    on_error: str, bar: tqdm | None,
) -> tuple[dict[str, np.ndarray], dict[int, list[str]]]:
    """Encode shard ``k`` of ``plan``.

    Returns:
        ``(arrays, bad)``: ``{"pooled" [n, D], "tokens" [n, T, D_tok], "mask" [n, T]}`` and, under
        ``on_error="skip"``, ``{shard item: [field, detail]}`` of items whose features are not finite
        (stored as zeros; their rows are left out when the cache is read).
    """
    start, count = plan.shards[k]
    labels = plan.item_ids[start:start + count]
    loader = DataLoader(
        plan.items[start:start + count], batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_Preprocess(plan.encoder, plan.field),
    )
    np_dtype = np.dtype(dtype)
    pooled, tokens, masks = [], [], []
    bad: dict[int, list[str]] = {}
    i0 = 0
    for inputs in loader:
        inputs = {k_: v.to(device) if isinstance(v, torch.Tensor) else v for k_, v in inputs.items()}
        out = plan.encoder(inputs)
        pool = out.pooled.float().cpu()  # [b, D]
        b = len(pool)
        keep = _finite_rows(pool, labels[i0:i0 + b], f"features/{plan.field}/pooled", on_error, bad, i0)
        if plan.tokens:
            if out.tokens is None:
                raise CacheError(f"{plan.name}: the encoder returned no tokens but a projector needs them")
            mask = out.mask.cpu().bool() if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
            tok = out.tokens.float().cpu().masked_fill(~mask.unsqueeze(-1), 0.0)  # [b, T_b, D_tok]; padding is not content
            keep &= _finite_rows(tok, labels[i0:i0 + b], f"features/{plan.field}/tokens", on_error, bad, i0)
            tok[~keep] = 0.0
            tokens.append(tok.numpy().astype(np_dtype))
            masks.append(mask.numpy())  # [b, T_b]
        pool[~keep] = 0.0  # skipped items are stored as zeros (never read) so every shard stays finite
        pooled.append(pool.numpy().astype(np_dtype))
        i0 += b
        if bar is not None:
            bar.update(b)
    arrays = {"pooled": np.concatenate(pooled)}
    if plan.tokens:
        # Pad to this shard's longest sequence; the mask keeps padding apart from real tokens.
        t_max = max(t.shape[1] for t in tokens)
        padded = np.zeros((count, t_max, tokens[0].shape[2]), dtype=np_dtype)
        mask = np.zeros((count, t_max), dtype=bool)
        i = 0
        for t, m in zip(tokens, masks):
            padded[i:i + len(t), : t.shape[1]] = t
            mask[i:i + len(m), : m.shape[1]] = m
            i += len(t)
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


def _write_shard(entry_dir: Path, k: int, arrays: dict[str, np.ndarray], marker: dict[str, Any]) -> None:
    for key, arr in arrays.items():
        atomic_save_npy(entry_dir / f"{shard_name(k)}.{key}.npy", arr)
    write_marker(entry_dir / f"{shard_name(k)}.json", marker)


def write_marker(path: Path, marker: dict[str, Any]) -> None:
    """The marker is written after the arrays: its presence is what makes a shard trusted."""
    atomic_write_json(path, marker)


def _marker_ok(entry_dir: Path, k: int, fingerprint: str) -> dict[str, Any] | None:
    marker = read_json(entry_dir / f"{shard_name(k)}.json")
    if marker is None or marker.get("fingerprint") != fingerprint:
        return None
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
    rows: Sequence[dict[str, Any]],
    towers: dict[str, Any],
    split_dir: str | Path,
    *,
    split: str = "",
    batch_size: int = 32,
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
) -> dict[str, Any] | None:
    """Encode this rank's shards of every entry of one split, then merge if every shard is done.

    Args:
        rows: Manifest rows of the split (as the DataModule filters them).
        towers: ``{name: Tower}`` with projectors built.
        split_dir: ``<cache_dir>/<split>``.
        split: Split name recorded in the manifest.
        batch_size: Items per encoder forward.
        num_workers: DataLoader workers for preprocessing (decoding) the items.
        shard_size: Items per shard file.
        dtype: Storage dtype: ``"float16"`` (default) or ``"float32"``.
        fingerprint: How items are fingerprinted: ``"stat"`` (value + file size/mtime), ``"content"``
            (value + file bytes) or ``"rows"`` (values only).
        rank: This process's index among ``world_size`` writers (default: torch.distributed or env).
        world_size: Number of writer processes.
        device: Where the encoders run.
        progress: Show a tqdm bar per entry.
        on_error: Policy for NaN/Inf features (:mod:`mmalign.data.policy`): ``"error"`` raises
            :class:`~mmalign.data.policy.BadInputError` naming the row id and field; ``"skip"`` leaves
            the rows of such items out of the cache (recorded in the manifest, counted in ``report``).
        report: Where skipped rows are counted at the merge (a throwaway one when None).
        on_shard: Called as ``on_shard(entry_name, k)`` after each shard is written (tests, logging).

    Returns:
        The merged manifest, or None when other ranks' shards are still missing.

    Raises:
        BadInputError: Under ``on_error="error"``, an item's features are not finite.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_choice("on_error", on_error, ON_ERROR)
    rank, world_size = resolve_rank(rank, world_size)
    split_dir = Path(split_dir)
    plans = plan_entries(rows, towers, shard_size, fingerprint)
    device = torch.device(device)
    for plan in plans:
        plan.encoder.to(device)
        entry_dir = split_dir / plan.name
        entry_dir.mkdir(parents=True, exist_ok=True)
        remove_dead_tmp(entry_dir)  # temporary files of killed writers
        mine = [k for k in range(len(plan.shards)) if k % world_size == rank]
        todo = []
        for k in mine:
            marker = _marker_ok(entry_dir, k, plan.shard_fingerprint(k, dtype))
            # Under "error", a shard that skipped items under "skip" is re-encoded so that it raises.
            if marker is None or (on_error == "error" and marker.get("bad")):
                todo.append(k)
        total = sum(plan.shards[k][1] for k in todo)
        bar = tqdm(total=total, desc=f"{split} {plan.name}", unit="item", disable=not progress or total == 0)
        for k in todo:
            arrays, bad = _encode_shard(
                plan, k, batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype,
                on_error=on_error, bar=bar,
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
            _write_shard(entry_dir, k, arrays, marker)
            if on_shard is not None:
                on_shard(plan.name, k)
        bar.close()
    return merge_split(split_dir, plans, split=split, dtype=dtype, fingerprint=fingerprint, rows=rows,
                       on_error=on_error, report=report)


def _skipped_rows(plan: EntryPlan, markers: list[dict[str, Any]], on_error: str) -> dict[str, str]:
    """``{row id: "<field>: <detail>"}`` of the rows whose item in this entry has non-finite features."""
    bad_items: dict[int, list[str]] = {}
    for m in markers:
        for j, why in (m.get("bad") or {}).items():
            bad_items[m["start"] + int(j)] = why
    if not bad_items:
        return {}
    if on_error == "error":
        item = min(bad_items)
        field, detail = bad_items[item]
        raise BadInputError(plan.item_ids[item], field, NON_FINITE, f"{detail}; written under on_error=skip by another writer")
    rows = np.nonzero(np.isin(plan.row_index, np.fromiter(bad_items, dtype=np.int64)))[0]
    return {plan.row_ids[r]: "{}: {}".format(*bad_items[int(plan.row_index[r])]) for r in rows}


def merge_split(
    split_dir: Path, plans: list[EntryPlan], *, split: str, dtype: str, fingerprint: str,
    rows: Sequence[dict[str, Any]], on_error: str = "error", report: BadInputReport | None = None,
) -> dict[str, Any] | None:
    """Verify every shard's marker and write ``manifest.json``; None if some shard is still missing.

    Entries of the same rows written earlier by other recipes (other encoders) are kept. Rows left
    out under ``on_error="skip"`` (non-finite features) are listed per entry (``skipped_rows``) and
    for the whole split, and counted in ``report``.
    """
    row_ids = [str(r["id"]) for r in rows]
    entries: dict[str, Any] = {}
    for plan in plans:
        entry_dir = split_dir / plan.name
        markers = [_marker_ok(entry_dir, k, plan.shard_fingerprint(k, dtype)) for k in range(len(plan.shards))]
        if any(m is None for m in markers):
            return None
        dims = {m["dim"] for m in markers}
        token_dims = {m["token_dim"] for m in markers}
        if len(dims) != 1 or len(token_dims) != 1:
            raise CacheError(f"{entry_dir}: shards disagree on feature sizes {sorted(dims)} / {sorted(token_dims, key=str)}")
        skipped = _skipped_rows(plan, markers, on_error)
        atomic_save_npy(entry_dir / "items.npy", plan.digests)
        atomic_save_npy(entry_dir / "rows.npy", plan.row_index)
        entries[plan.name] = {
            "field": plan.field,
            "cache_key": plan.encoder.cache_key,
            "encoder": plan.encoder.spec(),
            "dim": dims.pop(),
            "token_dim": token_dims.pop(),
            "tokens": plan.tokens,
            "dtype": dtype,
            "num_items": len(plan.items),
            "items_fingerprint": digest(plan.digests, plan.row_index),
            "towers": plan.towers,
            "skipped_rows": skipped,
            "shards": [
                {"name": shard_name(k), "start": m["start"], "count": m["count"], "token_len": m["token_len"]}
                for k, m in enumerate(markers)
            ],
        }
    old = read_json(split_dir / MANIFEST)
    if old and old.get("row_ids") == row_ids and old.get("fingerprint_mode") == fingerprint:
        for name, entry in old.get("entries", {}).items():
            if name not in entries and (split_dir / name).is_dir():
                entries[name] = entry
    skipped_rows: dict[str, str] = {}
    for entry in entries.values():
        for rid, why in entry.get("skipped_rows", {}).items():
            skipped_rows.setdefault(rid, why)
    if skipped_rows and report is not None:  # each item was logged when it was encoded; count rows here
        report.counts[NON_FINITE] += len(skipped_rows)
        report.examples.setdefault(NON_FINITE, []).extend(list(skipped_rows)[: report.max_examples])
    manifest = {
        "format": FORMAT_VERSION,
        "split": split,
        "fingerprint_mode": fingerprint,
        "num_rows": len(row_ids),
        "num_cached_rows": len(row_ids) - len(skipped_rows),
        "on_error": on_error,
        "skipped": {NON_FINITE: len(skipped_rows)} if skipped_rows else {},
        "skipped_rows": skipped_rows,
        "rows_fingerprint": rows_fingerprint(row_ids),
        "dataset_fingerprint": digest(rows_fingerprint(row_ids), *sorted(e["items_fingerprint"] for e in entries.values())),
        "entries": entries,
        "row_ids": row_ids,
    }
    atomic_write_json(split_dir / MANIFEST, manifest)
    return manifest
