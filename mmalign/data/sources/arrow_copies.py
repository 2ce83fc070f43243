"""Converted Arrow copies of the sources: where they live, how they are named and staged, and the converters
(Parquet row group by row group; CSV/JSONL tables streamed in small blocks, a JSONL in line-aligned pieces whose
schemas are unified when its keys or types change late). Split out of :mod:`mmalign.data.sources.table`, which maps the copies.

Every copy is written to a temporary name and ``os.replace``-d onto its key (path, size, mtime), so a reader
never sees a half-written file under a good name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

from mmalign.data.sources.base import SourceError


def arrow_cache_dir() -> Path:
    return Path(os.environ.get("MMALIGN_ARROW_CACHE", Path.home() / ".cache" / "mmalign" / "arrow"))


def derived_copy(path: Path, tag: str | None = None, suffix: str = ".arrow") -> tuple[Path, Path | None]:
    """``(out, tmp)``: where a converted copy of ``path`` lives under :func:`arrow_cache_dir`, named by its stem and
    a hash of ``tag``, its resolved path, size and mtime (a changed file gets a new copy). ``tmp`` is ``None`` when
    the copy is already there; else the folder exists and ``tmp`` is the temporary name beside ``out`` to write and
    then ``os.replace`` onto it (never a half-written file under the good name)."""
    st = path.stat()
    prefix = f"{tag}\0" if tag is not None else ""
    key = hashlib.sha256(f"{prefix}{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    out = arrow_cache_dir() / f"{path.stem}-{key}{suffix}"
    if out.is_file():
        return out, None
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, out.with_name(f".{out.name}.{os.getpid()}.tmp")


def release_memory() -> None:
    """Hand the Arrow memory pool's freed pages back to the OS after a conversion: mimalloc keeps them otherwise
    (a 10M-row Parquet conversion left ~460 MB held, and the checks after it peaked on top: +897 MB, now +522 MB)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _map_ipc(path: Path):
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()  # HF writes the stream format


def parquet_as_arrow(path: Path) -> Path:
    """An Arrow IPC copy of a Parquet file (written once, row group by row group), to be memory-mapped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, tmp = derived_copy(path)
    if tmp is None:
        return out
    pf = pq.ParquetFile(str(path))
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=1 << 20):  # few large batches: few chunks to search per row
            writer.write_batch(batch)
    del pf
    release_memory()
    os.replace(tmp, out)
    return out


def _json_pieces(path: Path, size: int) -> Iterable[tuple[int, Any]]:
    """``(offset, piece)``: the file in ``pyarrow.Buffer`` pieces of about ``size`` bytes that end at a line end (a
    JSON line never holds a raw newline; a line longer than ``size`` is one piece). No copy: each piece is a slice of
    one read, the next read starts at its end."""
    import pyarrow as pa

    with open(path, "rb") as f:
        offset = 0
        while True:
            n = size
            f.seek(offset)
            data = f.read(n)
            cut = data.rfind(b"\n") + 1
            while not cut and len(data) == n:  # a line longer than the piece: read more of it
                n *= 2
                f.seek(offset)
                data = f.read(n)
                cut = data.rfind(b"\n") + 1
            if not data:
                return
            cut = cut or len(data)  # the last line, without a newline
            yield offset, pa.py_buffer(data).slice(0, cut)
            offset += cut


def _line_of(path: Path, offset: int, piece: Any, message: str) -> int | None:
    """The 1-based file line of the line of ``piece`` (at byte ``offset``) that Arrow refused: its ``in row N`` (rows
    are the piece's non-blank lines), else the first line that is not a JSON object. Only on an error path."""
    import json
    import re

    lines = piece.to_pybytes().split(b"\n")
    found = re.search(r"in row (\d+)", message)
    k = None
    if found:
        rows = [i for i, line in enumerate(lines) if line.strip()]
        k = rows[int(found.group(1))] if int(found.group(1)) < len(rows) else None
    if k is None:
        for i, line in enumerate(lines):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    k = i
            except ValueError:
                k = i
            if k is not None:
                break
    return None if k is None else _lines_before(path, offset) + k + 1


def _lines_before(path: Path, offset: int) -> int:
    """How many lines of the file end before byte ``offset`` (one pass up to it; only on an error path)."""
    before = 0
    with open(path, "rb") as f:
        while offset > 0 and (data := f.read(min(offset, 64 << 20))):
            before += data.count(b"\n")
            offset -= len(data)
    return before


def _has_temporal(schema: Any) -> bool:
    """Whether a type inferred from text (timestamp, date, time) is anywhere in ``schema``, nested included."""
    return any(_text_type(f.type) != f.type for f in schema)


def _text_type(t: Any) -> Any:
    """``t`` with every temporal type (inferred from a string that looked like a date or time) replaced by
    ``string``, in lists and structs too."""
    import pyarrow as pa

    if pa.types.is_temporal(t):
        return pa.string()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return (pa.large_list if pa.types.is_large_list(t) else pa.list_)(t.value_field.with_type(_text_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_text_type(t.field(i).type)) for i in range(t.num_fields)])
    return t


