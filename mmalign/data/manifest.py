"""Manifests: JSONL or CSV files, one sample per row (see docs/ARCHITECTURE.md for the fields)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from torch.utils.data import Dataset

#: Fields holding paths, resolved relative to the manifest's folder.
PATH_FIELDS = ("image", "audio")
META_FIELDS = ("id", "concept", "lang")


class ManifestError(ValueError):
    """A manifest row is malformed; the message names the file, row and field."""


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.csv`` manifest; paths become absolute; ids must be unique."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows: list[dict[str, Any]] = []
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        row.setdefault("id", f"{path.stem}-{i}")
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise ManifestError(f"{path}: duplicate id {row['id']!r} (rows {seen[row['id']] + 1} and {i + 1})")
        seen[row["id"]] = i
        row.setdefault("concept", row["id"])
        row["concept"] = str(row["concept"])
        row.setdefault("lang", "und")
        for field in PATH_FIELDS:
            if field in row and row[field] is not None:
                row[field] = str((path.parent / row[field]).resolve())
    return rows


class ManifestDataset(Dataset):
    """Rows of a manifest, optionally filtered by language and by the fields a recipe needs.

    Args:
        path: The ``.jsonl``/``.csv`` file.
        languages: Keep only rows whose ``lang`` is listed (e.g. ``["en"]`` for English-only pivot training).
        required_fields: Fields every row must have (the towers' input fields).
        on_missing: ``"error"`` (default): a row without a required field raises, naming the row and the
            field. ``"skip"``: such rows are dropped and counted in :attr:`skipped`.
    """

    def __init__(
        self,
        path: str | Path,
        languages: Iterable[str] | None = None,
        required_fields: Iterable[str] = (),
        on_missing: str = "error",
    ) -> None:
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        self.path = Path(path)
        rows = read_manifest(self.path)
        self.skipped: dict[str, int] = {}
        if languages is not None:
            langs = set(languages)
            known = {r["lang"] for r in rows}
            if unknown := sorted(langs - known):
                raise ManifestError(f"{self.path}: no rows in language(s) {unknown}; the manifest has {sorted(known)}")
            rows = [r for r in rows if r["lang"] in langs]
        kept = []
        for row in rows:
            missing = [f for f in required_fields if row.get(f) in (None, "")]
            if not missing:
                kept.append(row)
            elif on_missing == "error":
                raise ManifestError(f"{self.path}: row id={row['id']!r} has no {missing[0]!r} (needed by a tower)")
            else:
                for f in missing:
                    self.skipped[f"missing {f}"] = self.skipped.get(f"missing {f}", 0) + 1
        if not kept:
            raise ManifestError(f"{self.path}: no rows left after filtering (languages={languages}, fields={list(required_fields)})")
        self.rows = kept

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    @property
    def languages(self) -> list[str]:
        return sorted({r["lang"] for r in self.rows})
