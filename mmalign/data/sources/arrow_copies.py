"""Converted Arrow copies of the sources: where they live, how they are named and staged, and the converters
(Parquet row group by row group; CSV/JSONL tables streamed in small blocks, a JSONL whose keys or types change
late read piece by piece and unified). Split out of :mod:`mmalign.data.sources.table`, which maps the copies.

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


def _json_pieces(path: Path, size: int) -> Iterable[bytes]:
    """The file in pieces of about ``size`` bytes that end at a line end (a JSON line never holds a raw newline)."""
    with open(path, "rb") as f:
        tail = b""
        while data := f.read(size):
            data = tail + data
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            if cut:
                yield data[:cut]
        if tail:
            yield tail


def json_by_pieces(path: Path, write: Any, tmp: Path, piece: int = 32 << 20) -> None:
    """A JSONL whose columns or types change after the first block: each line-aligned piece is read with its own type
    inference and spilled to a temporary Arrow file, the piece schemas are unified (a key first seen late, null ->
    string, int -> float, struct fields merged) and every piece is written cast to the union: one parse, memory bounded
    by a piece. Types that do not unify (a string in one piece, a number in another) raise (the file goes to the row
    reader)."""
    import pyarrow as pa
    import pyarrow.json as pajson

    spills, schemas = [], []
    try:
        for k, data in enumerate(_json_pieces(path, piece)):
            table = pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(block_size=len(data) + 1, use_threads=False))
            spill = tmp.with_name(f"{tmp.name}.{k}")
            spills.append(spill)
            with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            schemas.append(table.schema)
            del table, data
        schema = pa.unify_schemas(schemas, promote_options="permissive")

        def batches() -> Iterable[Any]:
            for spill in spills:
                part = _map_ipc(spill)
                cols = [part.column(f.name).cast(f.type) if f.name in part.column_names else pa.nulls(len(part), f.type)
                        for f in schema]
                yield from pa.table(cols, schema=schema).to_batches(max_chunksize=1 << 20)

        write(batches(), schema)
    finally:
        for spill in spills:
            spill.unlink(missing_ok=True)


#: Streamed CSV/JSONL tables: Arrow's readers read up to 32 blocks ahead, so the block bounds the conversion's memory;
#: CSV column types are inferred from the first ``_SNIFF`` bytes, as one block of that size would infer them.
_TEXT_BLOCK = 4 << 20
_TEXT_PIECE = 32 << 20
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


def text_table_as_arrow(path: Path, fmt: str) -> Path:
    """An Arrow IPC copy of a CSV or JSONL table, converted block by block (bounded memory), to be memory-mapped.

    CSV column types come from the first 64 MB; a JSONL whose keys or types change after its first block is read
    piece by piece and unified (:func:`json_by_pieces`).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    out, tmp = derived_copy(path, fmt)
    if tmp is None:
        return out

    def write(batches: Iterable[Any], schema: Any) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    try:
        if fmt == "csv":
            types = _csv_types(path, _SNIFF)
            reader = pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(block_size=_TEXT_BLOCK if types else _SNIFF),
                                    convert_options=pacsv.ConvertOptions(strings_can_be_null=True, column_types=types))
            write(reader, reader.schema)
        else:
            try:
                reader = pajson.open_json(str(path), read_options=pajson.ReadOptions(block_size=_TEXT_BLOCK))
                write(reader, reader.schema)
            except pa.ArrowInvalid as e:
                if not any(m in str(e) for m in ("unexpected field", "changed from", "Failed to convert JSON")):
                    raise
                json_by_pieces(path, write, tmp, _TEXT_PIECE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{path}: cannot be read as a {fmt} table ({e}); as a long-format manifest (a plain path "
                          "without fields/root/lang) every bad line is named instead") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    release_memory()
    os.replace(tmp, out)
    return out
