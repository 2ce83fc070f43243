"""Columnar sources: Parquet, Arrow/Feather, Hugging Face ``save_to_disk`` folders and cached datasets, wide CSVs.

Over 400 lines on purpose: every columnar format shares one memory-mapped row view, its cached row checks and
the wide-table column mapping.

The table stays in Arrow memory: Arrow IPC files (and HF folders, which are Arrow streams) are memory-mapped,
so a 10M-row table costs pages of the OS cache, not Python objects, and DataLoader workers (forked or spawned:
the source pickles as its path and reopens) share those pages. A Parquet file is compressed and cannot be
mapped: it is converted once, row group by row group (bounded memory), to an Arrow file in
``$MMALIGN_ARROW_CACHE`` (default ``~/.cache/mmalign/arrow``) keyed by its path, size and mtime.

Rows are built on access (``source[i]``) from a column mapping (``fields``)::

    fields: {id: key, image: file_name, text: {de: caption_de, en: [caption_en_1, caption_en_2]}}

A ``text`` mapping by language makes a *wide* table long: one row per (table row, language, caption), all
captions of a table row sharing its concept (the ``concept`` column, else the row's id), so they are each
other's positives in retrieval; an empty cell is no caption. A column holding a list of strings gives one row
per element. Media columns (``image``, ``audio``) hold paths, resolved relative to ``root`` (default: the
table's folder), or HF ``Image``/``Audio`` structs (``{bytes, path}``: bytes become a PIL image, an audio
path is resolved). Rows are checked as a manifest's are (unknown language, duplicate id, missing or blank
text, missing media), vectorised over the columns; bad rows follow ``on_error``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mmalign.data.manifest import PATH_FIELDS, ManifestError
from mmalign.data.policy import ON_ERROR, BadInputReport, check_choice, is_known_language
from mmalign.data.sources.base import RowError, RowSource, SourceError, resolve_media
from mmalign.data.sources.arrow_copies import _map_ipc, arrow_cache_dir, parquet_as_arrow, text_table_as_arrow
from mmalign.data.sources.columns import blank, repeated

#: Fields taken from same-named columns when no ``fields`` mapping is given.
DEFAULT_FIELDS = ("id", "concept", "lang", "text", "text_en", "image", "audio")
TEXT_FIELDS = ("text", "text_en")
#: Tables up to this many rows have their media files checked when opened (larger: checked when read).
CHECK_FILES_UP_TO = 200_000


def _hf_folder_table(folder: Path, split: str | None):
    """The Arrow table of a ``save_to_disk`` folder (a DatasetDict folder needs ``split``)."""
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split is None:
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise SourceError(f"{folder}: a DatasetDict folder with splits {splits}; give `split:` in the source spec")
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise SourceError(f"{folder}: state.json lists no data files")
    tables = [_map_ipc(f) for f in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    indices = folder / "indices.arrow"  # a select()/shuffle() saved without flatten_indices
    if state.get("_indices_data_files"):
        table = table.take(_map_ipc(folder / state["_indices_data_files"][0]["filename"]).column(0))
    elif indices.is_file():
        table = table.take(_map_ipc(indices).column(0))
    return table


def _hf_cached_table(name: str, split: str | None, config: str | None):
    """A dataset from the local Hugging Face cache by name, never downloading (``HF_DATASETS_OFFLINE=1``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds when offline
        raise SourceError(f"dataset {name!r} (split {split or 'train'!r}) is not in the local Hugging Face cache "
                          f"and downloads are off: {e}") from e
    return ds.data.table if ds._indices is None else ds.flatten_indices().data.table


def open_table(path: Path | None, fmt: str, split: str | None = None, name: str | None = None, config: str | None = None,
               strings: Iterable[str] = ()):
    """The (memory-mapped where possible) Arrow table of a source (``strings``: CSV columns read as strings)."""
    if fmt == "hf" and name:
        return _hf_cached_table(name, split, config)
    assert path is not None
    if fmt == "parquet":
        return _map_ipc(parquet_as_arrow(path))
    if fmt == "arrow":
        return _map_ipc(path)
    if fmt == "hf":
        return _hf_folder_table(path, split)
    if fmt in ("csv", "jsonl"):
        return _map_ipc(text_table_as_arrow(path, fmt, strings))
    raise SourceError(f"{path}: not a table format: {fmt}")


class _Column:
    """One column with its chunk offsets: ``value(i)`` finds the chunk by binary search (no combine, no copy)."""

    def __init__(self, col) -> None:
        self.chunks = col.chunks
        self.offsets = [0]
        for c in self.chunks:
            self.offsets.append(self.offsets[-1] + len(c))

    def value(self, i: int) -> Any:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.chunks[k][i - self.offsets[k]].as_py()


def field_columns(fields: Mapping[str, Any] | None) -> list[str]:
    """The columns the manifest fields (``id``, ``text``, ``image``...) read: a CSV reads them as strings, so an id
    ``007``, a caption ``12`` or ``2024-01-02`` stays the exact cell (default: the columns named like the fields)."""
    if fields is None:
        return list(DEFAULT_FIELDS)
    out: list[str] = []
    for field, spec in fields.items():
        if field not in DEFAULT_FIELDS:
            continue
        for v in spec.values() if isinstance(spec, Mapping) else [spec]:
            out += [v] if isinstance(v, str) else [c for c in v if isinstance(c, str)] if isinstance(v, list) else []
    return out


def _bool(arr) -> np.ndarray:
    import pyarrow as pa

    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return np.asarray(arr.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)


class TableSource(RowSource):
    """A table (Parquet, Arrow, HF folder or cache, CSV/JSONL with a mapping) as manifest rows, built on access.

    Args:
        path: The file or folder (``None`` with ``name``: a dataset of the local HF cache).
        format: ``parquet``, ``arrow``, ``hf``, ``csv`` or ``jsonl``.
        fields: ``{field: column}``; ``text``/``text_en`` may map languages to a column or a list of columns
            (wide tables). Default: the columns named like the fields.
        root: Folder media paths are relative to (default: the table's folder; relative to it when relative).
        lang: Language of rows without a ``lang`` column (and of ``text`` when it maps one column).
        split: Split of a DatasetDict folder or of a cached dataset.
        name: Name of a dataset in the local HF cache (``format: hf``).
        config: Its configuration name.
        languages: Keep only rows in these languages.
        required_fields: Fields every row must have (the towers' inputs).
        on_error: ``"error"`` (default) or ``"skip"`` bad rows (see :mod:`mmalign.data.policy`).
        check_files: Check media files exist when opening (default: for tables up to 200k rows; larger ones
            are checked when a row's media is read, under the same policy).
    """

    def __init__(
        self,
        path: str | Path | None,
        format: str,
        fields: Mapping[str, Any] | None = None,
        root: str | Path | None = None,
        lang: str | None = None,
        split: str | None = None,
        name: str | None = None,
        config: str | None = None,
        languages: Iterable[str] | None = None,
        required_fields: Iterable[str] = (),
        on_error: str = "error",
        check_files: bool | None = None,
    ) -> None:
        check_choice("on_error", on_error, ON_ERROR)
        self.path = Path(path) if path is not None else Path(f"hf:{name}")
        self._open_args = (None if path is None else Path(path), format, split, name, config)
        base = self.path.parent if self.path.is_file() else self.path
        self.root = str(((base / root) if root is not None else base).resolve())
        self.lang = lang
        self._stem = self.path.stem
        self.report = BadInputReport()
        self._strings = field_columns(fields)
        self._open()
        columns = set(self.table.column_names)
        self.fields = self._mapping(fields, columns)
        self._build_index(languages, list(required_fields), on_error, check_files)

    # -- opening and pickling (workers reopen the mapped file instead of receiving a copy) ------------
    def _open(self) -> None:
        self.table = open_table(*self._open_args, strings=self._strings)
        self._cols: dict[str, _Column] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("table", None)
        state.pop("_cols", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def _col(self, name: str) -> _Column:
        if name not in self._cols:
            self._cols[name] = _Column(self.table.column(name))
        return self._cols[name]

    # -- mapping -----------------------------------------------------------------------------------
    def _mapping(self, fields: Mapping[str, Any] | None, columns: set[str]) -> dict[str, Any]:
        if fields is None:
            return {c: c for c in self.table.column_names}
        mapping = {}
        for field, spec in fields.items():
            cols = [spec] if isinstance(spec, str) else (list(spec) if isinstance(spec, list) else None)
            if isinstance(spec, Mapping):
                if field not in TEXT_FIELDS:
                    raise SourceError(f"{self.path}: fields.{field}: only text fields map languages to columns")
                mapping[field] = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in spec.items()}
                cols = [c for v in mapping[field].values() for c in v]
                bad = [k for k in mapping[field] if not is_known_language(k)]
                if bad:
                    raise SourceError(f"{self.path}: fields.{field}: {bad} are not ISO 639-1 codes")
            elif cols is None or len(cols) != 1 and field not in TEXT_FIELDS:
                raise SourceError(f"{self.path}: fields.{field} must name a column, got {spec!r}")
            else:
                import pyarrow as pa

                listed = field in TEXT_FIELDS and cols[0] in columns and pa.types.is_list(self.table.column(cols[0]).type)
                mapping[field] = cols[0] if len(cols) == 1 and not listed else {self.lang or "und": cols}
            missing = [c for c in cols if c not in columns]
            if missing:
                raise SourceError(f"{self.path}: fields.{field}: no column(s) {missing}; the table has {sorted(columns)}")
        return mapping

    # -- validation and the row index, vectorised -------------------------------------------------------
    def _build_index(self, languages: Iterable[str] | None, required: list[str], on_error: str, check_files: bool | None) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        t, n = self.table, self.table.num_rows
        m = self.fields
        bad = np.zeros(n, dtype=bool)
        self._id_col = m.get("id") if isinstance(m.get("id"), str) else None
        check_key = self._check_key(required, check_files, languages)
        problems = self._load_checks(check_key, n) if check_key else None
        if problems is not None:
            for mask, *_ in problems:
                bad |= mask
        else:
            problems = []  # (mask, field, reason, detail)

            def flag(mask: np.ndarray, field: str, reason: str, detail: str) -> None:
                mask = mask & ~bad
                if mask.any():
                    problems.append((mask, field, reason, detail))
                    bad[mask] = True

            if self._id_col is not None:
                mask = repeated(t.column(self._id_col))  # hashed with numpy; the first of each repeated id is kept
                if mask is not None:
                    flag(mask, "id", "duplicate id", "the id repeats an earlier row")
            lang_col = m.get("lang") if isinstance(m.get("lang"), str) else None
            if lang_col is not None:
                col = t.column(lang_col)
                uniques = pc.unique(col).to_pylist()
                wrong = [u for u in uniques if u is not None and not is_known_language(u)]
                if wrong:
                    flag(_bool(pc.is_in(col, value_set=pa.array(wrong, col.type))), "lang", "unknown language",
                         f"not an ISO 639-1 code or 'und' (e.g. {wrong[0]!r})")
            if self.lang is not None and not is_known_language(self.lang):
                raise SourceError(f"{self.path}: lang: {self.lang!r} is not an ISO 639-1 code or 'und'")
            # Fields are checked on the rows of the requested languages only (as a manifest's are).
            in_langs = self._wanted_rows(languages)
            for field in required:
                spec = m.get(field)
                if field in TEXT_FIELDS and isinstance(spec, dict):
                    continue  # wide captions: an empty cell is no caption (checked per slot below)
                if spec is None:
                    raise SourceError(f"{self.path}: the towers read {field!r}, which no column provides; "
                                      f"map one in `fields:` (columns: {t.column_names})")
                col = t.column(spec)
                if pa.types.is_struct(col.type):
                    flag(_bool(pc.is_null(col)) & in_langs, field, f"missing {field}", f"column {spec!r} is null")
                    continue
                flag(_bool(pc.is_null(col)) & in_langs, field, f"missing {field}", f"column {spec!r} is empty")
                flag(blank(col) & in_langs, field, f"missing {field}" if field in PATH_FIELDS else "empty text",
                     f"{spec!r} has no visible character")
            if check_files if check_files is not None else n <= CHECK_FILES_UP_TO:
                for field in (f for f in required if f in PATH_FIELDS and isinstance(m.get(f), str)):
                    col = self._col(m[field])
                    for i in np.flatnonzero(~bad & in_langs):
                        value = self._media(col.value(int(i)))
                        if isinstance(value, str) and not Path(value).is_file():
                            flag(np.eye(1, n, int(i), dtype=bool)[0], field, "missing file", f"no such file {value}")
            if check_key:
                self._save_checks(check_key, problems)
        if on_error == "error" and problems:  # the first bad row of the table is the one raised
            mask, *rest = self._first_problem(problems)
            problems = [(np.eye(1, n, int(np.argmax(mask)), dtype=bool)[0], *rest)]
        self._report_problems(problems, on_error)
        keep = ~bad
        # wide text: one row per (table row, slot, list element)
        self._slots: list[tuple[str, str, str]] = []  # (field, lang, column)
        wide = next((f for f in TEXT_FIELDS if isinstance(m.get(f), dict)), None)
        if wide is not None:
            base, slot, elem = [], [], []
            for lang, cols in m[wide].items():
                for c in cols:
                    s = len(self._slots)
                    self._slots.append((wide, lang, c))
                    col = t.column(c)
                    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                        flat = pc.list_flatten(col)
                        parents = np.asarray(pc.list_parent_indices(col).to_numpy(zero_copy_only=False), dtype=np.int64)
                        first = np.asarray(pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
                        starts = np.concatenate([[0], np.cumsum(first)[:-1]])
                        pos = np.arange(len(parents), dtype=np.int64) - starts[parents]
                        ok = ~_bool(pc.is_null(flat)) & ~blank(flat)
                        ok &= keep[parents]
                        base.append(parents[ok]); slot.append(np.full(ok.sum(), s, np.int16)); elem.append(pos[ok].astype(np.int32))
                    else:
                        ok = keep & ~_bool(pc.is_null(col)) & ~blank(col)
                        idx = np.flatnonzero(ok)
                        base.append(idx); slot.append(np.full(len(idx), s, np.int16)); elem.append(np.full(len(idx), -1, np.int32))
            b, s, e = np.concatenate(base), np.concatenate(slot), np.concatenate(elem)
            order = np.lexsort((e, s, b))  # table order, then language slots, then list position
            self._index, self._slot, self._elem = b[order], s[order], e[order]
        else:
            self._index = np.flatnonzero(keep) if bad.any() else None
            self._slot = self._elem = None
        if languages is not None:
            self._filter_languages(set(languages))
        if len(self) == 0:
            raise ManifestError(f"{self.path}: no rows left after filtering (languages={languages}, fields={required}; "
                                f"{self.report.summary()})")

    def _first_problem(self, problems: list) -> Any:
        """The problem raised under ``on_error="error"``: the one of the table's first bad row."""
        return min(problems, key=lambda p: int(np.argmax(p[0])))

    def _report_problems(self, problems: list, on_error: str) -> None:
        for mask, field, reason, detail in problems:
            for i in np.flatnonzero(mask):
                self.report.handle(RowError(self.path, int(i), self._base_id(int(i)), field, reason, detail), on_error)

    def _wanted_rows(self, languages: Iterable[str] | None) -> np.ndarray | bool:
        """``[n]`` bool: the table rows in ``languages`` (True: all rows, or a wide table, whose language is per caption)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if languages is None or any(isinstance(self.fields.get(f), dict) for f in TEXT_FIELDS):
            return True
        wanted = sorted(set(languages))
        lang_col = self.fields.get("lang") if isinstance(self.fields.get("lang"), str) else None
        if lang_col is None:
            return (self.lang or "und") in wanted
        col = self.table.column(lang_col).cast(pa.string()).fill_null(self.lang or "und")
        return _bool(pc.is_in(col, value_set=pa.array(wanted, pa.string())))

    # -- the checks are computed once per file version (a 10M-row id uniqueness check costs seconds) --------
    def _check_key(self, required: list[str], check_files: bool | None, languages: Iterable[str] | None = None) -> str | None:
        path, fmt, split, name, config = self._open_args
        if path is None or fmt not in ("parquet", "arrow", "hf", "csv", "jsonl"):
            return None
        media = [f for f in required if f in PATH_FIELDS]
        if media and (check_files if check_files is not None else self.table.num_rows <= CHECK_FILES_UP_TO):
            return None  # media files come and go: checked every time
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".arrow", ".json"))
        ident = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        spec = json.dumps([ident, split, self.fields, sorted(required), self.lang, check_files, str(self.root), type(self).__name__,
                           None if languages is None else sorted(set(languages))], sort_keys=True, default=str)
        return hashlib.sha256(spec.encode()).hexdigest()[:24]

    def _load_checks(self, key: str, n: int) -> list | None:
        f = arrow_cache_dir() / "checks" / f"{key}.json"
        try:
            saved = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        out = []
        for rows, field, reason, detail in saved:
            mask = np.zeros(n, dtype=bool)
            mask[np.asarray(rows, dtype=np.int64)] = True
            out.append((mask, field, reason, detail))
        return out

    def _save_checks(self, key: str, problems: list) -> None:
        folder = arrow_cache_dir() / "checks"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps([[np.flatnonzero(m).tolist(), f, r, d] for m, f, r, d in problems]))
            os.replace(tmp, folder / f"{key}.json")
        except OSError:  # a read-only cache folder: the checks are simply redone next time
            pass

    def _row_langs(self, wanted: set[str] | None = None) -> tuple[list[str], np.ndarray | None]:
        """``(languages present, [len(self)] bool: the row's language is in wanted)``, vectorised (no per-row object)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._slot is not None:
            slot_langs = np.array([s[1] for s in self._slots], dtype=object)
            present = sorted(set(slot_langs[np.unique(self._slot)].tolist()))
            keep = None if wanted is None else np.isin(slot_langs, list(wanted)).astype(bool)[self._slot]
            return present, keep
        lang_col = self.fields.get("lang") if isinstance(self.fields.get("lang"), str) else None
        if lang_col is None:
            lang = self.lang or "und"
            return [lang], None if wanted is None else np.full(len(self), lang in wanted)
        col = self.table.column(lang_col)
        if self._index is not None:
            col = col.take(pa.array(self._index))
        col = col.cast(pa.string()).fill_null(self.lang or "und")
        present = sorted(v for v in pc.unique(col).to_pylist())
        keep = None if wanted is None else _bool(pc.is_in(col, value_set=pa.array(sorted(wanted), pa.string())))
        return present, keep

    def _filter_languages(self, langs: set[str]) -> None:
        present, keep = self._row_langs(langs)
        if unknown := sorted(langs - set(present)):
            raise ManifestError(f"{self.path}: no rows in language(s) {unknown}; the source has {sorted(present)}")
        positions = np.flatnonzero(keep)
        self._index = positions if self._index is None else self._index[positions]
        if self._slot is not None:
            self._slot, self._elem = self._slot[positions], self._elem[positions]

    @property
    def languages(self) -> list[str]:
        return self._row_langs()[0]

    def columns_of(self, names: list[str]) -> tuple[dict[str, Any], dict[str, list]] | None:
        """``({name: string column [len(self)]}, {})`` of these fields, as ``self[i]`` would give them, built
        vectorised (the feature cache's :class:`~mmalign.cache.rowtable.RowTable`); None for wide tables and
        non-string columns (read row by row instead)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._slot is not None:
            return None
        take = None if self._index is None else pa.array(self._index)
        n = len(self)
        out: dict[str, Any] = {}
        for name in names:
            spec = self.fields.get(name)
            if spec is None:
                continue
            if not isinstance(spec, str):
                return None
            col = self.table.column(spec)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type)
                    or pa.types.is_dictionary(col.type)):
                return None
            col = col if take is None else col.take(take)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                col = col.cast(pa.large_string())  # no 2 GB limit on a column's bytes
            if name in PATH_FIELDS:
                col = self._resolve_column(col)
            out[name] = col
        rows = np.arange(n) if self._index is None else self._index
        if "id" not in out:
            out["id"] = pa.chunked_array([pa.array(np.char.add(f"{self._stem}-", rows.astype(str)), pa.string())])
        else:
            null = np.asarray(pc.is_null(out["id"]).to_numpy(zero_copy_only=False), dtype=bool)
            if null.any():  # a row without an id gets <stem>-<row> (as self[i])
                ids = np.asarray(out["id"].to_numpy(zero_copy_only=False), dtype=object)
                ids[null] = np.char.add(f"{self._stem}-", rows[null].astype(str))
                out["id"] = pa.chunked_array([pa.array(ids, out["id"].type)])
        for name, default in (("concept", out["id"]), ("lang", self.lang or "und")):
            col = out.get(name)
            if col is None:
                out[name] = default if not isinstance(default, str) else pa.chunked_array([pa.repeat(pa.scalar(default), n)])
            elif col.null_count:
                out[name] = pc.coalesce(col, default if isinstance(default, str) else default.cast(col.type))
        return out, {}

    def _resolve_column(self, col: Any) -> Any:
        """Media paths of a column made absolute against ``root`` as :func:`resolve_media` does, vectorised."""
        import pyarrow as pa
        import pyarrow.compute as pc

        absolute = pc.or_(pc.starts_with(col, "/"), pc.match_substring(col, "://"))
        root = pa.scalar(self.root, col.type)  # the same string type as the column (string or large_string)
        joined = pc.if_else(absolute, col, pc.binary_join_element_wise(root, col, pa.scalar("/", col.type)))
        # normpath by hand only where it could change something ("./", "//", a trailing "/")
        odd = np.flatnonzero(np.asarray(pc.fill_null(pc.match_substring_regex(col, r"(^|/)\.\.?(/|$)|//|/$|^$"), False)
                                        .to_numpy(zero_copy_only=False), dtype=bool))
        if len(odd) == 0:
            return joined
        values = np.asarray(joined.to_numpy(zero_copy_only=False), dtype=object)
        raw = col.take(pa.array(odd)).to_pylist()
        for i, v in zip(odd.tolist(), raw):
            values[i] = resolve_media(v, Path(self.root))
        return pa.chunked_array([pa.array(values, col.type)])

    # -- rows --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.num_rows if self._index is None else len(self._index)

    def _base_id(self, i: int) -> str:
        return str(self._col(self._id_col).value(i)) if self._id_col else f"{self._stem}-{i}"

    def _media(self, value: Any) -> Any:
        if isinstance(value, dict):  # HF Image/Audio struct
            if value.get("bytes"):
                from PIL import Image

                return Image.open(io.BytesIO(value["bytes"]))
            value = value.get("path")
        return resolve_media(value, self.root)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(self._index[index]) if self._index is not None else index
        row: dict[str, Any] = {}
        for field, spec in self.fields.items():
            if isinstance(spec, str):
                value = self._col(spec).value(i)
                if value is None:
                    continue
                row[field] = self._media(value) if field in PATH_FIELDS else (value if field in TEXT_FIELDS else
                                                                              (str(value) if field in ("id", "concept", "lang") else value))
        base_id = row.get("id", f"{self._stem}-{i}")
        row["id"] = base_id
        row.setdefault("concept", base_id)
        row.setdefault("lang", self.lang or "und")
        if self._slot is not None:
            field, lang, col = self._slots[int(self._slot[index])]
            value = self._col(col).value(i)
            k = int(self._elem[index])
            row[field] = value[k] if k >= 0 else value
            row["lang"] = lang
            row["id"] = f"{base_id}#{col}" + (f"[{k}]" if k >= 0 else "")
        return row