def _as_text_schema(schema: Any) -> Any:
    """``schema`` with its temporal types read as strings (:func:`_text_type`), field order kept."""
    import pyarrow as pa

    return pa.schema([f.with_type(_text_type(f.type)) for f in schema])


def _line_not_utf8(data: bytes) -> int | None:
    """The 1-based line of ``data`` holding the first bytes that are not UTF-8 (None: every line decodes). Only on an
    error path."""
    for k, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return k
    return None


def _json_piece(path: Path, offset: int, data: Any, known: Any, validate: bool) -> Any:
    """One line-aligned piece as a table: read with the columns and types seen so far (``known``; a new key inferred,
    as the streaming reader reads every block after its first), else, where a value does not fit them, with the
    piece's own inference (its schema is then unified with the others). A piece neither reads raises naming the
    file line; with ``validate`` one whose strings are not UTF-8 (``pyarrow.json`` keeps such bytes) raises too,
    naming the line. Strings Arrow would infer as timestamps (``"2024-01-02"``) are kept as the strings they are."""
    import pyarrow as pa
    import pyarrow.json as pajson

    options = pajson.ReadOptions(block_size=data.size + 1, use_threads=False)
    table = None
    if known is not None:
        try:
            table = pajson.read_json(pa.BufferReader(data), read_options=options, parse_options=pajson.ParseOptions(
                explicit_schema=known, unexpected_field_behavior="infer"))
        except pa.ArrowInvalid:
            pass
    if table is None:
        try:
            table = pajson.read_json(pa.BufferReader(data), read_options=options)
        except pa.ArrowInvalid as e:
            line = _line_of(path, offset, data, str(e))
            if line is None:
                raise
            raise pa.ArrowInvalid(f"line {line}: {e}") from e
    if _has_temporal(table.schema):  # "2024-01-02" inferred as a timestamp: re-read as the string it is
        table = pajson.read_json(pa.BufferReader(data), read_options=options, parse_options=pajson.ParseOptions(
            explicit_schema=_as_text_schema(table.schema), unexpected_field_behavior="infer"))
    if validate:
        try:
            table.validate(full=True)
        except pa.ArrowInvalid as e:
            line = _line_not_utf8(data.to_pybytes())
            if line is None:
                raise
            raise pa.ArrowInvalid(f"line {_lines_before(path, offset) + line}: bytes that are not UTF-8 ({e})") from e
    return table


