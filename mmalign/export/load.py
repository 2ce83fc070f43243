"""``mmalign.load``: any mmalign export, dispatched on ``config.json``'s ``format``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmalign.export.format import CAPTIONER_FORMAT, read_config
from mmalign.export.model import AlignedModel


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load any mmalign export: an :class:`AlignedModel` (embedding recipes) or a
    :class:`~mmalign.captioning.PrefixCaptioningModule` (visual-prefix recipes, with ``generate``).

    Both loaders treat the export as untrusted (strict JSON, class allowlist, confined paths, sizes checked
    before allocation, sha256); ``trusted_classes=[...]`` and the loader's other keyword arguments pass through.

    Raises:
        ExportError: Not an export, or one that is unsafe or inconsistent (the message says what).
    """
    root = Path(path)
    if read_config(root)["format"] == CAPTIONER_FORMAT:
        from mmalign.captioning import PrefixCaptioningModule

        return PrefixCaptioningModule.from_pretrained(root, **kwargs)
    return AlignedModel.from_pretrained(root, **kwargs)
