"""``mmalign embed``: embed a file of texts, image paths or audio paths with an export (or an ensemble)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmalign.export.ensemble import AlignedEnsemble
from mmalign.export.model import _FIELD_MODALITY, AlignedModel


def _read_input(path: Path, field: str) -> tuple[list[Any], list[str] | None]:
    """Items (and languages, for manifests) from a ``.txt`` (one item per line) or ``.jsonl``/``.csv`` manifest."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix in (".jsonl", ".csv"):
        from mmalign.data.manifest import read_manifest

        rows = read_manifest(path)
        missing = [r["id"] for r in rows if r.get(field) in (None, "")]
        if missing:
            raise ValueError(f"{path}: {len(missing)} row(s) have no field {field!r}, e.g. id={missing[0]!r}")
        langs = [r["lang"] for r in rows]
        return [r[field] for r in rows], (None if set(langs) == {"und"} else langs)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{i} is empty (one item per line; remove blank lines)")
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
) -> None:
    """Embed a file of items with an exported model and save the ``[N, D]`` float32 matrix as ``.npy``.

    Args:
        model: Export directory (``mmalign export`` output), or a list of them (seeds of one recipe,
            e.g. ``--model '[exports/s0, exports/s1]'``): embedded as one :class:`AlignedEnsemble`.
        input: ``.txt`` (one item per line: texts, or image/audio paths relative to the file) or a
            ``.jsonl``/``.csv`` manifest (the ``field`` column is embedded; rows keep their order).
        output: ``.npy`` file to write.
        field: Manifest column to embed; also picks the tower (the one reading this field, else the
            one of its modality: ``image`` -> image, ``audio`` -> speech).
        tower: Tower name, overriding the choice by ``field``.
        batch_size: Items per encoder call.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda if available).
        dtype: Projector dtype (default: as exported).
        progress: Show a progress bar.
    """
    paths = [model] if isinstance(model, str) else list(model)
    aligned: Any = AlignedModel.from_pretrained(paths[0], device=device, dtype=dtype) if len(paths) == 1 else \
        AlignedEnsemble.from_pretrained(paths, device=device, dtype=dtype)
    items, langs = _read_input(Path(input), field)
    name = aligned.select_tower(field=None if tower else field, tower=tower)
    emb = aligned.embed(items, name, lang=langs if str(aligned.towers[name].encoder.modality) == "text" else None,
                        batch_size=batch_size, progress=progress)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb.numpy())
    what = f"tower {name!r}" + (f", ensemble of {len(paths)}" if len(paths) > 1 else "")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings ({what}) to {out}")
