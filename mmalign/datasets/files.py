"""Small file helpers shared by the dataset generators: atomic writes, JSON, pruning owned folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image



def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def prune(folder: Path, keep: set[str]) -> None:
    """Remove files of ours in ``folder`` that the new manifests do not point at (and stale temps)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and path.name not in keep and path.suffix in {".png", ".wav", ".tmp"}:
            path.unlink()


# --------------------------------------------------------------------------- builder
