"""Several map-style sources read in order as one (``train: [a.parquet, b.jsonl]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mmalign.data.manifest import ManifestError
from mmalign.data.policy import BadInputReport
from mmalign.data.sources.base import RowSource, SourceError


class ConcatSource(RowSource):
    """The rows of ``parts`` in order (ids are checked within each part, not across parts).

    Args:
        parts: Map-style sources.
        languages: Keep only rows in these languages (applied per part; a language absent from all is an error).
    """

    def __init__(self, parts: Sequence[Any], languages: Iterable[str] | None = None) -> None:
        if any(not hasattr(p, "__getitem__") for p in parts):
            raise SourceError("a list of sources cannot mix WebDataset shards with other formats; list the shards in one pattern")
        self.parts = list(parts)
        self.path = Path("+".join(str(p.path) for p in self.parts))
        self.report = BadInputReport()
        for p in self.parts:
            self.report.merge(p.report)
        self._index: list[np.ndarray] | None = None
        if languages is not None:
            langs = set(languages)
            present = {lang for p in self.parts for lang in p.languages}
            if unknown := sorted(langs - present):
                raise ManifestError(f"{self.path}: no rows in language(s) {unknown}; the sources have {sorted(present)}")
            self._index = [np.array([i for i in range(len(p)) if p[i]["lang"] in langs], dtype=np.int64) for p in self.parts]
        sizes = [len(p) if self._index is None else len(ix) for p, ix in zip(self.parts, self._index or [None] * len(self.parts))]
        self._offsets = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        j = index - int(self._offsets[k])
        return self.parts[k][int(self._index[k][j]) if self._index is not None else j]

    @property
    def languages(self) -> list[str]:
        return sorted({lang for p in self.parts for lang in p.languages})
