"""On-disk layout of the feature cache, dataset fingerprints and atomic file helpers.

Layout of one split (``<cache_dir>/<split>/``)::

    manifest.json                       written LAST by the merge step; a split without it is not a cache
    row_ids.offsets.npy                 [N+1] int64: where each row id starts in row_ids.utf8.npy (format 2)
    row_ids.utf8.npy                    [B] uint8: the row ids' UTF-8 bytes, concatenated
    <field>--<encoder cache_key>/       one *entry*: the features of one encoder over one field
        shard-00000.pooled.npy          [n, D]  float16 (default) or float32
        shard-00000.tokens.npy          [n, T_shard, D_tok], only when a projector uses tokens
        shard-00000.mask.npy            [n, T_shard] bool, True on real tokens
        shard-00000.json                marker written after the arrays: only marked shards are trusted
        items.npy                       [M] uint64 digest of every unique item (value + file size/mtime)
        rows.npy                        [N] int64 row -> item index

Entries store each *unique* value of a field once (e.g. the one image shared by 14 caption rows), so
the cache is keyed by (dataset fingerprint, encoder cache_key) and encodes every item exactly once.
Token sequences are padded per shard to that shard's longest sequence (``mask`` marks real tokens).

Format 2 keeps the split's row ids out of ``manifest.json`` (format 1 listed them there: ~1.2 GB of JSON read
and compared as Python strings on every open of a 10M-row split): two memory-mapped arrays hold them, checked
against the manifest's ``num_rows`` / ``row_id_bytes`` before use and compared with the dataset's id column
vectorised. A format-1 cache is refused with a message saying to re-run ``mmalign cache``, which re-encodes
nothing (its shards are kept) and rewrites only the manifest and the row-id files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from mmalign.data.manifest import PATH_FIELDS

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
#: The split's row ids: offsets into the UTF-8 bytes (format 2; fixed names, never read from the manifest).
ROW_IDS_OFFSETS = "row_ids.offsets.npy"
ROW_IDS_DATA = "row_ids.utf8.npy"
FINGERPRINT_MODES = ("stat", "content", "rows")
DTYPES = ("float16", "float32")
#: Reason under which rows with NaN/Inf features are skipped (``mmalign.data.policy``).
NON_FINITE = "non-finite features"


class CacheError(RuntimeError):
    """A feature cache is missing, unfinished, stale or does not match the recipe; the message says what."""


class DiskFullError(OSError):
    """A write ran out of space (``ENOSPC``/``EDQUOT``). The message names the file; nothing was left under its name."""


def write_error(path: Path, error: OSError) -> OSError:
    """``error`` itself, or a :class:`DiskFullError` saying that the disk is full, naming ``path``."""
    if isinstance(error, DiskFullError) or getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
        return error
    return DiskFullError(
        error.errno, f"cannot write {path}: the disk is full ({os.strerror(error.errno)}); the previous {path.name}, "
        "if any, is unchanged and no partial file was left: free some space and run the command again",
    )


def entry_name(field: str, cache_key: str) -> str:
    """Directory name of the features of encoder ``cache_key`` over ``field``."""
    return f"{field}--{cache_key}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


# -- fingerprints --------------------------------------------------------------------------------


def _item_text(field: str, value: Any, mode: str) -> bytes:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if field in PATH_FIELDS and mode != "rows":
        try:
            if mode == "stat":
                st = os.stat(text)
                text = f"{text}\0{st.st_size}\0{st.st_mtime_ns}"
            else:  # "content"
                with open(text, "rb") as f:
                    text = f"{text}\0{hashlib.file_digest(f, 'sha1').hexdigest()}"
        except OSError as e:
            raise CacheError(f"cannot fingerprint {field} file {text!r}: {e}") from e
    return text.encode("utf-8", "surrogatepass")


def unique_items(rows: Sequence[dict[str, Any]], field: str) -> tuple[list[Any], np.ndarray]:
    """Unique values of ``field`` in first-appearance order and the row -> item index ``[N]``.

    A row without the field (a partial-modality row) maps to ``-1``: no item, the tower reading it is absent.
    """
    index: dict[str, int] = {}
    items: list[Any] = []
    row_index = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        value = row.get(field)
        if value is None:
            row_index[i] = -1
            continue
        key = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        j = index.get(key)
        if j is None:
            j = index[key] = len(items)
            items.append(value)
        row_index[i] = j
    return items, row_index


def item_digests(items: Sequence[Any], field: str, mode: str) -> np.ndarray:
    """``[M]`` uint64 digest per item: its value, plus file size/mtime (``stat``) or bytes (``content``)."""
    if mode not in FINGERPRINT_MODES:
        raise ValueError(f"fingerprint mode must be one of {FINGERPRINT_MODES}, got {mode!r}")
    sha1, plain = hashlib.sha1, field not in PATH_FIELDS or mode == "rows"  # plain: a string value is hashed alone
    digests = b"".join(sha1(v.encode("utf-8", "surrogatepass") if plain and isinstance(v, str) else _item_text(field, v, mode))
                       .digest()[:8] for v in items)  # one tight pass, no per-item array write
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)  # the first 8 digest bytes, little-endian


def digest(*parts: Any) -> str:
    """Hex sha256 of strings / arrays (arrays by their bytes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def rows_fingerprint(row_ids: Sequence[str]) -> str:
    """Digest of the ordered row ids (the same value as :meth:`~mmalign.cache.rowtable.RowTable.rows_fingerprint`)."""
    import pyarrow as pa

    from mmalign.cache.rowtable import ids_fingerprint

    return ids_fingerprint(pa.array(list(row_ids), pa.large_string()))


# -- atomic files --------------------------------------------------------------------------------


_HOST = socket.gethostname().replace(".", "_") or "host"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.tmp")


def remove_dead_tmp(folder: Path) -> int:
    """Delete temporary files left in ``folder`` by killed writers of this host; returns how many.

    Temporary names carry the host and pid of their writer (``.<name>.<host>-<pid>.tmp``); files of
    live processes and of other hosts (shared disks) are left alone. A file that cannot be deleted
    (read-only storage) is left too: it is never read, only replaced.
    """
    removed = 0
    for tmp in folder.glob(f".*.{_HOST}-*.tmp"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1][: -len(".tmp")])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            continue
        removed += 1
    return removed


