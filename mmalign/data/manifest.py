"""Manifests: JSONL or CSV files, one sample per row (see docs/ARCHITECTURE.md for the fields).

Every row is checked when the manifest is read (see :mod:`mmalign.data.policy`): bytes that are not
UTF-8 (``invalid utf-8``), malformed JSON, duplicate ids, unknown language codes, and for the fields a
recipe reads: missing field, empty or whitespace-only text, missing media file. Under ``on_error="error"`` (default) the first bad row raises
an error naming the file, line, id and field; under ``"skip"`` bad rows are dropped and counted.

This is the row-by-row reader (~25-340 us and ~1 KB of Python objects a row). ``open_source`` (the DataModule,
``mmalign cache``, ``mmalign embed``) reads plain manifests of ``MMALIGN_MANIFEST_TABLE_BYTES`` (8 MB) or more
vectorised instead, with the same checks and messages (:mod:`mmalign.data.sources.manifest_table`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch.utils.data import Dataset

from mmalign.data.langs import unknown_language_detail
from mmalign.data.policy import ON_ERROR, BadInputError, BadInputReport, check_choice, is_known_language

#: Fields holding paths, resolved relative to the manifest's folder.
PATH_FIELDS = ("image", "audio")
META_FIELDS = ("id", "concept", "lang")


class ManifestError(ValueError):
    """A manifest is unusable as a whole (no rows left, language absent...); the message names the file."""


class ManifestRowError(BadInputError, ManifestError):
    """One manifest row is bad; the message names the file, line, item id and field."""

    def __init__(self, path: Path, line: int | None, item_id: Any, field: str, reason: str, detail: str = "") -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(item_id, field, reason, f"{where}{': ' + detail if detail else ''}")


def read_manifest(
    path: str | Path, on_error: str = "error", report: BadInputReport | None = None
) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` manifest; media paths become absolute.

    Args:
        path: The manifest file.
        on_error: ``"error"``: the first malformed line, duplicate id or unknown ``lang`` raises
            :class:`ManifestRowError`. ``"skip"``: such rows are dropped (a duplicate keeps its first row)
            and counted in ``report``.
        report: Collects skip counts (a throwaway one when ``None``).
    """
    check_choice("on_error", on_error, ON_ERROR)
    report = report if report is not None else BadInputReport()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    raw: list[tuple[int, Any]] = []  # (line number, row)
    if path.suffix == ".csv":
        # Decoded with surrogateescape so that one row with bytes that are not UTF-8 is that row's
        # problem (named by line, skippable), not a UnicodeDecodeError for the whole file.
        text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is not None and _not_utf8(",".join(reader.fieldnames)) is not None:
            raise ManifestError(f"{path}:1: the CSV header is not valid UTF-8 ({_not_utf8(','.join(reader.fieldnames))})")
        for r in reader:
            bad = next((why for v in r.values() if isinstance(v, str) and (why := _not_utf8(v))), None)
            if bad is not None:
                report.handle(ManifestRowError(path, reader.line_num, f"<line {reader.line_num}>", "<row>", "invalid utf-8", bad), on_error)
                continue
            # An empty CSV cell is an absent field (CSV cannot tell them apart).
            raw.append((reader.line_num, {k: v for k, v in r.items() if v not in (None, "") and k is not None}))
    else:
        with path.open("rb") as f:
            for lineno, data in enumerate(f, 1):
                try:
                    line = (data.removeprefix(codecs.BOM_UTF8) if lineno == 1 else data).decode("utf-8")
                except UnicodeDecodeError as e:
                    report.handle(ManifestRowError(path, lineno, f"<line {lineno}>", "<row>", "invalid utf-8",
                                                   _decode_detail(data, e)), on_error)
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    report.handle(ManifestRowError(path, lineno, f"<line {lineno}>", "<row>", "malformed json", e.msg), on_error)
                    continue
                if not isinstance(row, dict):
                    report.handle(ManifestRowError(path, lineno, f"<line {lineno}>", "<row>", "malformed json",
                                                   f"a row must be a JSON object, got {type(row).__name__}"), on_error)
                    continue
                raw.append((lineno, row))
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, (lineno, row) in enumerate(raw):
        row.setdefault("id", f"{path.stem}-{i}")
        row["id"] = str(row["id"])
        if row["id"] in seen:
            report.handle(ManifestRowError(path, lineno, row["id"], "id", "duplicate id",
                                           f"first seen on line {seen[row['id']]}"), on_error)
            continue
        seen[row["id"]] = lineno
        row.setdefault("concept", row["id"])
        row["concept"] = str(row["concept"])
        row.setdefault("lang", "und")
        if not is_known_language(row["lang"]):
            report.handle(ManifestRowError(path, lineno, row["id"], "lang", "unknown language",
                                           unknown_language_detail(row["lang"])), on_error)
            continue
        for field in PATH_FIELDS:
            if field in row and row[field] is not None:
                row[field] = str((path.parent / str(row[field])).resolve())
        rows.append(row)
    return rows


