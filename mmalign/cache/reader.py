"""Read cached features: a map-style dataset yielding whole ``{"meta", "keys", "features"}`` batches.

Nothing here decodes an image or audio file or runs an encoder. Shards are opened as read-only numpy
memmaps, lazily in each process (DataLoader workers reopen them instead of receiving copies), so the
process holds only the rows of the current batch; the rest stays in the OS page cache.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmalign.cache.format import (
    FORMAT_VERSION, MANIFEST, NON_FINITE, CacheError, digest, entry_name, ids_difference, spec_diff,
)
from mmalign.cache.rowtable import RowTable, StringColumn, item_by, items_digests
from mmalign.cache.validate import confined, open_npy, validate_split
from mmalign.data.manifest import META_FIELDS
from mmalign.data.policy import ON_ERROR, BadInputReport, check_choice

log = logging.getLogger("mmalign.cache")
#: Elements per chunk when scanning shards for NaN/Inf (bounds the memory of the check, ~32 MB).
_SCAN_CHUNK = 1 << 23


def load_manifest(split_dir: str | Path) -> dict[str, Any]:
    """``<split_dir>/manifest.json``, checked field by field (:func:`~mmalign.cache.validate.validate_split`).

    Raises:
        CacheError: The split was never (fully) cached, or its manifest is not one ``mmalign cache``
            writes (the message names the file and the field).
    """
    return open_manifest(split_dir)[0]


def open_manifest(split_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """``(manifest, row ids)``: the checked manifest and the split's row ids (a memory-mapped Arrow array).

    Raises:
        CacheError: As :func:`load_manifest`; a format-1 cache (row ids listed in the JSON) asks for a re-run of
            ``mmalign cache``, which keeps its shards and rewrites only the manifest and the row-id files.
    """
    split_dir = Path(split_dir)
    path = split_dir / MANIFEST
    if not path.is_file():
        hint = " (some shards exist: the cache run was interrupted or other ranks are unfinished)" if split_dir.is_dir() else ""
        raise CacheError(f"no feature cache at {split_dir}: {MANIFEST} is missing{hint}; run `mmalign cache --config <recipe>`")
    confined(path, split_dir, str(path))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable cache manifest ({e}); delete it and re-run `mmalign cache`") from e
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") == 1:
        raise CacheError(
            f"{split_dir}: cache format 1 (row ids listed in {MANIFEST}) is older than this mmalign's format {FORMAT_VERSION}; "
            "re-run `mmalign cache` with the same recipe: its finished shards are kept (nothing is re-encoded), only the "
            "manifest and the row-id files are rewritten"
        )
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheError(f"{split_dir}: cache format {manifest.get('format')} is not {FORMAT_VERSION}; re-run `mmalign cache`")
    return manifest, validate_split(manifest, split_dir)


def cached_row_ids(split_dir: str | Path) -> list[str]:
    """The row ids of a cached split in row order, as Python strings (small splits and scripts; checked first)."""
    return open_manifest(split_dir)[1].to_pylist()


@dataclass
class _TowerView:
    """Memmapped shards of one entry, as one tower reads them."""

    entry_dir: Path
    row_index: np.ndarray  # [N] row -> item
    starts: np.ndarray  # [S] first item of each shard
    shards: list[dict[str, Any]]
    tokens: bool
    _maps: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    def _array(self, s: int, key: str) -> np.ndarray:
        arr = self._maps.get((s, key))
        if arr is None:
            arr = self._maps[(s, key)] = np.load(self.entry_dir / f"{self.shards[s]['name']}.{key}.npy", mmap_mode="r")
        return arr

    def gather(self, items: np.ndarray) -> dict[str, torch.Tensor]:
        """Features of ``items`` ``[B]``: pooled ``[B, D]`` (+ tokens ``[B, T, D_tok]``, mask ``[B, T]``)."""
        shard_of = np.searchsorted(self.starts, items, side="right") - 1  # [B]
        groups = [(s, np.nonzero(shard_of == s)[0]) for s in np.unique(shard_of)]
        first = self._array(int(groups[0][0]), "pooled")
        pooled = np.empty((len(items), first.shape[1]), dtype=first.dtype)
        for s, sel in groups:
            pooled[sel] = self._array(int(s), "pooled")[items[sel] - self.starts[s]]
        out = {"pooled": torch.from_numpy(pooled)}
        if not self.tokens:
            return out
        t_max = max(self.shards[int(s)]["token_len"] for s, _ in groups)
        tok0 = self._array(int(groups[0][0]), "tokens")
        tokens = np.zeros((len(items), t_max, tok0.shape[2]), dtype=tok0.dtype)
        mask = np.zeros((len(items), t_max), dtype=bool)
        for s, sel in groups:
            local = items[sel] - self.starts[s]
            t = self.shards[int(s)]["token_len"]
            tokens[sel, :t] = self._array(int(s), "tokens")[local]
            mask[sel, :t] = self._array(int(s), "mask")[local]
        length = max(int(mask.sum(axis=1).max()), 1)  # trim padding no row of this batch needs
        out["tokens"] = torch.from_numpy(tokens[:, :length])
        out["mask"] = torch.from_numpy(mask[:, :length])
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # workers reopen the memmaps instead of receiving pickled copies
        return state


def _check_entry(tower_name: str, tower: Any, manifest: dict[str, Any], split_dir: Path) -> dict[str, Any]:
    """The manifest entry tower ``tower_name`` reads; a clear :class:`CacheError` when it cannot."""
    encoder = tower.encoder
    name = entry_name(tower.field, encoder.cache_key)
    entry = manifest["entries"].get(name)
    if entry is None:
        same_field = [e for e in manifest["entries"].values() if e["field"] == tower.field]
        if not same_field:
            raise CacheError(
                f"{split_dir}: no cached features of field {tower.field!r} (tower {tower_name!r}); "
                f"cached fields: {sorted({e['field'] for e in manifest['entries'].values()})}; re-run `mmalign cache`"
            )
        other = same_field[0]
        raise CacheError(
            f"{split_dir}: tower {tower_name!r} uses encoder {encoder.cache_key}, but field {tower.field!r} was cached "
            f"with {other['cache_key']}: {spec_diff(other['encoder'], encoder.spec())}; re-run `mmalign cache`"
        )
    if entry["dim"] != encoder.output_dim:
        raise CacheError(
            f"{split_dir}/{name}: cached pooled features are {entry['dim']}-d but tower {tower_name!r}'s encoder "
            f"outputs {encoder.output_dim}-d"
        )
    if getattr(tower.projector, "uses_tokens", False):
        if not entry["tokens"]:
            raise CacheError(
                f"{split_dir}/{name}: tower {tower_name!r}'s projector {type(tower.projector).__name__} uses token "
                "sequences but only pooled features were cached; re-run `mmalign cache` with this recipe"
            )
        token_dim = getattr(encoder, "token_dim", None)
        if token_dim is not None and entry["token_dim"] != token_dim:
            raise CacheError(f"{split_dir}/{name}: cached tokens are {entry['token_dim']}-d, the encoder's {token_dim}-d")
    return entry


def check_shards(entry_dir: Path, entry: dict[str, Any], scan: bool, item_ids: Sequence[str] | None = None) -> None:
    """Check the shard files of one entry against the manifest; with ``scan``, also that every value is finite.

    The shapes and dtypes come from the ``.npy`` headers (cheap, always; object dtypes, files outside
    the cache folder and files shorter than their header are refused before anything is mapped). The
    scan reads every shard in chunks of at most ``_SCAN_CHUNK`` elements (a few tens of MB of memory
    whatever the cache size): the writer stores only finite values, so NaN/Inf means the files were
    modified or corrupted afterwards.

    Args:
        entry_dir: The entry's folder.
        entry: Its manifest entry.
        scan: Read the values (``verify_cache``).
        item_ids: ``[M]`` a row id per item, named in the error.

    Raises:
        CacheError: A shard is missing, has another shape or dtype, or holds NaN/Inf.
    """
    keys = ["pooled"] + (["tokens", "mask"] if entry["tokens"] else [])
    root = entry_dir.parent
    confined(entry_dir, root, f"{root / MANIFEST}: entries[{entry_dir.name!r}]")
    for i, shard in enumerate(entry["shards"]):
        for key in keys:
            path = entry_dir / f"{shard['name']}.{key}.npy"
            want = {"pooled": (shard["count"], entry["dim"]), "tokens": (shard["count"], shard["token_len"], entry["token_dim"]),
                    "mask": (shard["count"], shard["token_len"])}[key]
            dtype = np.dtype(bool if key == "mask" else entry["dtype"])
            where = f"{root / MANIFEST}: entries[{entry_dir.name!r}].shards[{i}] ({key})"
            arr = open_npy(path, root, want, dtype, where)
            if not scan or key == "mask":
                continue
            step = max(1, _SCAN_CHUNK // max(1, int(np.prod(arr.shape[1:]))))
            for a in range(0, len(arr), step):
                finite = np.isfinite(arr[a:a + step].reshape(min(step, len(arr) - a), -1)).all(axis=1)  # [chunk]
                if not finite.all():
                    j = a + int(np.nonzero(~finite)[0][0])
                    who = f" (item of row id={item_ids[shard['start'] + j]!r})" if item_ids is not None else ""
                    raise CacheError(
                        f"{path}: row {j}{who} holds NaN/Inf, which `mmalign cache` never writes: the cache was modified "
                        f"or corrupted after it was written. Delete {entry_dir / (shard['name'] + '.json')} (or the "
                        "whole cache) and re-run `mmalign cache`"
                    )


class CachedSplit(torch.utils.data.Dataset):
    """Rows of one split whose tower inputs are cached features.

    ``__getitems__`` (used by :class:`~torch.utils.data.DataLoader` for whole batches) returns a ready
    batch ``{"meta": {id, concept, lang}, "keys": {field: [str]}, "features": {tower: {"pooled", "tokens",
    "mask"}}}``; pair it with :func:`passthrough` as ``collate_fn``. Features keep the stored dtype
    (float16 by default); :class:`~mmalign.training.module.AlignmentModule` casts them to float.

    Rows that ``mmalign cache`` left out under ``on_error="skip"`` (NaN/Inf features of an item this
    recipe's towers read) are not served: ``len()`` and the indices count kept rows only, and they are
    counted in :attr:`report` (reason ``"non-finite features"``), which
    :class:`~mmalign.data.policy.BadInputCallback` prints at the end of a run.

    Args:
        split_dir: ``<cache_dir>/<split>``.
        rows: The split's manifest rows, filtered exactly as when the cache was written.
        towers: ``{name: Tower}`` of the recipe (projectors built).
        verify: Recompute the dataset fingerprint (file sizes/mtimes) and scan every shard for NaN/Inf
            once (refusing a modified or corrupted cache). Shard shapes are always checked.
        on_error: The reader's bad-input policy: ``"error"`` refuses a cache that left rows out,
            ``"skip"`` serves the rest; None (default) accepts the policy the cache was written with.

    Raises:
        CacheError: The cache is missing, unfinished, corrupted, or differs from the recipe or the data
            (the message says which row, encoder setting, size or file differs).
    """

    def __init__(
        self, split_dir: str | Path, rows: Sequence[dict[str, Any]], towers: dict[str, Any], verify: bool = True,
        on_error: str | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.fields = sorted({t.field for t in towers.values()})
        self.table = RowTable.of(rows, self.fields)  # Arrow columns: nothing per row held as a dict
        manifest, cached_ids = open_manifest(self.split_dir)
        diff = ids_difference(cached_ids, self.table.columns["id"])  # exact, vectorised; nothing per row held
        if diff is not None:
            raise CacheError(f"{self.split_dir}: stale cache, the dataset rows changed: {diff}")
        entries: dict[str, dict[str, Any]] = {}
        full_index: dict[str, np.ndarray] = {}
        skipped: dict[str, str] = {}
        reasons: dict[str, str] = {}  # row id -> bad-input reason it was left out for
        tower_entry: dict[str, str] = {}
        for tower_name, tower in towers.items():
            entry = _check_entry(tower_name, tower, manifest, self.split_dir)
            name = tower_entry[tower_name] = entry_name(tower.field, entry["cache_key"])
            if name not in entries:
                entries[name] = entry
                full_index[name] = self._verify(self.split_dir / name, entry, tower.field, manifest["fingerprint_mode"], verify,
                                                item_by(tower.encoder))
                has = np.nonzero(full_index[name] >= 0)[0]  # -1: the row lacks the field (partial-modality row)
                first = has[np.unique(full_index[name][has], return_index=True)[1]]  # [M] first row of each item
                check_shards(self.split_dir / name, entry, scan=verify, item_ids=_Ids(self.table, first))
                for rid, why in entry.get("skipped_rows", {}).items():
                    skipped.setdefault(rid, why)
                    reasons.setdefault(rid, str(entry.get("skip_reasons", {}).get(rid, NON_FINITE)))
        if skipped and on_error is not None:
            check_choice("on_error", on_error, ON_ERROR)
            if on_error == "error":
                rid, why = next(iter(skipped.items()))
                counts = ", ".join(f"{r}: {n}" for r, n in sorted(Counter(reasons.values()).items()))
                raise CacheError(
                    f"{self.split_dir}: the cache left out {len(skipped)} row(s), reasons: {counts} (first: id={rid!r} "
                    f"{why}) under on_error=skip, but this run uses on_error=error"
                )
        # Rows left out when caching are never served: indices below count kept rows only.
        self.keep = _kept_rows(cached_ids, skipped)  # [N_kept]
        del cached_ids
        self.rows = _Rows(self.table, self.keep)
        # Batches read these columns (Python strings up to 1M rows, raw UTF-8 buffers beyond).
        self._columns = {k: self._string_column(k) for k in dict.fromkeys([*META_FIELDS, *self.fields])}
        self.skipped_rows = skipped
        self._cache_report = BadInputReport()
        if skipped:
            for rid, reason in reasons.items():
                self._cache_report.counts[reason] += 1
                ex = self._cache_report.examples.setdefault(reason, [])
                if len(ex) < self._cache_report.max_examples:
                    ex.append(rid)
            log.warning("%s: %d row(s) were left out when caching (%s), e.g. %s", self.split_dir, len(skipped),
                        ", ".join(sorted(set(reasons.values()))), ", ".join(f"id={r!r} {w}" for r, w in list(skipped.items())[:3]))
        self._report = self._cache_report
        self.views: dict[str, _TowerView] = {}
        for tower_name, tower in towers.items():
            name = tower_entry[tower_name]
            entry = entries[name]
            self.views[tower_name] = _TowerView(
                entry_dir=self.split_dir / name,
                row_index=full_index[name][self.keep],
                starts=np.array([s["start"] for s in entry["shards"]], dtype=np.int64),
                shards=entry["shards"],
                tokens=bool(getattr(tower.projector, "uses_tokens", False)),
            )
        self.manifest = manifest

    @property
    def report(self) -> BadInputReport:
        """Rows skipped: those left out when caching, plus any manifest-level report assigned to it."""
        return self._report

    @report.setter
    def report(self, other: BadInputReport | None) -> None:
        # The DataModule assigns the manifest's own report here; keep the cache's skips in it as well.
        self._report = BadInputReport().merge(other).merge(self._cache_report)

    def _string_column(self, name: str) -> Any:
        t = self.table
        if name in t.objects:
            return _ObjectColumn([None if v is None else str(v) for v in t.objects[name]])
        if name not in t.columns:
            return _ObjectColumn([None] * len(t))
        return StringColumn(t.columns[name], dictionary=name == "lang")

    def _verify(self, entry_dir: Path, entry: dict[str, Any], field: str, mode: str, verify: bool,
                by: str | None = None) -> np.ndarray:
        where = f"{self.split_dir / MANIFEST}: entries[{entry_dir.name!r}]"
        n, m = len(self.table), entry["num_items"]
        # Mapped, checked against the manifest's sizes, then copied: a forged header allocates nothing.
        row_index = np.array(open_npy(entry_dir / "rows.npy", self.split_dir, (n,), np.int64, f"{where} (rows.npy)"))
        # -1: the row has no value of this field (partial-modality rows); every item is used by some row.
        if n and (row_index.min() < -1 or row_index.max() >= m or len(np.unique(row_index[row_index >= 0])) != m):
            raise CacheError(f"{where}: rows.npy must map every row to one of the {m} items (num_items) or -1 and use each; "
                             f"the cache was modified after it was written: delete it and re-run `mmalign cache`")
        if not verify:
            return row_index
        item_rows, current_index = self.table.unique_index(field, by=by)
        current = items_digests(self.table, field, item_rows, mode, by=by)
        if digest(current, current_index) == entry["items_fingerprint"]:
            if len(item_rows) != m:
                raise CacheError(f"{where}.num_items: {m}, but the rows hold {len(item_rows)} distinct {field!r} values")
            return current_index
        cached = np.array(open_npy(entry_dir / "items.npy", self.split_dir, (m,), np.uint64, f"{where} (items.npy)"))
        changed = (current_index != row_index) | (
            current[current_index] != cached[np.clip(row_index, 0, len(cached) - 1)]
        )
        bad = np.nonzero(changed)[0]
        i = int(bad[0]) if len(bad) else 0
        what = "its value or file size/mtime" if mode == "stat" else "its value or file content" if mode == "content" else "its value"
        raise CacheError(
            f"{self.split_dir}/{entry_dir.name}: stale cache, {len(bad)} row(s) changed since caching; first: row "
            f"id={self.table.ids([i])[0]!r} {field}={str(self.table.take(field, [i])[0])[:120]!r} ({what} differs); re-run `mmalign cache`"
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        at = self.keep[idx]  # rows of the table
        features, present = {}, {}
        for name, view in self.views.items():
            items = view.row_index[idx]  # [B]; -1 where the row lacks this tower's field
            has = items >= 0
            if not has.all():  # partial-modality batch: features of the present rows, a [B] mask
                present[name] = torch.from_numpy(has)
                items = items[has]
            if len(items):
                features[name] = view.gather(items)
        batch = {
            "meta": {k: self._columns[k].take(at) for k in META_FIELDS},
            "keys": {f: self._columns[f].take(at) for f in self.fields},
            "features": features,
        }
        if present and len(idx):
            batch["present"] = present
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


def _kept_rows(ids: Any, skipped: dict[str, str]) -> np.ndarray:
    """``[N_kept]`` int64 rows whose id is not in ``skipped`` (vectorised over the id column)."""
    if not skipped:
        return np.arange(len(ids), dtype=np.int64)
    import pyarrow as pa
    import pyarrow.compute as pc

    left_out = pc.is_in(ids, value_set=pa.array(sorted(skipped), pa.large_string()))
    return np.flatnonzero(~np.asarray(left_out.to_numpy(zero_copy_only=False), dtype=bool)).astype(np.int64)


class _Ids(Sequence):
    """Ids of the given rows of a table, read on access (named in errors only)."""

    def __init__(self, table: RowTable, rows: np.ndarray) -> None:
        self.table, self.rows_ = table, rows

    def __len__(self) -> int:
        return len(self.rows_)

    def __getitem__(self, i: Any) -> Any:
        return self.table.ids(self.rows_[i]) if isinstance(i, slice) else self.table.ids([self.rows_[i]])[0]


class _Rows(Sequence):
    """``CachedSplit.rows``: the kept rows as dicts, built on access (nothing per row is held)."""

    def __init__(self, table: RowTable, keep: np.ndarray) -> None:
        self.table, self.keep = table, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.table.row(int(self.keep[i]))


class _ObjectColumn:
    def __init__(self, values: list[Any]) -> None:
        self.values = np.array(values + [None], dtype=object)[:-1]

    def take(self, index: Any) -> list[Any]:
        return self.values[np.asarray(index, dtype=np.int64)].tolist()


def passthrough(batch: Any) -> Any:
    """``collate_fn`` for :class:`CachedSplit`: its ``__getitems__`` already built the batch."""
    return batch
