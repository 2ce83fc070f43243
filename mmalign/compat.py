"""Class paths written by earlier versions keep loading: the alias table of moved modules.

Recipes (YAML), the ``config.yaml`` Lightning saves beside a checkpoint and export ``config.json`` files name
classes by dotted path (``mmalign.module.AlignmentModule``). When a module moves, its old dotted name is
recorded here; :class:`AliasFinder` (installed when :mod:`mmalign` is imported) makes ``import mmalign.module``
return the new module, so jsonargparse, Lightning and the export loader all resolve old paths the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

#: Old module name -> the module that now holds its public names (layout of mmalign 0.1 before the split).
MODULE_ALIASES: dict[str, str] = {
    "mmalign.module": "mmalign.training.module",
    "mmalign.towers": "mmalign.training.towers",
    "mmalign.losses": "mmalign.training.losses",
    "mmalign.gradcache": "mmalign.training.gradcache",
    "mmalign.callbacks": "mmalign.training.callbacks",
    "mmalign.lightning_base": "mmalign.training.base",
    "mmalign.lm": "mmalign.captioning.lm",
    "mmalign.prefix": "mmalign.captioning",
    "mmalign.inference": "mmalign.export",
    "mmalign.evaluate": "mmalign.evaluation.command",
    "mmalign.quickstart": "mmalign.cli.quickstart",
    "mmalign.data.emoji": "mmalign.datasets.emoji",
    "mmalign.data.words": "mmalign.datasets.words",
    "mmalign.data.synthetic": "mmalign.datasets.synthetic",
    "mmalign.data.commands": "mmalign.datasets.commands",
}


def canonical_class_path(path: str) -> str:
    """The current dotted path of ``path`` (unchanged when its module did not move)."""
    module, _, name = path.rpartition(".")
    target = MODULE_ALIASES.get(module)
    if target is None:
        return path
    obj = getattr(importlib.import_module(target), name, None)
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{target}.{name}"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:  # the target module is already executed
        return None


class AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves the old module names of :data:`MODULE_ALIASES` to the moved modules (the same objects)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MODULE_ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put :class:`AliasFinder` on ``sys.meta_path`` once."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