def remove_dead_tmp_tree(split_dir: Path) -> int:
    """:func:`remove_dead_tmp` at every level a writer writes: the cache folder, the split, each entry."""
    folders = [split_dir.parent, split_dir] + ([p for p in split_dir.iterdir() if p.is_dir()] if split_dir.is_dir() else [])
    return sum(remove_dead_tmp(f) for f in folders if f.is_dir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    A kill, an exception or a full disk at any point leaves ``path`` as it was (or absent) and no
    partial file under its name; the temporary file is deleted (or, after a kill, by the next run).

    Raises:
        DiskFullError: The disk filled up (the message names ``path`` and says so).
    """
    path = Path(path)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` through a temporary file + ``os.replace`` (never half a file)."""
    atomic_write(path, lambda f: np.save(f, array))


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON at ``path``, or None when it is missing or unreadable (a marker that is not there)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- diagnostics ---------------------------------------------------------------------------------


def spec_diff(cached: dict[str, Any], current: dict[str, Any]) -> str:
    """``"pool: cached 'head', now 'avg'; ..."`` for the keys where two encoder specs differ."""
    keys = sorted(set(cached) | set(current))
    parts = [f"{k}: cached {cached.get(k)!r}, now {current.get(k)!r}" for k in keys if cached.get(k) != current.get(k)]
    return "; ".join(parts) or "specs are equal but the cache keys differ (encoder class renamed?)"


def ids_difference(cached: Any, current: Any) -> str | None:
    """How two ordered Arrow id columns differ (None when equal), naming the first differing row.

    Compared vectorised chunk by chunk (no Python string per row); the counts of ids gone / new come from
    64-bit hashes of the ids (a message only: equality itself is exact).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = current.chunks if isinstance(current, pa.ChunkedArray) else [current]
    n_cached, n_current = len(cached), sum(len(c) for c in chunks)
    first, at = None, 0
    for c in chunks:
        k = min(len(c), max(0, n_cached - at))
        if k:
            eq = pc.equal(cached.slice(at, k), c.slice(0, k).cast(cached.type))
            eq = np.asarray(eq.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
            if not eq.all():
                first = at + int(np.argmin(eq))
                break
        at += len(c)
    if first is None and n_cached == n_current:
        return None
    if first is None:
        first = min(n_cached, n_current)
    cur = pa.chunked_array(chunks, type=chunks[0].type) if chunks else pa.chunked_array([], pa.string())

    def at_row(arr: Any, i: int) -> str:
        return repr(arr[i].as_py()) if i < len(arr) else "(no row)"

    from mmalign.data.sources.columns import hash_strings

    hc, hn = hash_strings(cached), hash_strings(cur)
    gone, new = np.flatnonzero(~np.isin(hc, hn)), np.flatnonzero(~np.isin(hn, hc))
    parts = [f"the cache has {n_cached} rows, the dataset {n_current}"]
    if len(gone):
        parts.append(f"{len(gone)} cached ids are gone (e.g. {cached.take(pa.array(gone[:3])).to_pylist()})")
    if len(new):
        parts.append(f"{len(new)} ids are new (e.g. {cur.take(pa.array(new[:3])).to_pylist()})")
    if not len(gone) and not len(new):
        parts.append("same ids in another order")
    parts.append(f"first differing row {first}: cached id {at_row(cached, first)}, now {at_row(cur, first)}")
    return "; ".join(parts)


def first_difference(cached: Sequence[str], current: Sequence[str]) -> str:
    """Human description of how two ordered row-id lists differ."""
    removed = sorted(set(cached) - set(current))
    added = sorted(set(current) - set(cached))
    parts = [f"the cache has {len(cached)} rows, the dataset {len(current)}"]
    if removed:
        parts.append(f"{len(removed)} cached ids are gone (e.g. {removed[:3]})")
    if added:
        parts.append(f"{len(added)} ids are new (e.g. {added[:3]})")
    if not removed and not added:
        i = next(k for k, (a, b) in enumerate(zip(cached, current)) if a != b)
        parts.append(f"same ids in another order (row {i}: cached {cached[i]!r}, now {current[i]!r})")
    return "; ".join(parts)
