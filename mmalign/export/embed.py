"""``mmalign embed``: embed a file of texts, image paths or audio paths with an export (or an ensemble).

The output is written atomically (a temporary file beside it, then ``os.replace``): a kill or a full
disk never leaves a broken ``.npy`` under the output's name, and an existing output stays as it was.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.export.ensemble import AlignedEnsemble
from mmalign.export.model import _FIELD_MODALITY, AlignedModel


def _read_lines(path: Path, on_error: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of a ``.txt`` list; a line that is not UTF-8 raises naming it, or is skipped."""
    from mmalign.data.manifest import ManifestRowError
    from mmalign.data.policy import BadInputReport

    report = BadInputReport()
    out = []
    for i, data in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        try:
            out.append((i, data.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            detail = f"byte 0x{data[e.start]:02x} at column {e.start + 1} is not UTF-8; the input must be UTF-8 encoded"
            report.handle(ManifestRowError(path, i, f"<line {i}>", "<line>", "invalid utf-8", detail), on_error)
    if report:
        print(f"[mmalign embed] {path}: " + report.summary("lines skipped"))
    return out


def _read_input(path: Path, field: str, on_error: str = "error") -> tuple[list[Any], list[str] | None]:
    """Items (and languages, for manifests) from a ``.txt`` (one item per line) or ``.jsonl``/``.csv`` manifest."""
    from mmalign.data.policy import ON_ERROR, check_choice

    check_choice("on_error", on_error, ON_ERROR)
    if path.suffix != ".txt" and not (path.is_dir() or "{" in str(path) or str(path).endswith(".yaml")):
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix != ".txt":  # a manifest or any source of mmalign.data.sources (Parquet, HF folder, shards...)
        from mmalign.data.sources import open_source

        source = open_source(str(path), on_error=on_error)
        rows = list(source)
        if source.report:
            print(f"[mmalign embed] {path}: " + source.report.summary("rows skipped"))
        missing = [r["id"] for r in rows if r.get(field) in (None, "")]
        if missing:
            raise ValueError(f"{path}: {len(missing)} row(s) have no field {field!r}, e.g. id={missing[0]!r}")
        langs = [r["lang"] for r in rows]
        return [r[field] for r in rows], (None if set(langs) == {"und"} else langs)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    numbered = _read_lines(path, on_error)
    while numbered and not numbered[-1][1].strip():
        numbered.pop()
    for i, line in numbered:
        if not line.strip():
            raise ValueError(f"{path}:{i} is empty (one item per line; remove blank lines)")
    lines = [line for _, line in numbered]
    if field in _FIELD_MODALITY:  # paths, relative to the list's folder like in manifests
        lines = [str((path.parent / line).resolve()) for line in lines]
    return lines, None


def embed(
    model: str | list[str],
    input: str,
    output: str,
    field: str = "text",
    tower: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    on_error: str = "error",
) -> None:
    """Embed a file of items with an exported model and save the ``[N, D]`` float32 matrix as ``.npy``.

    Args:
        model: Export directory (``mmalign export`` output), or a list of them (seeds of one recipe,
            e.g. ``--model '[exports/s0, exports/s1]'``): embedded as one :class:`AlignedEnsemble`.
        input: ``.txt`` (one item per line: texts, or image/audio paths relative to the file), a
            ``.jsonl``/``.csv`` manifest or any data source (Parquet/Arrow, HF folder, ``.yaml`` source spec,
            audio folder, WebDataset shards; docs/data.md): the ``field`` column is embedded, rows keep their order.
        output: ``.npy`` file to write.
        field: Manifest column to embed; also picks the tower (the one reading this field, else the
            one of its modality: ``image`` -> image, ``audio`` -> speech).
        tower: Tower name, overriding the choice by ``field``.
        batch_size: Items per encoder call.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda if available).
        dtype: Projector dtype (default: as exported).
        progress: Show a progress bar.
        on_error: ``"error"`` (default): a line or row that is not UTF-8 (or a bad manifest row) stops the
            run naming the file and line; ``"skip"``: it is left out and counted (the output then has
            fewer rows than the input has lines; the skipped line numbers are printed).

    Raises:
        DiskFullError: The disk filled up while writing ``output`` (an ``OSError``; the message names the
            path and says the disk is full; the previous output, if any, is unchanged).
    """
    from mmalign.cache.format import atomic_save_npy

    items, langs = _read_input(Path(input), field, on_error)  # before loading encoders: bad input fails fast
    paths = [model] if isinstance(model, str) else list(model)
    aligned: Any = AlignedModel.from_pretrained(paths[0], device=device, dtype=dtype) if len(paths) == 1 else \
        AlignedEnsemble.from_pretrained(paths, device=device, dtype=dtype)
    name = aligned.select_tower(field=None if tower else field, tower=tower)
    emb = aligned.embed(items, name, lang=langs if str(aligned.towers[name].encoder.modality) == "text" else None,
                        batch_size=batch_size, progress=progress)
    out = Path(output)
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")  # as np.save names it
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out, emb.numpy())  # temp + rename: never half an .npy under the output's name
    what = f"tower {name!r}" + (f", ensemble of {len(paths)}" if len(paths) > 1 else "")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings ({what}) to {out}")
