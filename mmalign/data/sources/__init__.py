"""Data sources behind one interface: every source yields the manifest's row dicts (``id``, ``concept``, ``lang``,
``text``, ``image``, ``audio``...).

A *source spec* is a path or URL (the format is read from its shape), a mapping with ``path`` (or ``shards``
for WebDataset, ``name`` for a dataset of the local Hugging Face cache) plus ``format:`` and format options,
a ``.yaml`` file holding such a mapping (its paths relative to the file), or a list of specs read in order::

    train: data/train.jsonl                                   # long-format manifest (as before)
    train: data/cc12m/{00000..01242}.tar                     # WebDataset shards
    train: {path: data/xm.parquet, fields: {image: file_name, text: {de: caption_de, en: caption_en}}}
    train: {path: corpora/news.de.txt.gz, lang: de}          # text corpus, one text per line
    train: {format: hf, name: my/dataset, split: train}      # local HF cache, never downloading

See docs/data.md for one worked example per format. :func:`open_source` is what the DataModule,
``mmalign cache`` and ``mmalign embed`` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mmalign.data.sources.base import FORMATS, ListSource, RowError, RowSource, SourceError, unsupported

__all__ = ["FORMATS", "ListSource", "RowError", "RowSource", "SourceError", "detect_format", "open_source", "source_label"]

SPEC_KEYS = {"path", "shards", "name", "format", "fields", "root", "lang", "split", "config", "shuffle", "seed",
             "size", "check_files"}


def detect_format(path: str | Path) -> str:
    """The format of a path or URL, from its shape (suffix, braces, folder contents); raises listing the formats."""
    s = str(path)
    low = s.lower()
    if "{" in s and ".." in s or low.endswith((".tar", ".tar.gz", ".tgz")) or low.startswith("pipe:"):
        return "webdataset"
    if "://" in s:
        raise unsupported(s, "only WebDataset shard URLs (ending in .tar) are read from URLs")
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"data source not found: {p}")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf"
        if (p / "metadata.csv").is_file() and (p / "wavs").is_dir():
            return "ljspeech"
        if (p / "clips").is_dir() and any(p.glob("*.tsv")):
            return "commonvoice"
        raise unsupported(p, "a folder that is no Hugging Face save_to_disk folder, LJSpeech or Common Voice folder")
    for fmt, suffixes in (("jsonl", (".jsonl", ".ndjson")), ("csv", (".csv",)), ("parquet", (".parquet", ".pq")),
                          ("arrow", (".arrow", ".feather", ".ipc")), ("text", (".txt", ".txt.gz")), ("commonvoice", (".tsv",))):
        if low.endswith(suffixes):
            return fmt
    if p.suffix in (".yaml", ".yml"):
        return "spec"
    with open(p, "rb") as f:
        head = f.read(512)
    if len(head) > 262 and head[257:262] == b"ustar":
        return "webdataset"  # a tar without the suffix
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1"):
        return "arrow"
    raise unsupported(p, f"unknown format (suffix {p.suffix or 'none'!r})")


def _load_spec(path: Path) -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, Mapping):
        raise SourceError(f"{path}: a source spec file must hold a mapping (path/format/fields...), got {type(spec).__name__}")
    spec = dict(spec)
    for key in ("path", "shards", "root"):  # relative to the spec file
        if isinstance(spec.get(key), str) and "://" not in spec[key] and not Path(spec[key]).is_absolute():
            spec[key] = str(path.parent / spec[key])
    return spec


def source_label(spec: Any) -> str:
    """A short name of a spec for messages."""
    if isinstance(spec, Mapping):
        return str(spec.get("path") or spec.get("shards") or f"hf:{spec.get('name')}")
    if isinstance(spec, (list, tuple)):
        return "+".join(source_label(s) for s in spec)
    return str(spec)


def is_plain_manifests(spec: Any) -> bool:
    """True when ``spec`` is a long-format manifest path or a list of them (the row reader, ``ManifestDataset``; from
    ``MMALIGN_MANIFEST_TABLE_BYTES`` bytes on the vectorised ``ManifestTableSource``)."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    return bool(specs) and all(isinstance(s, (str, Path)) and str(s).lower().endswith((".jsonl", ".csv", ".ndjson")) for s in specs)


