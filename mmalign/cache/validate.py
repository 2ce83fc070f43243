"""Open a feature cache as untrusted input: every manifest field and array header is checked before use.

A cache folder may come from another machine, another user or a half-finished copy, so nothing in
``manifest.json`` is trusted: an entry or shard name must be a plain file name inside the cache folder
(absolute paths, ``..``, path separators and symlinks that lead outside are refused), shards must tile
their entry's items exactly (no duplicate name, gap or overlap), every key must be present with its
type, and every ``.npy`` header must match the manifest *before* any data is mapped: a numeric dtype
(never ``object``), the shape the manifest gives, and a file long enough for that shape. Arrays are
memory-mapped, never read whole, so a header claiming 10^12 rows allocates nothing. The row ids
(``row_ids.offsets.npy`` / ``row_ids.utf8.npy``, fixed names) must have the sizes the manifest's ``num_rows``
and ``row_id_bytes`` give, offsets that start at 0, never decrease and end at the data's size, valid
UTF-8 and no repeated id, before the reader compares them with the dataset. Each refusal is a
:class:`~mmalign.cache.format.CacheError` naming the file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.cache.format import (
    DTYPES, FINGERPRINT_MODES, MANIFEST, ROW_IDS_DATA, ROW_IDS_OFFSETS, CacheError, entry_name,
)

_REDO = "delete the cache folder (or that entry) and re-run `mmalign cache`"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plain_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name (no folder part, not ``.``/``..``); else :class:`CacheError`.

    Args:
        name: The name read from the manifest.
        where: ``"<manifest path>: <field>"``, named in the error.
    """
    if not isinstance(name, str) or not name:
        raise CacheError(f"{where}: expected a file name, got {name!r}")
    if os.path.isabs(name) or name.startswith("~"):
        raise CacheError(f"{where}: {name!r} is an absolute path; cache files must lie inside the cache folder")
    if name in (".", "..") or ".." in name.replace("\\", "/").split("/"):
        raise CacheError(f"{where}: {name!r} climbs out of its folder with '..'; cache files must lie inside the cache folder")
    if "/" in name or "\\" in name or "\0" in name:
        raise CacheError(f"{where}: {name!r} has a path separator; a cache file name is one name inside its folder")
    return name