def _decode_detail(data: bytes, error: UnicodeDecodeError) -> str:
    return f"byte 0x{data[error.start]:02x} at column {error.start + 1} is not UTF-8; manifests must be UTF-8 encoded"


def _not_utf8(text: str) -> str | None:
    """Why ``text`` (decoded with ``surrogateescape``) held bytes that are not UTF-8, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00
        return f"byte 0x{byte:02x} is not UTF-8; manifests must be UTF-8 encoded"
    return None


def check_row(row: dict[str, Any], fields: Iterable[str], path: Path, check_files: bool = True) -> None:
    """Raise :class:`ManifestRowError` if ``row`` lacks a usable value for one of ``fields``."""
    for field in fields:
        value = row.get(field)
        if value is None or (field in PATH_FIELDS and value == ""):
            raise ManifestRowError(path, None, row["id"], field, f"missing {field}")
        if field in PATH_FIELDS:
            if check_files and not Path(value).is_file():
                raise ManifestRowError(path, None, row["id"], field, "missing file", f"no such file {value}")
        elif not isinstance(value, str):
            raise ManifestRowError(path, None, row["id"], field, "bad text", f"expected a string, got {type(value).__name__}")
        elif not value.strip():
            raise ManifestRowError(path, None, row["id"], field, "empty text", f"{value!r} has no visible character")


class ManifestDataset(Dataset):
    """Rows of one or more manifests, optionally filtered by language and by the fields a recipe needs.

    Args:
        path: The ``.jsonl``/``.csv`` file, or a list of them read in order and concatenated (mixing
            datasets, e.g. ``[data/emoji/train.jsonl, data/words/train.jsonl]``). Ids must be unique
            across the files: a repeat is a ``duplicate id`` naming both files.
        languages: Keep only rows whose ``lang`` is listed (e.g. ``["en"]`` for English-only pivot training).
        required_fields: Fields every row must have (the towers' input fields): present, non-blank text,
            existing media file.
        on_error: ``"error"`` (default): a bad row raises, naming the row, id and field. ``"skip"``: bad
            rows are dropped and counted in :attr:`report` (and :attr:`skipped`).
        check_files: Check that media files exist when the manifest is read (one ``stat`` per row).
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        languages: Iterable[str] | None = None,
        required_fields: Iterable[str] = (),
        on_error: str = "error",
        check_files: bool = True,
    ) -> None:
        check_choice("on_error", on_error, ON_ERROR)
        self.paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
        if not self.paths:
            raise ManifestError("no manifest given (an empty list)")
        self.path = self.paths[0] if len(self.paths) == 1 else Path("+".join(str(p) for p in self.paths))
        self.report = BadInputReport()
        rows, source = [], []  # source[i]: the file row i came from (named in errors)
        first_file: dict[str, Path] = {}
        for file in self.paths:
            for row in read_manifest(file, on_error, self.report):
                if row["id"] in first_file:
                    self.report.handle(ManifestRowError(file, None, row["id"], "id", "duplicate id",
                                                        f"already in {first_file[row['id']]}"), on_error)
                    continue
                first_file[row["id"]] = file
                rows.append(row)
                source.append(file)
        if languages is not None:
            langs = set(languages)
            known = {r["lang"] for r in rows}
            if unknown := sorted(langs - known):
                raise ManifestError(f"{self.path}: no rows in language(s) {unknown}; the manifest has {sorted(known)}")
            keep = [i for i, r in enumerate(rows) if r["lang"] in langs]
            rows, source = [rows[i] for i in keep], [source[i] for i in keep]
        fields = list(required_fields)
        kept = []
        for row, file in zip(rows, source):
            try:
                check_row(row, fields, file, check_files)
            except ManifestRowError as e:
                self.report.handle(e, on_error)
                continue
            kept.append(row)
        if not kept:
            raise ManifestError(f"{self.path}: no rows left after filtering (languages={languages}, fields={fields}; "
                                f"{self.report.summary()})")
        self.rows = kept

    @property
    def skipped(self) -> dict[str, int]:
        """Rows dropped under ``on_error="skip"``, per reason."""
        return self.report.as_dict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    @property
    def languages(self) -> list[str]:
        return sorted({r["lang"] for r in self.rows})