def _json_tables(path: Path, size: int, threads: bool, validate: bool) -> Iterable[Any]:
    """The pieces of a JSONL as tables, in file order (empty pieces left out), each read with the union of the
    schemas before it; with ``threads`` read on Arrow's CPU count of threads, a few pieces ahead of the consumer
    (memory bounded by those pieces). Types that do not unify (a string in one piece, a number in another) raise."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    known = None

    def seen(table: Any, offset: int, data: Any) -> Any:
        nonlocal known
        if known is None:
            known = table.schema
        elif not table.schema.equals(known):
            try:
                known = pa.unify_schemas([known, table.schema], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                first = _lines_before(path, offset) + 1
                last = first + data.to_pybytes().rstrip(b"\n").count(b"\n")
                raise type(e)(f"lines {first}-{last}: types that do not unify with the lines before ({e})") from e
        return table

    pieces = _json_pieces(path, size)
    if not threads:
        for offset, data in pieces:
            table = _json_piece(path, offset, data, known, validate)
            if table.num_rows:
                yield seen(table, offset, data)
        return
    workers = max(1, pa.cpu_count())
    with ThreadPoolExecutor(workers) as pool:  # read_json releases the GIL
        ahead: deque = deque()
        try:
            for offset, data in pieces:
                ahead.append((offset, data, pool.submit(_json_piece, path, offset, data, known, validate)))
                if len(ahead) > 2 * workers:
                    at, piece, future = ahead.popleft()
                    table = future.result()
                    if table.num_rows:
                        yield seen(table, at, piece)
            while ahead:
                at, piece, future = ahead.popleft()
                table = future.result()
                if table.num_rows:
                    yield seen(table, at, piece)
        finally:
            for _, _, future in ahead:
                future.cancel()


def json_as_arrow(path: Path, write: Any, tmp: Path, block: int, threads: bool = True, validate: bool = False) -> None:
    """A JSONL converted in one parse, in line-aligned pieces of about ``block`` bytes: ``write(batches, schema)``
    writes ``tmp``; with ``validate`` every piece's strings are checked as UTF-8 once, on the reading threads.

    The first piece's inferred schema is kept while every piece has it (the common case: batches go straight to
    ``write``). A key or type first seen later (a key first seen late, null -> string, int -> float, a struct gaining a
    key) does not restart the read, as Arrow's streaming reader would have to: what was written so far and the
    pieces after it are kept as temporary Arrow files, one per schema, and ``write`` is given all of them cast to the
    union of their schemas (one parse, one more write, memory bounded by a few pieces). Before, a 10M-row file with
    one key first seen on its last line was parsed twice (18.2 CPU s instead of 7.8, docs/data.md).

    Raises:
        pyarrow.ArrowInvalid: A line that is not JSON (``line N: ...``), an empty file, bytes that are not UTF-8
            (with ``validate``).
        pyarrow.ArrowTypeError: Types that do not unify.
    """
    import pyarrow as pa

    tables = iter(_json_tables(path, block, threads, validate))
    spills: list[Path] = []
    try:
        first = next(tables, None)
        if first is None:
            raise pa.ArrowInvalid(f"{path}: Empty JSON stream")
        changed: list[Any] = []

        def same_schema() -> Iterable[Any]:
            yield from first.to_batches()
            for table in tables:
                if not table.schema.equals(first.schema):
                    changed.append(table)
                    return
                yield from table.to_batches()

        write(same_schema(), first.schema)
        if not changed:
            return
        spills.append(tmp.with_name(f"{tmp.name}.0"))
        os.replace(tmp, spills[0])
        schemas = [first.schema]
        sink = writer = None
        try:
            for table in [changed[0], *tables]:
                if writer is None or not table.schema.equals(schemas[-1]):
                    if writer is not None:
                        writer.close()
                        sink.close()
                    spills.append(tmp.with_name(f"{tmp.name}.{len(spills)}"))
                    schemas.append(table.schema)
                    sink = pa.OSFile(str(spills[-1]), "wb")
                    writer = pa.ipc.new_file(sink, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        schema = pa.unify_schemas(schemas, promote_options="permissive")

        def cast() -> Iterable[Any]:
            for spill in spills:  # read batch by batch, not mapped: the pages of a mapped spill count in the RSS
                with pa.OSFile(str(spill), "rb") as source:
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        part = reader.get_batch(i)
                        cols = [part.column(f.name).cast(f.type) if f.name in part.schema.names
                                else pa.nulls(len(part), f.type) for f in schema]
                        yield pa.record_batch(cols, schema=schema)

        write(cast(), schema)
    finally:
        close = getattr(tables, "close", None)
        if close is not None:
            close()
        for spill in spills:
            spill.unlink(missing_ok=True)


#: Streamed CSV/JSONL tables: Arrow's CSV reader reads up to 32 blocks ahead, so the block bounds the conversion's
#: memory (a JSONL is read in pieces of this size, a few ahead); CSV column types are inferred from the first
#: ``_SNIFF`` bytes, as one block of that size would infer them.
_TEXT_BLOCK = 4 << 20
_SNIFF = 64 << 20


def _csv_types(path: Path, size: int) -> dict[str, Any] | None:
    """``{column: type}`` that ``pyarrow.csv`` infers from the whole rows in the first ``size`` bytes (None: no
    complete row there, or repeated column names: the caller streams with one large block instead)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, "rb") as f:
        head = f.read(size)
        more = bool(f.read(1))
    cut = head.rfind(b"\n") + 1 if more else len(head)
    if cut == 0:
        return None
    schema = pacsv.read_csv(pa.BufferReader(head[:cut]), read_options=pacsv.ReadOptions(block_size=cut + 1),
                            convert_options=pacsv.ConvertOptions(strings_can_be_null=True)).schema
    return None if len(set(schema.names)) != len(schema.names) else {f.name: f.type for f in schema}