def confined(path: Path, root: Path, where: str) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root``; else :class:`CacheError`."""
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise CacheError(f"{where}: {path} resolves to {real}, outside the cache folder {top} (a symlink?); refused")
    return path


def npy_header(path: Path, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from the header of the ``.npy`` file ``path``; no data is read."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _fortran, dtype = read(f, max_header_size=10_000)
            return tuple(int(n) for n in shape), np.dtype(dtype), f.tell()
    except FileNotFoundError:
        raise CacheError(f"{where}: {path} is missing; {_REDO}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise CacheError(f"{where}: {path} is not a readable .npy array ({e}); {_REDO}") from e


def open_npy(path: Path, root: Path, shape: tuple[int, ...], dtype: np.dtype | str, where: str) -> np.ndarray:
    """Memory-map ``path`` after checking that its header says ``shape`` and ``dtype`` and the file holds them.

    Args:
        path: The ``.npy`` file.
        root: The cache folder it must lie in.
        shape: The shape the manifest gives.
        dtype: The dtype the manifest gives (``float16``/``float32`` features, ``bool`` masks, ``int64`` /
            ``uint64`` indices).
        where: ``"<manifest path>: <field>"``, named in errors.

    Raises:
        CacheError: Outside ``root``, unreadable, object or other dtype, another shape, or shorter than
            its header says.
    """
    confined(path, root, where)
    got_shape, got_dtype, offset = npy_header(path, where)
    want = np.dtype(dtype)
    if got_dtype.hasobject or got_dtype.kind not in "biuf":
        raise CacheError(
            f"{where}: {path} holds dtype {got_dtype} ({'Python objects' if got_dtype.hasobject else 'not numbers'}); "
            f"a cache stores only {want} here, so it was not written by `mmalign cache`; {_REDO}"
        )
    if got_shape != tuple(shape) or got_dtype != want:
        raise CacheError(
            f"{where}: {path}: shape {got_shape} {got_dtype}, the manifest says {tuple(shape)} {want}; the cache was "
            f"modified after it was written; {_REDO}"
        )
    need = offset + int(np.prod(shape, dtype=np.int64)) * want.itemsize
    size = path.stat().st_size
    if size < need:
        raise CacheError(f"{where}: {path} holds {size} bytes, its header needs {need} (a truncated file); {_REDO}")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=want)  # numpy cannot map an empty array
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _need(obj: Any, key: str, kind: Any, where: str) -> Any:
    if not isinstance(obj, dict):
        raise CacheError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise CacheError(f"{where}: missing key {key!r}; {_REDO}")
    value = obj[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CacheError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r:.80}")
    return value


def validate_manifest(manifest: Any, split_dir: Path) -> dict[str, Any]:
    """Check every field of a split's ``manifest.json`` that the reader uses; returns it unchanged.

    See :func:`validate_split`, which also returns the row ids.
    """
    validate_split(manifest, split_dir)
    return manifest


def validate_split(manifest: Any, split_dir: Path) -> Any:
    """Check a split's ``manifest.json`` and its row-id files; returns the row ids (a mapped Arrow ``large_string`` array).

    Args:
        manifest: The parsed JSON.
        split_dir: ``<cache_dir>/<split>``, the folder every file must lie in.

    Raises:
        CacheError: Naming ``manifest.json`` (or the row-id file) and the field: a missing key or wrong type,
            row-id files of other sizes than ``num_rows`` / ``row_id_bytes`` say (checked on the ``.npy`` headers
            before anything is mapped), offsets that do not tile the bytes, ids that are not UTF-8 or repeat, an
            entry name that is not ``<field>--<cache_key>``, a shard name that leaves the folder or repeats,
            shards that do not tile ``[0, num_items)`` (gap, overlap, shifted ``start``), an unknown dtype, or
            skipped rows that are not rows of the split.
    """
    where = str(split_dir / MANIFEST)
    num_rows = _need(manifest, "num_rows", int, where)
    num_bytes = _need(manifest, "row_id_bytes", int, where)
    if num_rows < 0 or num_bytes < 0:
        raise CacheError(f"{where}: num_rows and row_id_bytes must not be negative, got {num_rows} / {num_bytes}")
    ids = row_ids(split_dir, num_rows, num_bytes)
    if _need(manifest, "fingerprint_mode", str, where) not in FINGERPRINT_MODES:
        raise CacheError(f"{where}: fingerprint_mode {manifest['fingerprint_mode']!r} is not one of {FINGERPRINT_MODES}")
    entries = _need(manifest, "entries", dict, where)
    for name, entry in entries.items():
        _validate_entry(name, entry, split_dir, f"{where}: entries[{name!r}]", ids)
    skipped = manifest.get("skipped_rows", {})
    if not isinstance(skipped, dict) or not _all_ids(skipped, ids):
        raise CacheError(f"{where}: skipped_rows must map row ids of this split to reasons")
    return ids


def row_ids(split_dir: Path, num_rows: int, num_bytes: int) -> Any:
    """The row ids of a split from ``row_ids.offsets.npy`` / ``row_ids.utf8.npy``, checked, as a mapped Arrow array."""
    import pyarrow as pa

    from mmalign.data.sources.columns import repeated

    where = f"{split_dir / MANIFEST}: row ids"
    offsets = open_npy(split_dir / ROW_IDS_OFFSETS, split_dir, (num_rows + 1,), np.int64, f"{where} ({ROW_IDS_OFFSETS})")
    data = open_npy(split_dir / ROW_IDS_DATA, split_dir, (num_bytes,), np.uint8, f"{where} ({ROW_IDS_DATA})")
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_bytes:
        raise CacheError(f"{where}: {ROW_IDS_OFFSETS} must start at 0 and end at row_id_bytes ({num_bytes}), got "
                         f"{int(offsets[0])}..{int(offsets[-1])}; {_REDO}")
    for a in range(0, num_rows, 1 << 22):  # bounded memory: 4M offsets at a time
        part = np.asarray(offsets[a:a + (1 << 22) + 1])
        if (np.diff(part) < 0).any():
            raise CacheError(f"{where}: {ROW_IDS_OFFSETS} decreases at row {a + int(np.argmax(np.diff(part) < 0))}; {_REDO}")
    arr = pa.LargeStringArray.from_buffers(num_rows, pa.py_buffer(offsets), pa.py_buffer(data) if num_bytes else None)
    try:
        arr.validate(full=True)  # UTF-8 of every id, offsets within the data
    except pa.ArrowInvalid as e:
        raise CacheError(f"{where}: {ROW_IDS_DATA} does not hold valid ids ({e}); {_REDO}") from e
    dup = repeated(arr)  # hashed, then equal hashes compared exactly
    if dup is not None and dup.any():
        raise CacheError(f"{where}: id {arr[int(np.argmax(dup))].as_py()!r} appears twice; {_REDO}")
    return arr


def _all_ids(keys: dict[str, Any], ids: Any) -> bool:
    """Whether every key is one of ``ids`` (vectorised: the ids are scanned once against the keys)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not keys:
        return True
    if not all(isinstance(k, str) for k in keys):
        return False
    found = pc.sum(pc.is_in(ids, value_set=pa.array(sorted(keys), pa.large_string()))).as_py() or 0
    return found == len(keys)  # ids are unique (checked), so each key is found at most once


