"""The export format: names, version, strict JSON and checksums shared by every export kind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

FORMAT = "mmalign.aligned_model"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_DIR = "onnx"


class ExportError(ValueError):
    """An export cannot be written, or an exported directory is inconsistent; the message says what."""


# -- JSON helpers ------------------------------------------------------------------------------

def class_path(obj: Any) -> str:
    """``module.QualName`` of an object's class (what ``class_path`` in YAML and config.json means)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def json_strict(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON types; raise naming ``where`` if it holds anything else.

    Used for constructor arguments, which must rebuild objects exactly: a silent ``str()`` of an
    object would produce an export that loads into something different.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ExportError(f"{where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ExportError(f"{where} has a non-string key {k!r}")
            out[k] = json_strict(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [json_strict(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ExportError(
        f"{where} is a {type(value).__name__} ({value!r:.80}); exports hold plain JSON values only, "
        "so this object cannot be recorded for rebuilding"
    )


def json_loose(value: Any) -> Any:
    """Plain JSON types for descriptive fields (specs, metrics, recipes): unknown objects become ``str``."""
    def default(o: Any) -> Any:
        if isinstance(o, Tensor) and o.numel() == 1:
            return o.item()
        return str(o)

    return json.loads(json.dumps(value, default=default, sort_keys=True))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
