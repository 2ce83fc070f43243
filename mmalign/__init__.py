"""mmalign: align frozen image, speech and multilingual text encoders with small projectors.

Names are imported lazily so light commands (``mmalign data ...``) do not pay for torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AlignmentModule": "mmalign.module",
    "Objective": "mmalign.towers",
    "Tower": "mmalign.towers",
    "ClipLoss": "mmalign.losses",
    "CosineLoss": "mmalign.losses",
    "LogitScale": "mmalign.losses",
    "MSELoss": "mmalign.losses",
    "SigLipLoss": "mmalign.losses",
    "AlignedModel": "mmalign.inference",
    "AlignedEnsemble": "mmalign.inference",
    "load": "mmalign.inference",
    "PrefixCaptioningModule": "mmalign.prefix",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
