"""Data: manifests, raw and cached DataModules, dataset generators (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AlignmentDataModule": "mmalign.data.datamodule",
    "TowerCollator": "mmalign.data.collate",
    "ManifestDataset": "mmalign.data.manifest",
    "ManifestError": "mmalign.data.manifest",
    "read_manifest": "mmalign.data.manifest",
    "build_synthetic_dataset": "mmalign.datasets.synthetic",
    "build_emoji_dataset": "mmalign.datasets.emoji",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmalign.data' has no attribute {name!r}")