def _validate_entry(name: Any, entry: Any, split_dir: Path, where: str, ids: Any) -> None:
    plain_name(name, where)
    field = _need(entry, "field", str, where)
    cache_key = _need(entry, "cache_key", str, where)
    if name != entry_name(field, cache_key):
        raise CacheError(f"{where}: the entry's folder must be {entry_name(field, cache_key)!r} (its field and cache_key)")
    _need(entry, "encoder", dict, where)
    _need(entry, "items_fingerprint", str, where)
    if _need(entry, "dim", int, where) < 1:
        raise CacheError(f"{where}.dim: must be positive, got {entry['dim']}")
    if _need(entry, "dtype", str, where) not in DTYPES:
        raise CacheError(f"{where}.dtype: {entry['dtype']!r} is not one of {DTYPES}")
    tokens = _need(entry, "tokens", bool, where)
    if tokens and (not _is_int(entry.get("token_dim")) or entry["token_dim"] < 1):
        raise CacheError(f"{where}.token_dim: must be a positive int when tokens are stored, got {entry.get('token_dim')!r}")
    num_items = _need(entry, "num_items", int, where)
    skipped = entry.get("skipped_rows", {})
    if not isinstance(skipped, dict) or not _all_ids(skipped, ids):
        raise CacheError(f"{where}.skipped_rows: must map row ids of this split to reasons")
    names: dict[str, int] = {}
    end = 0
    for i, shard in enumerate(_need(entry, "shards", list, where)):
        at = f"{where}.shards[{i}]"
        shard_name = plain_name(_need(shard, "name", str, at), f"{at}.name")
        if shard_name in names:
            raise CacheError(f"{at}.name: {shard_name!r} is listed twice (also shards[{names[shard_name]}]): one file would serve two item ranges")
        names[shard_name] = i
        start, count = _need(shard, "start", int, at), _need(shard, "count", int, at)
        if start != end:
            what = "a gap after" if start > end else "an overlap with"
            raise CacheError(f"{at}.start: {start}, but the shards before it end at item {end} ({what} them); shards must tile the items in order")
        if count < 1:
            raise CacheError(f"{at}.count: must be positive, got {count}")
        if tokens and (not _is_int(shard.get("token_len")) or shard["token_len"] < 1):
            raise CacheError(f"{at}.token_len: must be a positive int when tokens are stored, got {shard.get('token_len')!r}")
        end = start + count
    if end != num_items:
        raise CacheError(f"{where}.num_items: {num_items}, but the shards hold items 0..{end}")
