"""What every source shares: errors, the row view, and the checks a manifest applies to its rows.

A *map-style* source is a :class:`torch.utils.data.Dataset` of row dicts (``id``, ``concept``, ``lang``,
``text``, ``image``, ``audio``...) with the attributes the DataModule and ``mmalign cache`` read from a
:class:`~mmalign.data.manifest.ManifestDataset`: ``rows`` (a sequence of row dicts; for tables a lazy
view, no row object is held), ``report`` / ``skipped`` (bad rows dropped under ``on_error="skip"``),
``languages`` and ``path``. A *streaming* source (WebDataset shards) is an ``IterableDataset`` of the
same row dicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from torch.utils.data import Dataset

from mmalign.data.manifest import PATH_FIELDS, ManifestError, ManifestRowError, check_row
from mmalign.data.langs import unknown_language_detail
from mmalign.data.policy import ON_ERROR, BadInputReport, check_choice, is_known_language

#: format name -> what it reads (the error for an unknown format lists these).
FORMATS: dict[str, str] = {
    "jsonl": "long-format JSON Lines manifest (.jsonl), one sample per line",
    "csv": "long-format CSV manifest (.csv); with `fields:` a wide table",
    "parquet": "Parquet table (.parquet), memory-mapped through an Arrow copy",
    "arrow": "Arrow IPC / Feather file (.arrow, .feather), memory-mapped",
    "hf": "Hugging Face `save_to_disk` folder (dataset_info.json/state.json, or dataset_dict.json + split), "
          "or `name:` of a dataset in the local HF cache (offline)",
    "text": "plain text corpus (.txt, .txt.gz), one text per line (text-only recipes)",
    "ljspeech": "LJSpeech-style audio folder: metadata.csv (id|text|normalized) + wavs/",
    "commonvoice": "Common Voice release: a *.tsv file (path, sentence, locale) next to clips/",
    "webdataset": "WebDataset .tar shards, brace patterns (shards/{00000..00003}.tar), img2dataset layout",
}


class SourceError(ManifestError):
    """A source cannot be opened (unknown format, bad mapping, missing column); the message says why."""


def unsupported(path: Any, why: str) -> SourceError:
    listed = "\n".join(f"  {name}: {what}" for name, what in FORMATS.items())
    return SourceError(f"{path}: {why}. Supported formats (chosen by path shape, or `format:` in a source spec):\n{listed}")


class RowError(ManifestRowError):
    """A bad row of a table or corpus: named ``<file> row <n>`` (0-based row of the file)."""

    def __init__(self, path: Any, row: int | None, item_id: Any, field: str, reason: str, detail: str = "") -> None:
        where = Path(f"{path} row {row}") if row is not None else Path(str(path))
        super().__init__(where, None, item_id, field, reason, detail)


class RowSource(Dataset):
    """Base of map-style sources: ``len``, ``[i] -> row dict``, ``rows``, ``report``, ``skipped``, ``languages``."""

    path: Path
    report: BadInputReport

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    @property
    def rows(self) -> Sequence[dict[str, Any]]:
        return _RowsView(self)

    @property
    def skipped(self) -> dict[str, int]:
        return self.report.as_dict()

    @property
    def languages(self) -> list[str]:
        return sorted({r["lang"] for r in self})


class _RowsView(Sequence):
    """``source.rows``: a sequence whose items are built on access (nothing per row is held)."""

    def __init__(self, source: RowSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.source[i] for i in range(*index.indices(len(self)))]
        return self.source[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.source)


class ListSource(RowSource):
    """Rows built in memory (small sources: audio folders with transcripts), checked like a manifest.

    Args:
        rows: ``(row number, row dict)`` pairs; ``id`` defaults to ``<stem>-<i>``, ``concept`` to the id.
        path: Named in errors.
        languages, required_fields, on_error, check_files: As :class:`~mmalign.data.manifest.ManifestDataset`.
    """

    def __init__(
        self,
        rows: Iterable[tuple[int, dict[str, Any]]],
        path: str | Path,
        languages: Iterable[str] | None = None,
        required_fields: Iterable[str] = (),
        on_error: str = "error",
        check_files: bool = True,
        report: BadInputReport | None = None,
    ) -> None:
        check_choice("on_error", on_error, ON_ERROR)
        self.path = Path(path)
        self.report = report if report is not None else BadInputReport()
        langs = set(languages) if languages is not None else None
        fields = list(required_fields)
        kept: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        present: set[str] = set()
        for n, row in rows:
            row["id"] = str(row.get("id") or f"{self.path.stem}-{n}")
            row["concept"] = str(row.get("concept") or row["id"])
            row.setdefault("lang", "und")
            try:
                if row["id"] in seen:
                    raise RowError(self.path, n, row["id"], "id", "duplicate id", f"first seen in row {seen[row['id']]}")
                if not is_known_language(row["lang"]):
                    raise RowError(self.path, n, row["id"], "lang", "unknown language",
                                   unknown_language_detail(row["lang"]))
                seen[row["id"]] = n
                present.add(row["lang"])
                if langs is not None and row["lang"] not in langs:
                    continue
                check_row(row, fields, Path(f"{self.path} row {n}"), check_files)
            except ManifestRowError as e:
                self.report.handle(e, on_error)
                continue
            kept.append(row)
        if langs is not None and (unknown := sorted(langs - present)):
            raise ManifestError(f"{self.path}: no rows in language(s) {unknown}; the source has {sorted(present)}")
        if not kept:
            raise ManifestError(f"{self.path}: no rows left after filtering (languages={languages}, fields={fields}; "
                                f"{self.report.summary()})")
        self._rows = kept

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._rows[index]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self._rows

    @rows.setter
    def rows(self, rows: list[dict[str, Any]]) -> None:
        self._rows = list(rows)

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]], like: Any) -> "ListSource":
        """Already checked ``rows`` (e.g. a source's rows filtered further) with ``like``'s path and report."""
        out = cls.__new__(cls)
        out.path, out.report, out._rows = like.path, like.report, list(rows)
        return out


def resolve_media(value: Any, root: Path) -> Any:
    """A media path relative to ``root`` made absolute; other values (PIL images, arrays) unchanged."""
    if isinstance(value, str) and value and "://" not in value:  # no syscall per row (``root`` is absolute)
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))
    return value


__all__ = ["FORMATS", "ListSource", "PATH_FIELDS", "RowError", "RowSource", "SourceError", "resolve_media", "unsupported"]
