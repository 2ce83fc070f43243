"""``mmalign.load``: any mmalign export (a directory or a hub repo id), dispatched on ``config.json``'s ``format``."""

from __future__ import annotations

import os
from typing import Any

from mmalign.export.format import CAPTIONER_FORMAT, read_config
from mmalign.export.model import AlignedModel

#: Keyword arguments that say where a hub repo comes from (mmalign.export.hub.resolve_export).
HUB_ARGS = ("revision", "cache_dir", "local_files_only", "token")


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load any mmalign export: an :class:`AlignedModel` (embedding recipes) or a
    :class:`~mmalign.captioning.PrefixCaptioningModule` (visual-prefix recipes, with ``generate``).

    ``path`` is an export directory or a hub repo id ``"owner/name"`` (an existing directory wins; see
    :mod:`mmalign.export.hub`; ``revision``/``cache_dir``/``local_files_only``/``token`` are for repos).
    Both loaders treat the export as untrusted (strict JSON, class allowlist, confined paths, sizes checked
    before allocation, sha256); ``trusted_classes=[...]`` and the loader's other keyword arguments pass through.

    Raises:
        ExportError: Not an export, or one that is unsafe or inconsistent (the message says what).
    """
    from mmalign.export.hub import resolve_export

    hub = {k: kwargs.pop(k) for k in HUB_ARGS if k in kwargs}
    with resolve_export(path, **hub) as (root, source):
        if read_config(root)["format"] == CAPTIONER_FORMAT:
            from mmalign.captioning import PrefixCaptioningModule

            return PrefixCaptioningModule.from_pretrained(root, **kwargs)
        model = AlignedModel.from_pretrained(root, **kwargs)
    model.source = source
    return model
