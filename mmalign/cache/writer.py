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
    item_digests, read_json, rows_fingerprint, shard_name, unique_items,
)


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
        plans[name] = EntryPlan(name, tower.field, tower.encoder, uses_tokens, [tower_name], items, row_index, digests, shards)
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


def _encode_shard(
    plan: EntryPlan, k: int, *, batch_size: int, num_workers: int, device: torch.device, dtype: str,
    bar: tqdm | None,
) -> dict[str, np.ndarray]:
    start, count = plan.shards[k]
    loader = DataLoader(
        plan.items[start:start + count], batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_Preprocess(plan.encoder, plan.field),
    )
    np_dtype = np.dtype(dtype)
    pooled, tokens, masks = [], [], []
    for inputs in loader:
        inputs = {k_: v.to(device) if isinstance(v, torch.Tensor) else v for k_, v in inputs.items()}
        out = plan.encoder(inputs)
        pooled.append(out.pooled.float().cpu().numpy().astype(np_dtype))  # [b, D]
        if plan.tokens:
            if out.tokens is None:
                raise CacheError(f"{plan.name}: the encoder returned no tokens but a projector needs them")
            mask = out.mask if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
            tokens.append(out.tokens.float().cpu().numpy().astype(np_dtype))  # [b, T_b, D_tok]
            masks.append(mask.cpu().numpy().astype(bool))  # [b, T_b]
        if bar is not None:
            bar.update(len(out.pooled))
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
        if arr.dtype != bool and not np.isfinite(arr).all():
            raise CacheError(f"{plan.name} shard {k}: {key} has inf/nan after casting to {dtype} (try dtype float32)")
    return arrays


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
        on_shard: Called as ``on_shard(entry_name, k)`` after each shard is written (tests, logging).

    Returns:
        The merged manifest, or None when other ranks' shards are still missing.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    rank, world_size = resolve_rank(rank, world_size)
    split_dir = Path(split_dir)
    plans = plan_entries(rows, towers, shard_size, fingerprint)
    device = torch.device(device)
    for plan in plans:
        plan.encoder.to(device)
        entry_dir = split_dir / plan.name
        entry_dir.mkdir(parents=True, exist_ok=True)
        mine = [k for k in range(len(plan.shards)) if k % world_size == rank]
        todo = [k for k in mine if _marker_ok(entry_dir, k, plan.shard_fingerprint(k, dtype)) is None]
        total = sum(plan.shards[k][1] for k in todo)
        bar = tqdm(total=total, desc=f"{split} {plan.name}", unit="item", disable=not progress or total == 0)
        for k in todo:
            arrays = _encode_shard(plan, k, batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype, bar=bar)
            start, count = plan.shards[k]
            tok = arrays.get("tokens")
            marker = {
                "start": start, "count": count, "dtype": dtype, "fingerprint": plan.shard_fingerprint(k, dtype),
                "dim": int(arrays["pooled"].shape[1]), "tokens": plan.tokens,
                "token_len": None if tok is None else int(tok.shape[1]),
                "token_dim": None if tok is None else int(tok.shape[2]),
            }
            _write_shard(entry_dir, k, arrays, marker)
            if on_shard is not None:
                on_shard(plan.name, k)
        bar.close()
    return merge_split(split_dir, plans, split=split, dtype=dtype, fingerprint=fingerprint, rows=rows)


def merge_split(
    split_dir: Path, plans: list[EntryPlan], *, split: str, dtype: str, fingerprint: str,
    rows: Sequence[dict[str, Any]],
) -> dict[str, Any] | None:
    """Verify every shard's marker and write ``manifest.json``; None if some shard is still missing.

    Entries of the same rows written earlier by other recipes (other encoders) are kept.
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
    manifest = {
        "format": FORMAT_VERSION,
        "split": split,
        "fingerprint_mode": fingerprint,
        "num_rows": len(row_ids),
        "rows_fingerprint": rows_fingerprint(row_ids),
        "dataset_fingerprint": digest(rows_fingerprint(row_ids), *sorted(e["items_fingerprint"] for e in entries.values())),
        "entries": entries,
        "row_ids": row_ids,
    }
    atomic_write_json(split_dir / MANIFEST, manifest)
    return manifest
