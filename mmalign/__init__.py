"""mmalign: align frozen image, speech and multilingual text encoders with small projectors.

Names are imported lazily so light commands (``mmalign data ...``) do not pay for torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from mmalign import compat as _compat  # noqa: E402

_compat.install()  # class paths of earlier versions (mmalign.module.AlignmentModule, ...) keep loading

_LAZY = {
    "AlignmentModule": "mmalign.training.module",
    "Objective": "mmalign.training.towers",
    "Tower": "mmalign.training.towers",
    "ClipLoss": "mmalign.training.losses",
    "CosineLoss": "mmalign.training.losses",
    "LogitScale": "mmalign.training.losses",
    "MSELoss": "mmalign.training.losses",
    "SigLipLoss": "mmalign.training.losses",
    "AlignedModel": "mmalign.export.model",
    "ExportTower": "mmalign.export.tower",
    "AlignedEnsemble": "mmalign.export.ensemble",
    "load": "mmalign.export.load",
    "PrefixCaptioningModule": "mmalign.captioning",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