def _file_line_not_utf8(path: Path) -> int | None:
    """The 1-based line of the file holding its first bytes that are not UTF-8 (a line end is never inside a UTF-8
    character). Only on an error path."""
    with open(path, "rb") as f:
        for k, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return k
    return None


def _csv_column_types(inferred: Any, strings: Iterable[str]) -> dict[str, Any]:
    """``{column: type}`` for the CSV reader: ``strings`` as strings, and as strings too every column Arrow inferred
    as a date, time or timestamp (``"2024-01-02"``, ``"12:30"``: the cell is kept exactly) or as binary (bytes that
    are not UTF-8: read as strings, they raise, and the line is named)."""
    import pyarrow as pa

    types = {c: pa.string() for c in strings}
    for name, t in inferred.items():
        if name not in types:
            types[name] = pa.string() if pa.types.is_temporal(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) else t
    return types


def text_table_as_arrow(path: Path, fmt: str, strings: Iterable[str] = ()) -> Path:
    """An Arrow IPC copy of a CSV or JSONL table, converted block by block (bounded memory), to be memory-mapped.

    CSV column types come from the first 64 MB, except that the columns ``strings`` (those the manifest fields read)
    and columns that look like dates or times are read as the strings they are; a JSONL whose keys or types change
    after its first block is unified without a second parse (:func:`json_as_arrow`), its date-like strings kept as
    strings too. Bytes that are not UTF-8 raise naming the file and line (as a manifest's do).

    Raises:
        SourceError: The file cannot be read (the line named where it can be); no copy is left under a good name.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    strings = sorted(set(strings)) if fmt == "csv" else []
    # v2: no temporal types, the CSV field columns as strings (a copy made before is not reused)
    out, tmp = derived_copy(path, "\0".join([f"{fmt}-text-v2", *strings]))
    if tmp is None:
        return out

    def write(batches: Iterable[Any], schema: Any) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    try:
        if fmt == "csv":
            inferred = _csv_types(path, _SNIFF)
            read_options = pacsv.ReadOptions(block_size=_TEXT_BLOCK if inferred else _SNIFF)

            def open_csv(types: dict[str, Any]) -> Any:
                return pacsv.open_csv(str(path), read_options=read_options,
                                      convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=types))

            types = _csv_column_types(inferred or {}, strings)
            reader = open_csv(types)
            if inferred is None:  # inferred by the reader from its first block: the same rules applied to it
                fixed = _csv_column_types({f.name: f.type for f in reader.schema}, strings)
                if any(fixed[f.name] != f.type for f in reader.schema):
                    reader = open_csv(fixed)
            write(reader, reader.schema)
        else:
            json_as_arrow(path, write, tmp, _TEXT_BLOCK, validate=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        tmp.unlink(missing_ok=True)
        detail = str(e)
        if fmt == "csv" and "utf8" in detail.lower().replace("-", ""):
            line = _file_line_not_utf8(path)
            detail = detail if line is None else f"line {line}: bytes that are not UTF-8 ({detail})"
        raise SourceError(f"{path}: cannot be read as a {fmt} table ({detail}); as a long-format manifest (a plain path "
                          "without fields/root/lang) every bad line is named instead") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    release_memory()
    os.replace(tmp, out)
    return out