def open_source(
    spec: str | Path | Mapping[str, Any] | Sequence[Any],
    languages: Iterable[str] | None = None,
    required_fields: Iterable[str] = (),
    on_error: str = "error",
    check_files: bool | None = None,
) -> Any:
    """Open a source spec (see the module docstring) as a dataset of row dicts.

    Args:
        spec: Path/URL, mapping, ``.yaml`` spec file, or a list of them.
        languages: Keep only rows in these languages.
        required_fields: Fields every row must have (the towers' inputs): present, non-blank, media existing.
        on_error: ``"error"`` (default): the first bad row raises naming file, row and field; ``"skip"``: counted.
        check_files: Check media files when opening (default: manifests and audio folders yes, tables up to
            200k rows; WebDataset media are inside the shards).

    Returns:
        A map-style dataset (:class:`~mmalign.data.manifest.ManifestDataset`, for large plain manifests a
        :class:`~mmalign.data.sources.manifest_table.ManifestTableSource`, or another :class:`RowSource`) or, for
        WebDataset shards, an ``IterableDataset`` (:class:`~mmalign.data.sources.wds.WebDatasetSource`).
    """
    kw = {"languages": languages, "required_fields": list(required_fields), "on_error": on_error}
    if is_plain_manifests(spec):
        return _open_manifests(spec, check_files=True if check_files is None else check_files, **kw)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SourceError("no data source given (an empty list)")
        parts = [open_source(s, languages=None, required_fields=required_fields, on_error=on_error, check_files=check_files) for s in spec]
        from mmalign.data.sources.concat import ConcatSource

        return ConcatSource(parts, languages)
    opts: dict[str, Any]
    if isinstance(spec, Mapping):
        opts = dict(spec)
        unknown = sorted(set(opts) - SPEC_KEYS)
        if unknown:
            raise SourceError(f"{source_label(spec)}: unknown source spec key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    else:
        opts = {"path": str(spec)}
    path = opts.get("path") or opts.get("shards")
    fmt = opts.get("format") or (detect_format(path) if path is not None else ("hf" if opts.get("name") else None))
    if fmt is None:
        raise SourceError(f"{spec!r}: a source spec needs `path`, `shards` or `name`")
    if fmt == "spec":
        return open_source(_load_spec(Path(path)), languages, required_fields, on_error, check_files)
    if fmt not in FORMATS:
        raise unsupported(path, f"unknown format {fmt!r}")
    if opts.get("check_files") is not None:
        check_files = opts["check_files"]
    if fmt == "webdataset":
        from mmalign.data.sources.wds import WebDatasetSource

        return WebDatasetSource(path, opts.get("fields"), opts.get("lang"), bool(opts.get("shuffle", False)),
                                int(opts.get("seed", 0)), opts.get("size"), **kw)
    if fmt == "text":
        from mmalign.data.sources.text import TextCorpusSource

        return TextCorpusSource(path, opts.get("lang"), **kw)
    if fmt in ("ljspeech", "commonvoice"):
        from mmalign.data.sources.audio import audio_folder_source

        return audio_folder_source(Path(path), fmt, opts.get("lang"), opts.get("split"),
                                   check_files=True if check_files is None else check_files, **kw)
    if fmt in ("jsonl", "csv") and not any(k in opts for k in ("fields", "root", "lang")):
        return _open_manifests(path, check_files=True if check_files is None else check_files, **kw)
    from mmalign.data.sources.table import TableSource

    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"data source not found: {path}")
    return TableSource(path, fmt, opts.get("fields"), opts.get("root"), opts.get("lang"), opts.get("split"),
                       opts.get("name"), opts.get("config"), check_files=check_files, **kw)


def _open_manifest(path: str | Path, **kw: Any) -> Any:
    """One long-format manifest: vectorised (:class:`~mmalign.data.sources.manifest_table.ManifestTableSource`) from
    ``MMALIGN_MANIFEST_TABLE_BYTES`` bytes on, else (or when it needs it) the row reader."""
    import logging

    from mmalign.data.manifest import ManifestDataset
    from mmalign.data.sources.manifest_table import ManifestFallback, ManifestTableSource, table_bytes

    p = Path(path)
    if p.is_file() and p.stat().st_size >= table_bytes():
        try:
            return ManifestTableSource(p, **kw)
        except ManifestFallback as e:
            logging.getLogger("mmalign.data").info("%s: read row by row (%s)", p, e)
    return ManifestDataset(p, **kw)


def _open_manifests(spec: Any, **kw: Any) -> Any:
    """Long-format manifests: one path, or a list read in order whose ids must be unique across the files."""
    from mmalign.data.manifest import ManifestDataset
    from mmalign.data.sources.manifest_table import table_bytes

    paths = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if len(paths) == 1:
        return _open_manifest(paths[0], **kw)
    if all(not Path(p).is_file() or Path(p).stat().st_size < table_bytes() for p in paths):
        return ManifestDataset(paths, **kw)  # small files: the row reader, as before
    from mmalign.data.sources.concat import ConcatSource

    languages = kw.pop("languages")
    parts = [_open_manifest(p, languages=None, **kw) for p in paths]
    _drop_repeated_ids(parts, kw["on_error"])
    return ConcatSource(parts, languages)


def _drop_repeated_ids(parts: list[Any], on_error: str) -> None:
    """An id of a later manifest already in an earlier one is a ``duplicate id`` (``already in <file>``), vectorised."""
    import numpy as np
    import pyarrow as pa

    from mmalign.data.manifest import ManifestRowError
    from mmalign.data.sources.columns import repeated

    cols = []
    for part in parts:
        got = part.columns_of(["id"]) if hasattr(part, "columns_of") else None
        cols.append(got[0]["id"].cast(pa.large_string()) if got else pa.chunked_array([pa.array([r["id"] for r in part.rows], pa.large_string())]))
    sizes = np.cumsum([0] + [len(c) for c in cols])
    dup = repeated(pa.chunked_array([c for col in cols for c in col.chunks], pa.large_string()))
    if dup is None or not dup.any():
        return
    every = pa.chunked_array([c for col in cols for c in col.chunks], pa.large_string())
    import pyarrow.compute as pc

    rows = np.flatnonzero(dup)
    first = np.asarray(pc.index_in(every.take(pa.array(rows)), value_set=every.combine_chunks()).to_numpy(zero_copy_only=False))
    for k, part in enumerate(parts):
        mine = rows[(rows >= sizes[k]) & (rows < sizes[k + 1])]
        if not len(mine):
            continue
        for r, f in zip(mine.tolist(), first[np.isin(rows, mine)].tolist()):
            where = int(np.searchsorted(sizes, f, side="right")) - 1
            rid = every[r].as_py()
            part.report.handle(ManifestRowError(part.path, None, rid, "id", "duplicate id", f"already in {parts[where].path}"), on_error)
        local = mine - sizes[k]
        if hasattr(part, "_index") and getattr(part, "_slot", None) is None:
            positions = np.arange(len(part)) if part._index is None else part._index
            part._index = np.delete(positions, local)
        else:
            gone = set(local.tolist())
            part.rows = [r for i, r in enumerate(part.rows) if i not in gone]
