"""Audio folders with transcripts: LJSpeech (``metadata.csv`` + ``wavs/``) and Common Voice (``*.tsv`` + ``clips/``).

LJSpeech: ``metadata.csv`` lines are ``id|transcription|normalized transcription`` (pipe-separated, no header,
no quoting); the clip is ``wavs/<id>.wav``; ``text`` is the normalized transcription (the raw one when
empty); ``lang`` is ``en`` unless the spec says otherwise. Common Voice: a split file (``train.tsv``,
``dev.tsv``, ``test.tsv``, ``validated.tsv``...; tab-separated with a header ``client_id path sentence ...
locale``) next to ``clips/``; ``id`` is the clip's stem, ``lang`` the ``locale`` column (its primary subtag,
``pt-BR`` stays ``pt-BR``) or the spec's ``lang``. Both give one row per clip:
``{"id", "concept": id, "lang", "text": transcript, "audio": absolute path}``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmalign.data.sources.base import ListSource, RowError, SourceError


def _lines(path: Path, report, on_error: str) -> Iterator[tuple[int, str]]:
    for n, data in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            line = data.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            report.handle(RowError(path, n, f"<line {n}>", "<row>", "invalid utf-8", f"byte at column {e.start + 1}"), on_error)
            continue
        if line.strip():
            yield n, line


def ljspeech_rows(folder: Path, lang: str | None, report, on_error: str) -> Iterator[tuple[int, dict[str, Any]]]:
    meta = folder / "metadata.csv"
    if not meta.is_file():
        raise SourceError(f"{folder}: an LJSpeech folder needs metadata.csv (id|text|normalized) and wavs/")
    for n, line in _lines(meta, report, on_error):
        parts = line.split("|")
        if len(parts) < 2:
            report.handle(RowError(meta, n, f"<line {n}>", "<row>", "malformed row", "expected id|text[|normalized]"), on_error)
            continue
        text = parts[2] if len(parts) > 2 and parts[2].strip() else parts[1]
        yield n, {"id": parts[0], "lang": lang or "en", "text": text, "audio": str((folder / "wavs" / f"{parts[0]}.wav").resolve())}


def commonvoice_rows(tsv: Path, lang: str | None, report, on_error: str) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(min(sys.maxsize, 1 << 31 - 1))
    text = tsv.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")
    reader = csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    if not reader.fieldnames or not {"path", "sentence"} <= set(reader.fieldnames):
        raise SourceError(f"{tsv}: a Common Voice split file needs the columns path and sentence, got {reader.fieldnames}")
    clips = tsv.parent / "clips"
    for n, r in enumerate(reader, 2):
        if not r.get("path"):
            report.handle(RowError(tsv, n, f"<line {n}>", "audio", "missing audio", "empty path"), on_error)
            continue
        locale = (r.get("locale") or "").strip() or lang or "und"
        yield n, {"id": Path(r["path"]).stem, "lang": lang or locale, "text": r.get("sentence") or "",
                  "audio": str((clips / r["path"]).resolve())}


def audio_folder_source(path: Path, fmt: str, lang: str | None = None, split: str | None = None,
                        languages: Iterable[str] | None = None, required_fields: Iterable[str] = (),
                        on_error: str = "error", check_files: bool = True) -> ListSource:
    """An LJSpeech folder or a Common Voice ``.tsv`` (or a Common Voice folder with ``split``) as rows."""
    from mmalign.data.policy import BadInputReport

    report = BadInputReport()
    if fmt == "ljspeech":
        rows = ljspeech_rows(path, lang, report, on_error)
    else:
        if path.is_dir():
            tsv = path / f"{split or 'test'}.tsv"
            if not tsv.is_file():
                have = sorted(p.stem for p in path.glob("*.tsv"))
                raise SourceError(f"{path}: no {tsv.name}; give `split:` one of {have}")
            path = tsv
        rows = commonvoice_rows(path, lang, report, on_error)
    return ListSource(rows, path, languages, required_fields, on_error, check_files, report=report)
