"""The export format shared by every export kind: names, version, strict JSON, atomic writes, checksums,
the class allowlist and path confinement.

An export is meant to be shared like a model on a hub, so a reader treats it as untrusted: nothing it
names is imported unless it is one of the project's own classes of the expected kind (or the user trusts
it by name), no path it holds leaves its folder, and its JSON is parsed strictly.

Format versions:

* 1: embedding exports (``mmalign.aligned_model``) as written by mmalign 0.1; still read. Captioner exports
  of that time (``mmalign-prefix-captioner``, no checksum) are refused with how to re-export them.
* 2: both kinds written by one writer; ``weights.sha256`` is mandatory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Mapping, Sequence

from torch import Tensor

FORMAT = "mmalign.aligned_model"
CAPTIONER_FORMAT = "mmalign.prefix_captioner"
#: Captioner exports of format version 1 (no checksum, module hyper-parameters fed back as written).
LEGACY_CAPTIONER_FORMAT = "mmalign-prefix-captioner"
FORMAT_VERSION = 2
#: Embedding exports with a centred tower (``Tower(center=True)``: ``"center": true`` and its
#: ``towers.<name>.embedding_mean`` tensor) are version 3, so mmalign releases that cannot apply the mean refuse them.
CENTERED_FORMAT_VERSION = 3
READABLE_VERSIONS = {FORMAT: (1, 2, 3), CAPTIONER_FORMAT: (2,)}
#: A centred tower's running output mean, stored as ``towers.<name>.embedding_mean`` (``[output_dim]``).
MEAN_KEY = "embedding_mean"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_DIR = "onnx"
#: The packages whose classes an export may name without ``trusted_classes``.
PROJECT_PACKAGES = ("mmalign", "encoders", "projectors")
#: A config.json is a few KB (the recipe in its provenance included); anything far larger is not one.
MAX_CONFIG_BYTES = 8 << 20

ClassList = Sequence["str | type"]


class ExportError(ValueError):
    """An export cannot be written, or an exported directory is inconsistent or unsafe; the message says what."""


# -- JSON ---------------------------------------------------------------------------------------

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
        if not math.isfinite(value):
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
    """Plain JSON types for descriptive fields (specs, metrics, recipes): unknown objects become ``str``,
    non-finite numbers ``None`` (strict JSON has no NaN)."""
    def default(o: Any) -> Any:
        if isinstance(o, Tensor) and o.numel() == 1:
            return o.item()
        return str(o)

    def finite(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return finite(json.loads(json.dumps(value, default=default, sort_keys=True)))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:  # json.loads keeps the last one silently: two readers could see two different exports
            raise ExportError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ExportError(f"{name} is not JSON")


def read_config(root: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an export, parsed strictly, with a known ``format`` and a readable version.

    Strict: UTF-8, at most :data:`MAX_CONFIG_BYTES`, one JSON object, no duplicate keys, no ``NaN`` /
    ``Infinity``.

    Raises:
        ExportError: Not an export, not strict JSON, an unknown format, or a version this mmalign cannot read
            (format version 1 captioners: the message says how to re-export).
    """
    root = Path(root)
    path = root / CONFIG_NAME
    if not root.exists():
        raise ExportError(f"no such directory: {root} (an export is a folder holding {CONFIG_NAME} and model.safetensors)")
    if not root.is_dir():
        raise ExportError(f"{root} is a file, not an export folder (one holding {CONFIG_NAME} and model.safetensors)")
    if not path.is_file():
        raise ExportError(f"{root} is not an mmalign export: no {CONFIG_NAME}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ExportError(f"{path} is {size:,} bytes; an export's {CONFIG_NAME} is at most {MAX_CONFIG_BYTES:,}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                            parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError and ExportError are ValueErrors
        raise ExportError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ExportError(f"{path} must hold a JSON object, not a {type(config).__name__}")
    fmt = config.get("format")
    if fmt == LEGACY_CAPTIONER_FORMAT:
        raise ExportError(
            f"{root} is a visual-prefix captioner export of format version 1, which records no checksum of its "
            "weights and cannot be verified; re-export it with this mmalign: `mmalign export --ckpt <run>/checkpoints/"
            f"last.ckpt --config <recipe.yaml> --output {root}` (or fit again with ExportOnFitEnd / export_dir)"
        )
    if fmt not in READABLE_VERSIONS:
        raise ExportError(f"{path} is not an mmalign export (format {fmt!r}, expected {FORMAT!r} or {CAPTIONER_FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS[fmt]:
        raise ExportError(f"{path} has format_version {version!r}; this mmalign reads {fmt} versions "
                          f"{list(READABLE_VERSIONS[fmt])}")
    return config


def format_version(towers: Mapping[str, Mapping[str, Any]]) -> int:
    """The ``format_version`` an embedding export with these tower entries is written as (3 iff a tower centres)."""
    return CENTERED_FORMAT_VERSION if any(t.get("center") for t in towers.values()) else FORMAT_VERSION


def field(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``mapping[key]`` checked to be of ``kind`` (config.json values are data until checked)."""
    if not isinstance(mapping, dict):
        raise ExportError(f"config.json: {where} must be an object, not {type(mapping).__name__}")
    if key not in mapping:
        raise ExportError(f"config.json: {where}.{key} is missing")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is an int in Python
        names = "/".join(k.__name__ for k in kinds)
        raise ExportError(f"config.json: {where}.{key} must be {names}, not {type(value).__name__} ({value!r:.60})")
    return value


# -- paths --------------------------------------------------------------------------------------

def confine(root: str | os.PathLike, relative: Any, where: str) -> Path:
    """The file ``relative`` names inside the export folder ``root``; refuses anything that leaves it.

    Absolute paths (POSIX or Windows), ``..`` components and symlinks resolving outside ``root`` are refused.

    Raises:
        ExportError: Naming ``where`` (the config.json key) and the path.
    """
    if not isinstance(relative, str) or not relative:
        raise ExportError(f"config.json: {where} must be a non-empty relative path, not {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise ExportError(f"config.json: {where} {relative!r} points outside the export folder (absolute or '..')")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise ExportError(f"config.json: {where} {relative!r} resolves to {target}, outside the export folder {base}")
    return target


# -- classes ------------------------------------------------------------------------------------

def _trusted_names(trusted: ClassList | None) -> set[str]:
    if isinstance(trusted, (str, type)):  # one class given without a list
        trusted = [trusted]
    return {t if isinstance(t, str) else class_path(t) for t in (trusted or ())}


def allowed_class_path(path: Any, where: str, trusted: ClassList | None = None, kind: str = "classes") -> str:
    """The importable dotted path of ``path`` if a config may name it; checked without importing anything
    (importing a module runs it).

    Allowed: a dotted path under :data:`PROJECT_PACKAGES` (old module names mapped through
    :data:`mmalign.compat.MODULE_ALIASES`), or one listed in ``trusted`` (``"pkg.mod.Class"`` or the class).

    Raises:
        ExportError: Naming ``where`` and ``path``.
    """
    from mmalign.compat import canonical_class_path

    if not isinstance(path, str) or not path:
        raise ExportError(f"{where}: class_path must be a non-empty string, not {path!r}")
    parts = path.split(".")
    # ``__main__`` modules run a program when imported; dunder names are never classes an export needs.
    if len(parts) < 2 or not all(p.isidentifier() and not p.startswith("__") for p in parts):
        raise ExportError(f"{where}: class_path {path!r} is not a full dotted name of a class")
    if path in _trusted_names(trusted):
        return path
    if parts[0] not in PROJECT_PACKAGES:
        raise ExportError(
            f"{where}: refusing to import {path!r}: an export may name only {kind} from the packages "
            f"{', '.join(PROJECT_PACKAGES)}; pass trusted_classes=[{path!r}] to load a class you trust"
        )
    target = canonical_class_path(path)  # imports an alias target only, and those are project modules
    if target.split(".")[0] not in PROJECT_PACKAGES:  # pragma: no cover - the alias table maps within the project
        raise ExportError(f"{where}: {path!r} maps to {target!r}, outside the project's packages")
    return target


def resolve_class(path: Any, base: type, where: str, trusted: ClassList | None = None) -> type:
    """Import the class a config names, if it may be imported (:func:`allowed_class_path`), and check it
    is a subclass of ``base`` before anything calls it (also for trusted classes).

    Args:
        path: The recorded ``class_path``.
        base: Required base class (``Encoder``, ``Projector``, ``FrozenLM``...).
        where: What the class builds, for the message (``"tower 'text' encoder"``).
        trusted: Class paths the user trusts outside the project's packages.

    Raises:
        ExportError: Naming ``where`` and ``path``.
    """
    target = allowed_class_path(path, where, trusted, kind=f"subclasses of {class_path(base)}")
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ExportError(f"{where}: cannot import {path!r} recorded in the export: {err}") from err
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ExportError(f"{where}: {path!r} is not a subclass of {class_path(base)}; refusing to call it")
    return obj


# -- files --------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write strict JSON (``NaN`` refused), pretty-printed, UTF-8."""
    Path(path).write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def check_output_dir(output: str | os.PathLike) -> Path:
    """``output`` as a Path if an export may be written there: new, empty, or holding an earlier export."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / CONFIG_NAME).exists())):
        raise ExportError(f"{output} exists and is not an mmalign export; choose an empty or new directory")
    return output


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``output`` that replaces ``output`` when the block succeeds.

    A reader never sees half an export: the folder is filled first, then renamed into place. An earlier
    export at ``output`` is replaced; any other non-empty directory (or a file) is refused. On error the
    temporary folder is removed and ``output`` is left as it was.
    """
    output = check_output_dir(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        yield tmp
        # mkdtemp makes a private (0700) folder; an export is meant to be shared like any model directory.
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
