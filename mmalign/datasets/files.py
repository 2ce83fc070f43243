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


def finished_info(root: Path) -> tuple[bool, dict[str, Any]]:
    """``(done, info)`` of a generator's folder: ``done`` when its ``.complete`` marker exists (``info`` is then its
    ``info.json``, ``{}`` if unreadable); the caller reuses the folder when ``info`` matches ``fingerprint``."""
    if not (root / ".complete").is_file():
        return False, {}
    try:
        return True, json.loads((root / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True, {}


def matches(info: dict[str, Any], fingerprint: dict[str, Any]) -> bool:
    """Whether a finished folder's ``info`` was built with ``fingerprint`` (every key equal)."""
    return {k: info.get(k) for k in fingerprint} == fingerprint

