"""``mmalign.load``: any mmalign export, dispatched on ``config.json``'s ``format``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmalign.export.format import CONFIG_NAME
from mmalign.export.model import AlignedModel


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load any mmalign export: an :class:`AlignedModel` (embedding recipes) or a
    :class:`~mmalign.captioning.PrefixCaptioningModule` (visual-prefix recipes, with ``generate``)."""
    root = Path(path)
    try:
        fmt = json.loads((root / CONFIG_NAME).read_text(encoding="utf-8")).get("format")
    except (OSError, json.JSONDecodeError):
        fmt = None  # let AlignedModel give the detailed error
    if fmt == "mmalign-prefix-captioner":
        from mmalign.captioning import PrefixCaptioningModule

        return PrefixCaptioningModule.from_pretrained(root, **kwargs)
    return AlignedModel.from_pretrained(root, **kwargs)
