"""Tiny random twins of every encoder family, for tests and offline configs.

A model reference ``"tiny:<name>"`` (e.g. ``tiny:bert-text``) resolves to a local directory holding a
deterministic, randomly initialised, few-kilobyte model in the family's *own* on-disk format, built on
first use. Encoders then load it through exactly the code path real users take for a hub id or local
directory (``from_pretrained(path)``), so tests exercise the real loading code without a model hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TINY_PREFIX = "tiny:"
_BUILDERS: dict[str, Callable[[Path], None]] = {}


def register_tiny(name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register ``builder(directory)`` that writes the tiny twin ``tiny:<name>`` into ``directory``."""

    def wrap(builder: Callable[[Path], None]) -> Callable[[Path], None]:
        _BUILDERS[name] = builder
        return builder

    return wrap


def tiny_root() -> Path:
    return Path(os.environ.get("MMALIGN_TINY_DIR", Path.home() / ".cache" / "mmalign" / "tiny"))


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable path/id: ``tiny:<name>`` is built (once) under :func:`tiny_root`."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    name = name_or_path[len(TINY_PREFIX):]
    import encoders  # noqa: F401  (importing the families registers their builders)

    if name not in _BUILDERS:
        raise KeyError(f"unknown tiny model {name_or_path!r}; known: {sorted(_BUILDERS)}")
    target = tiny_root() / name
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: concurrent test workers never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _BUILDERS[name](tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def known_tiny_models() -> list[str]:
    import encoders  # noqa: F401

    return sorted(TINY_PREFIX + n for n in _BUILDERS)
