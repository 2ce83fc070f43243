"""The rows of a split as Arrow columns: what the cache writer and reader hold instead of row dicts.

A row dict costs ~0.6-2.5 KB of Python objects; an Arrow string column costs its bytes plus 4 per row, so
the 10M rows of a large table keep the feature cache's memory in the hundreds of MB, not tens of GB.
A :class:`~mmalign.data.sources.table.TableSource` gives its columns directly (vectorised, nothing per
row is built); any other sequence of rows is read once, 64k rows at a time.

Items (the unique values of a field, encoded once each) are found by 64-bit hashes of the values
(:func:`unique_index`), then the values of each group of equal hashes are compared exactly (a collision
splits the group instead of merging two values), numbered in first-appearance order as before, so caches
written earlier keep their ``rows.npy`` / ``items.npy``. Values that are not strings (a PIL image from an HF ``Image`` column,
a decoded array) are kept as a Python list for that field (such sources hold them anyway).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np

from mmalign.data.manifest import META_FIELDS

CHUNK = 1 << 16
#: Columns of up to this many rows are held as Python strings by the cache reader (~12 us a batch of
#: 128, ~60-100 B a row); longer ones as raw UTF-8 buffers (~9 B a row, ~1.5 us a row of a batch).
OBJECT_ROWS = 1_000_000
#: Joins a value and its ``by`` column (:meth:`RowTable.unique_index`): a unit separator, never in a path or a code.
PAIR_SEP = "\x1f"


def _value_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


class StringColumn:
    """A string column read a batch at a time from its raw buffers (offsets + UTF-8 bytes): ~9 bytes a row.

    ``take(idx)`` slices one ``bytes`` object per value (~1 us a row; one Arrow ``take`` cost 150-900 us a
    batch here). Low-cardinality columns (``lang``) are held as codes into their distinct values.
    """

    def __init__(self, column: Any, dictionary: bool = False, objects_up_to: int = OBJECT_ROWS) -> None:
        import pyarrow as pa

        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        arr = arr.cast(pa.large_string())
        self.null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool) if arr.null_count else None
        self.values = None
        if len(arr) <= objects_up_to and not dictionary:  # small splits: Python strings, the fastest batches
            self.values = np.array(arr.to_pylist() + [None], dtype=object)
            self.codes = np.arange(len(arr), dtype=np.int64)
            return
        if dictionary:
            enc = arr.dictionary_encode()
            self.values = np.array(enc.dictionary.to_pylist() + [None], dtype=object)
            self.codes = np.asarray(enc.indices.fill_null(len(self.values) - 1).to_numpy(zero_copy_only=False), dtype=np.int32)
            return
        _, offsets, data = arr.buffers()[:3]
        self.offsets = np.frombuffer(offsets, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8).copy()
        self.data = data.to_pybytes() if data is not None else b""

    def take(self, index: Any) -> list[Any]:
        index = np.asarray(index, dtype=np.int64)
        if self.values is not None:
            return self.values[self.codes[index]].tolist()
        d = self.data
        out = [d[a:b].decode() for a, b in zip(self.offsets[index].tolist(), self.offsets[index + 1].tolist())]
        if self.null is not None:
            for j in np.flatnonzero(self.null[index]).tolist():
                out[j] = None
        return out


class RowTable:
    """Columns ``id``, ``concept``, ``lang`` and the towers' fields of ``n`` rows (Arrow string arrays, nulls absent).

    Args:
        columns: ``{name: pa.Array | pa.ChunkedArray of strings}``; ``objects``: ``{name: list}`` for
            fields whose values are not strings.
    """

    def __init__(self, columns: dict[str, Any], objects: dict[str, list] | None = None) -> None:
        self.columns = columns
        self.objects = objects or {}
        self.n = len(columns["id"])

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def of(cls, rows: Any, fields: Iterable[str]) -> "RowTable":
        """The columns of ``rows`` (a RowTable, a source, its ``rows`` view, or a list of row dicts)."""
        if isinstance(rows, RowTable):
            return rows
        names = list(dict.fromkeys([*META_FIELDS, *fields]))
        source = getattr(rows, "source", rows)
        fast = getattr(source, "columns_of", None)
        if fast is not None and len(source) == len(rows):
            got = fast(names)
            if got is not None:
                return cls(*got)
        import pyarrow as pa

        chunks: dict[str, list] = {k: [] for k in names}
        objects: dict[str, list] = {}
        for a in range(0, len(rows), CHUNK):
            part = rows[a:a + CHUNK] if isinstance(rows, (list, tuple)) or hasattr(rows, "source") \
                else [rows[i] for i in range(a, min(a + CHUNK, len(rows)))]
            for k in names:
                values = [r.get(k) for r in part]
                if k in objects or any(v is not None and not isinstance(v, str) for v in values):
                    if k in META_FIELDS:
                        values = [None if v is None else str(v) for v in values]
                    else:
                        if k not in objects:  # earlier chunks were strings: move them to the object list
                            objects[k] = [v for c in chunks[k] for v in c.to_pylist()]
                        objects[k].extend(values)
                        continue
                chunks[k].append(pa.array(values, type=pa.string()))
        columns = {k: pa.chunked_array(c, type=pa.string()) for k, c in chunks.items() if k not in objects}
        return cls(columns, objects)

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def has(self, name: str) -> bool:
        return name in self.columns or name in self.objects

    def take(self, name: str, index: Any) -> list[Any]:
        """Values of column ``name`` at rows ``index`` (a list, None where absent)."""
        import pyarrow as pa

        index = np.asarray(index, dtype=np.int64)
        if name in self.objects:
            values = self.objects[name]
            return [values[i] for i in index.tolist()]
        if name not in self.columns:
            return [None] * len(index)
        return self.columns[name].take(pa.array(index)).to_pylist()

    def ids(self, index: Any = None) -> list[str]:
        return self.columns["id"].to_pylist() if index is None else self.take("id", index)

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict (for messages and small uses; never for every row)."""
        out = {k: self.take(k, [i])[0] for k in [*self.columns, *self.objects]}
        return {k: v for k, v in out.items() if v is not None}

    def rows_fingerprint(self) -> str:
        """:func:`mmalign.cache.format.rows_fingerprint` of the ids, from the column's buffers chunk by chunk."""
        return ids_fingerprint(self.columns["id"])

    def unique_index(self, name: str, by: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(first_row [M], row_index [N])``: the first row of each unique value of ``name`` in first-appearance
        order, and each row's item (``-1``: the row lacks the field).

        Values are grouped by a 64-bit hash, then every row of a group of equal hashes is compared exactly with
        the group's first row (vectorised, only where hashes repeat): two values that collide stay two items.
        ``by``: a second column that is part of an item's identity (``"lang"`` for an encoder that reads each row's
        language: one clip in two languages is two items); a row without ``name`` still has no item.
        """
        if by is not None:
            return self._paired(name, by).unique_index(name)
        if name in self.objects:
            values = self.objects[name]
            h = np.array([0 if v is None else int.from_bytes(hashlib.sha1(_value_key(v).encode("utf-8", "surrogatepass")).digest()[:8], "little")
                          for v in values], dtype=np.uint64)
            present = np.array([v is not None for v in values], dtype=bool)
            keys = [None if v is None else _value_key(v) for v in values]

            def same(rows: np.ndarray, firsts: np.ndarray) -> np.ndarray:
                return np.array([keys[a] == keys[b] for a, b in zip(rows.tolist(), firsts.tolist())], dtype=bool)

            def exact(rows: np.ndarray) -> list[Any]:
                return [keys[r] for r in rows.tolist()]
        elif name in self.columns:
            import pyarrow as pa
            import pyarrow.compute as pc

            from mmalign.data.sources import columns as colmod

            col = self.columns[name]
            h = colmod.hash_strings(col)
            present = ~np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), dtype=bool) if col.null_count else None

            def same(rows: np.ndarray, firsts: np.ndarray) -> np.ndarray:
                a, b = col.take(pa.array(rows)), col.take(pa.array(firsts))
                return np.asarray(pc.equal(a, b).to_numpy(zero_copy_only=False), dtype=bool)

            def exact(rows: np.ndarray) -> list[Any]:
                return col.take(pa.array(rows)).to_pylist()
        else:
            return np.zeros(0, np.int64), np.full(self.n, -1, np.int64)
        rows = np.arange(self.n) if present is None else np.flatnonzero(present)
        first, inverse = exact_groups(h[rows], rows, same, exact)
        order = np.argsort(first, kind="stable")  # item numbers in first-appearance order
        rank = np.empty(len(first), dtype=np.int64)
        rank[order] = np.arange(len(first))
        row_index = np.full(self.n, -1, dtype=np.int64)
        row_index[rows] = rank[inverse.reshape(-1)]
        return rows[first[order]].astype(np.int64), row_index


    def _paired(self, name: str, by: str) -> "RowTable":
        """A table whose column ``name`` holds ``(value, by)`` keys (``name`` absent -> absent; ``by`` absent -> ``und``)."""
        others = self.take(by, np.arange(self.n))
        others = ["und" if o is None else str(o) for o in others]
        if name in self.objects:
            keys = [None if v is None else f"{_value_key(v)}{PAIR_SEP}{o}" for v, o in zip(self.objects[name], others)]
            return RowTable({"id": self.columns["id"]}, {name: keys})
        if name not in self.columns:
            return RowTable({"id": self.columns["id"]})
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self.columns[name]
        col = (col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).cast(pa.large_string())
        paired = pc.binary_join_element_wise(col, pa.array(others, pa.large_string()),  # null where no value
                                             pa.scalar(PAIR_SEP, pa.large_string()))
        return RowTable({"id": self.columns["id"], name: paired})


def exact_groups(h: np.ndarray, rows: np.ndarray, same: Any, exact: Any, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """``(first [G], inverse [n])`` as ``np.unique(values, return_index=True, return_inverse=True)`` gives them for the
    exact values: rows share a group iff their values are equal (not only their hashes); one sort of the hashes.

    Args:
        h: ``[n]`` uint64 hash of each row's value.
        rows: ``[n]`` the rows (positions in the column) these hashes belong to.
        same: ``same(rows_a, rows_b) -> [k] bool``: whether the values at two row arrays are equal (vectorised).
        exact: ``exact(rows) -> list``: the values of some rows (only for groups whose hashes collided).
        chunk: Rows compared at a time (bounds the memory of the comparison).
    """
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    counts = np.bincount(inverse, minlength=len(uniq))
    check = np.flatnonzero(counts[inverse] > 1)  # rows whose hash is shared: compared with their group's first row
    check = check[check != first[inverse[check]]]
    bad_groups: set[int] = set()
    for a in range(0, len(check), chunk):
        part = check[a:a + chunk]
        eq = same(rows[part], rows[first[inverse[part]]])
        if not eq.all():
            bad_groups.update(inverse[part[~eq]].tolist())
    if not bad_groups:
        return first, inverse
    label = inverse.copy()
    if bad_groups:  # a 64-bit collision: such a group is split by exact value, one new label per distinct value
        nxt = len(uniq)
        for g in sorted(bad_groups):
            members = np.flatnonzero(inverse == g)
            seen: dict[Any, int] = {}
            for pos, value in zip(members.tolist(), exact(rows[members])):
                if value not in seen:  # the first value keeps the group's label, each other one gets a new one
                    seen[value] = g if not seen else nxt
                    nxt += 1 if len(seen) > 1 else 0
                label[pos] = seen[value]
    _, first, inverse = np.unique(label, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def id_buffers(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [N+1] int64, data [B] uint8)``: the UTF-8 bytes of a string column, concatenated, and where each value
    starts (what the cache stores as ``row_ids.offsets.npy`` / ``row_ids.utf8.npy``). Nulls are empty strings."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    offsets, data, at = [np.zeros(1, np.int64)], [], 0
    for c in chunks:
        if len(c) == 0:
            continue
        c = c.cast(pa.large_string())
        _, off, buf = c.buffers()[:3]
        o = np.frombuffer(off, dtype=np.int64, count=len(c) + 1, offset=c.offset * 8)
        raw = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
        data.append(raw[int(o[0]):int(o[-1])])
        offsets.append(o[1:] - o[0] + at)
        at += int(o[-1] - o[0])
    return np.concatenate(offsets), (np.concatenate(data) if data else np.zeros(0, np.uint8))


def ids_fingerprint(column: Any) -> str:
    """Hex digest of an id column: sha256 of the value lengths (int64) and of the UTF-8 bytes, streamed chunk by chunk
    (independent of the chunking; nothing per row is a Python object)."""
    import pyarrow as pa

    lengths, data = hashlib.sha256(), hashlib.sha256()
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for c in chunks:
        for a in range(0, len(c), CHUNK * 16):
            off, raw = id_buffers(c.slice(a, CHUNK * 16))
            lengths.update(np.diff(off).astype("<i8").tobytes())
            data.update(raw.tobytes())
    return hashlib.sha256(f"{lengths.hexdigest()}\0{data.hexdigest()}".encode()).hexdigest()[:32]


def item_by(encoder: Any) -> str | None:
    """``"lang"`` for an encoder whose features depend on each row's language (``reads_language``), else ``None``:
    the column that is part of an item's identity in the feature cache."""
    return "lang" if getattr(encoder, "reads_language", False) else None


def items_digests(table: RowTable, field: str, item_rows: np.ndarray, mode: str, by: str | None = None) -> np.ndarray:
    """:func:`item_digests` of the items first used by ``item_rows``, read 64k at a time (bounded memory); with ``by``
    (see :meth:`RowTable.unique_index`) each digest also covers the item's ``by`` value."""
    from mmalign.cache.format import item_digests

    out = np.empty(len(item_rows), dtype=np.uint64)
    for a in range(0, len(item_rows), CHUNK):
        rows = item_rows[a:a + CHUNK]
        d = item_digests(table.take(field, rows), field, mode)
        if by is not None:
            others = ["und" if o is None else str(o) for o in table.take(by, rows)]
            d = np.frombuffer(b"".join(hashlib.sha1(x.tobytes() + PAIR_SEP.encode() + o.encode("utf-8", "surrogatepass"))
                                       .digest()[:8] for x, o in zip(d, others)), dtype="<u8").astype(np.uint64)
        out[a:a + CHUNK] = d
    return out


__all__ = ["PAIR_SEP", "RowTable", "StringColumn", "exact_groups", "id_buffers", "ids_fingerprint", "item_by", "items_digests"]
