"""Long-format ``.jsonl`` / ``.csv`` manifests read vectorised (``pyarrow.json`` / ``pyarrow.csv``) into a mapped Arrow table.

The row-by-row reader (:class:`~mmalign.data.manifest.ManifestDataset`) costs ~25-340 us and ~1-2.5 KB of Python
objects a row: a 10M-row manifest would take the better part of an hour and ~10-25 GB. Here the file is converted
once, streamed in 4 MB blocks (bounded memory), to an Arrow IPC file under ``$MMALIGN_ARROW_CACHE`` (keyed by path,
size, mtime), memory-mapped from then on, and checked vectorised as a :class:`~mmalign.data.sources.table.TableSource` is, with
the manifest reader's rules and messages: errors name ``<file>:<line>`` (1-based physical lines, blank lines
counted), the id and the field (duplicate ids say ``first seen on line N``, unknown languages suggest a code),
required fields are checked only on the rows of the requested languages, and under ``on_error="error"`` a
duplicate id or unknown language is raised before a field problem, as the row reader does.

Files the vectorised reader cannot read exactly as the row reader would are handed to the row reader instead
(:class:`ManifestFallback`): a line that is not UTF-8, not JSON or not an object, a key given twice, a value
whose type changes between lines, a ragged or duplicate CSV header, or a list/object where the manifest fields
(``id``, ``concept``, ``lang``, ``text``, ``text_en``, ``image``, ``audio``) hold strings. That reader names the bad
line exactly (and is the slow path: such files cost what they cost before). Line numbers of the vectorised path
are computed only when a row is reported (one pass over the file), never on a clean open.

:func:`mmalign.data.sources.open_source` uses this reader for plain manifest paths of at least
``MMALIGN_MANIFEST_TABLE_BYTES`` bytes (default 8 MB, ~80k rows); smaller files keep the row reader, which is
as fast there and leaves no Arrow copy behind.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mmalign.data.langs import unknown_language_detail
from mmalign.data.manifest import ManifestRowError
from mmalign.data.sources.arrow_copies import _map_ipc, derived_copy, json_as_arrow, release_memory
from mmalign.data.sources.table import DEFAULT_FIELDS, TableSource

#: Plain manifest paths of at least this many bytes are read by :class:`ManifestTableSource`.
TABLE_BYTES = 8 << 20
#: Block of the streamed CSV reader (it reads up to 32 blocks ahead: ~128 MB at most) and piece of the JSONL reader.
_BLOCK = 4 << 20
_THREADS = True


def table_bytes() -> int:
    """The size from which :func:`~mmalign.data.sources.open_source` reads a plain manifest vectorised."""
    return int(os.environ.get("MMALIGN_MANIFEST_TABLE_BYTES", TABLE_BYTES))


class ManifestFallback(Exception):
    """The vectorised reader cannot read this file exactly as the row reader would (the message says why)."""


def _csv_header(path: Path) -> list[str]:
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not only a character cut by the 1 MB window
            raise ManifestFallback(f"bytes that are not UTF-8 near the start ({e})") from e
        text = head[:e.start].decode("utf-8-sig")
    header = next(csv.reader(io.StringIO(text, newline="")), [])
    if len(set(header)) != len(header) or any(not h for h in header):
        raise ManifestFallback("an empty or repeated CSV column name")
    return header


def manifest_as_arrow(path: Path, fmt: str) -> Path:
    """An Arrow IPC copy of a ``.jsonl``/``.csv`` manifest (CSV cells as strings, as ``csv.DictReader`` gives them).

    Read streamed in small blocks: Arrow's CSV reader reads up to 32 blocks ahead of the consumer, so the block size
    bounds the peak memory of the conversion (with 64 MB blocks a 10M-row JSONL peaked at +1.5 GB); a JSONL is read
    in pieces of that size, a few ahead (:func:`~mmalign.data.sources.arrow_copies.json_as_arrow`).

    Raises:
        ManifestFallback: The file needs the row reader (a bad line, a changing type...).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    out, tmp = derived_copy(path, f"manifest-{fmt}")
    if tmp is None:
        return out

    def write(batches: Iterable[Any], schema: Any, validate: bool = True) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                if validate:  # bytes that are not UTF-8: refused here (to the row reader)
                    batch.validate(full=True)
                writer.write_batch(batch)

    try:
        if fmt == "csv":
            header = _csv_header(path)
            reader = pacsv.open_csv(
                str(path), read_options=pacsv.ReadOptions(block_size=_BLOCK, use_threads=_THREADS),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types={h: pa.string() for h in header}))
            write(reader, reader.schema)
        else:  # one parse in pieces; a key first seen late or a type widening later (int -> float) unified
            # pyarrow.json keeps bytes that are not UTF-8: refused (to the row reader) as each piece is read
            json_as_arrow(path, lambda batches, schema: write(batches, schema, False), tmp, _BLOCK, _THREADS, validate=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeDecodeError, csv.Error) as e:
        tmp.unlink(missing_ok=True)
        raise ManifestFallback(str(e)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    release_memory()  # the readers' freed blocks: the checks that follow would peak on top of them
    os.replace(tmp, out)
    return out


def _check_types(table: Any) -> None:
    """Refuse (to the row reader) columns of the manifest fields that do not hold strings (or integer ids)."""
    import pyarrow as pa

    for name in DEFAULT_FIELDS:
        if name not in table.column_names:
            continue
        t = table.column(name).type
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or (
            name in ("id", "concept") and pa.types.is_integer(t))
        if not ok:
            raise ManifestFallback(f"column {name!r} holds {t}, not strings")


class ManifestTableSource(TableSource):
    """A long-format ``.jsonl``/``.csv`` manifest as a mapped Arrow table, checked as the row reader checks it.

    Args:
        path: The manifest.
        languages, required_fields, on_error, check_files: As :class:`~mmalign.data.manifest.ManifestDataset`.

    Raises:
        ManifestFallback: The file must be read by the row reader (:func:`open_source` does that).
        ManifestRowError: Under ``on_error="error"``, the first bad row (``<file>:<line>``, id, field).
    """

    def __init__(self, path: str | Path, languages: Iterable[str] | None = None, required_fields: Iterable[str] = (),
                 on_error: str = "error", check_files: bool = True) -> None:
        path = Path(path)
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
        self._lines: dict[int, int] = {}
        super().__init__(path, fmt, None, None, None, languages=languages, required_fields=required_fields,
                         on_error=on_error, check_files=check_files)

    def _open(self) -> None:
        path, fmt = self._open_args[0], self._open_args[1]
        self.table = _map_ipc(manifest_as_arrow(path, fmt))
        _check_types(self.table)
        self._cols = {}

    # -- the row reader's messages -----------------------------------------------------------------
    def _first_problem(self, problems: list) -> Any:
        """As the row reader: a duplicate id or unknown language (read with the rows) before any field problem."""
        stage = {"id": 0, "lang": 0}
        return min(problems, key=lambda p: (stage.get(p[1], 1), int(np.argmax(p[0]))))

    def _report_problems(self, problems: list, on_error: str) -> None:
        rows = np.unique(np.concatenate([np.flatnonzero(p[0]) for p in problems])) if problems else np.zeros(0, np.int64)
        if not len(rows):
            return
        dup_first = self._first_rows(rows, problems)
        self._lines = self._line_numbers(np.union1d(rows, np.array(sorted(set(dup_first.values())), dtype=np.int64)))
        for mask, field, reason, detail in problems:
            for i in np.flatnonzero(mask).tolist():
                if reason == "duplicate id" and i in dup_first:
                    detail = f"first seen on line {self._lines[dup_first[i]]}"
                elif reason == "unknown language":
                    detail = unknown_language_detail(self._value(self.fields["lang"], i))
                elif reason == "empty text":
                    detail = f"{self._value(self.fields[field], i)!r} has no visible character"
                elif reason == f"missing {field}":
                    detail = ""
                self.report.handle(ManifestRowError(self.path, self._lines[i], self._base_id(i), field, reason, detail), on_error)

    def _value(self, column: str, i: int) -> Any:
        return self._col(column).value(i)

    def _first_rows(self, rows: np.ndarray, problems: list) -> dict[int, int]:
        """``{row: first row with the same id}`` for the rows reported as duplicate ids."""
        import pyarrow as pa
        import pyarrow.compute as pc

        masks = [p[0] for p in problems if p[2] == "duplicate id"]
        if not masks or self._id_col is None:
            return {}
        dup = np.flatnonzero(np.logical_or.reduce(masks))
        col = self.table.column(self._id_col)
        first = pc.index_in(col.take(pa.array(dup)), value_set=col.combine_chunks())  # the first row of each value
        return dict(zip(dup.tolist(), first.to_pylist()))

    def _line_numbers(self, rows: np.ndarray) -> dict[int, int]:
        """``{row: 1-based line}`` of the given table rows: one pass over the file, up to the last of them."""
        want = set(rows.tolist())
        last = max(want)
        out: dict[int, int] = {}
        if self._open_args[1] == "csv":
            with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
                reader = csv.reader(f)
                next(reader, None)  # the header
                k = 0
                for record in reader:
                    if not record:  # an empty line is no row (as csv.DictReader)
                        continue
                    if k in want:
                        out[k] = reader.line_num
                    k += 1
                    if k > last:
                        break
        else:
            with open(self.path, "rb") as f:
                k = 0
                for lineno, data in enumerate(f, 1):
                    if not data.strip():
                        continue
                    if k in want:
                        out[k] = lineno
                    k += 1
                    if k > last:
                        break
        return out


__all__ = ["ManifestFallback", "ManifestTableSource", "manifest_as_arrow", "table_bytes"]
