"""Plain text corpora: ``.txt`` or ``.txt.gz``, one text per line (text-only recipes, e.g. a uCLIP pivot).

The file is memory-mapped and indexed by line offsets (one int64 per line, no string held); a ``.txt.gz``
is decompressed once into ``$MMALIGN_ARROW_CACHE`` (keyed by path, size, mtime) and mapped the same way.
Row ``i`` is ``{"id": "<stem>-<line>", "concept": id, "lang": lang, "text": line}`` (``line`` 1-based), plus
``text_en: line`` when ``lang`` is ``en`` (an English corpus feeds a pivot's English teacher tower).
Blank lines are not rows; a line that is not UTF-8 is bad input (``invalid utf-8``), found when opening.
"""

from __future__ import annotations

import gzip
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mmalign.data.manifest import ManifestError
from mmalign.data.policy import ON_ERROR, BadInputReport, check_choice, is_known_language
from mmalign.data.sources.base import RowError, RowSource, SourceError
from mmalign.data.sources.arrow_copies import derived_copy


def _plain(path: Path) -> Path:
    if not path.name.endswith(".gz"):
        return path
    out, tmp = derived_copy(path, suffix=".txt")
    if tmp is not None:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, out)
    return out


class TextCorpusSource(RowSource):
    """One text per line of a ``.txt``/``.txt.gz`` file.

    Args:
        path: The corpus.
        lang: Language of every line (ISO 639-1; default ``und``).
        languages: Keep only these languages (the corpus has one).
        required_fields: Fields the towers read; only ``text`` (and ``id``/``concept``/``lang``) exist here.
        on_error: ``"error"`` (default) or ``"skip"`` lines that are not UTF-8.
    """

    def __init__(self, path: str | Path, lang: str | None = None, languages: Iterable[str] | None = None,
                 required_fields: Iterable[str] = (), on_error: str = "error") -> None:
        check_choice("on_error", on_error, ON_ERROR)
        self.path = Path(path)
        self.lang = lang or "und"
        if not is_known_language(self.lang):
            raise SourceError(f"{self.path}: lang: {self.lang!r} is not an ISO 639-1 code or 'und'")
        # an English corpus's text is its English text too: a pivot's teacher tower reads ``text_en``
        fields = {"text", "id", "concept", "lang"} | ({"text_en"} if self.lang == "en" else set())
        other = sorted(set(required_fields) - fields)
        if other:
            raise SourceError(f"{self.path}: a text corpus has only `text` (and `text_en` when lang is en); the towers read {other}")
        if languages is not None and self.lang not in set(languages):
            raise ManifestError(f"{self.path}: no rows in language(s) {sorted(languages)}; the source has ['{self.lang}']")
        self.report = BadInputReport()
        self._file = _plain(self.path)
        self._open()
        data = np.frombuffer(self._mm, dtype=np.uint8) if len(self._mm) else np.zeros(0, np.uint8)
        ends = np.flatnonzero(data == 10)
        if len(data) and data[-1] != 10:
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        # strip "\r" and skip blank lines (whitespace-only lines are checked when read: rare)
        keep = ends > starts
        lines = np.arange(1, len(ends) + 1)
        self._starts, self._ends, self._lines = starts[keep], ends[keep].astype(np.int64), lines[keep]
        high = np.flatnonzero(data >= 0x80)
        if len(high):  # check UTF-8 only of the lines that have non-ASCII bytes
            bad = []
            for j in np.unique(np.searchsorted(self._ends, high)):
                try:
                    bytes(self._mm[self._starts[j]:self._ends[j]]).decode("utf-8")
                except UnicodeDecodeError as e:
                    self.report.handle(RowError(self.path, int(self._lines[j]), f"<line {self._lines[j]}>", "text", "invalid utf-8",
                                                f"byte at column {e.start + 1} is not UTF-8"), on_error)
                    bad.append(j)
            if bad:
                ok = np.ones(len(self._starts), bool)
                ok[bad] = False
                self._starts, self._ends, self._lines = self._starts[ok], self._ends[ok], self._lines[ok]
        if not len(self._starts):
            raise ManifestError(f"{self.path}: no lines left ({self.report.summary()})")

    def _open(self) -> None:
        with open(self._file, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(self._file) else b""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_mm", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        text = bytes(self._mm[self._starts[index]:self._ends[index]]).decode("utf-8").rstrip("\r")
        rid = f"{self.path.name.split('.')[0]}-{int(self._lines[index])}"
        row = {"id": rid, "concept": rid, "lang": self.lang, "text": text}
        if self.lang == "en":
            row["text_en"] = text
        return row

    @property
    def languages(self) -> list[str]:
        return [self.lang]
