"""Rebuilding what an export's config.json describes, shared by every export kind.

Every class goes through :func:`~mmalign.export.format.resolve_class` (project packages or ``trusted_classes``,
right base class); projectors are first built on the ``meta`` device and compared with the weights header;
encoders are checked to be the ones the projector was trained on (``cache_key``, ``output_dim``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from mmalign.export.format import ClassList, ExportError, field, resolve_class
from mmalign.export.weights import WeightsFile, build_on_meta, check_tensors


def spec_diff(recorded: Mapping[str, Any], rebuilt: Mapping[str, Any]) -> list[str]:
    """``key: recorded X, rebuilt Y`` for every spec field that differs."""
    recorded = recorded if isinstance(recorded, dict) else {}
    rebuilt = json.loads(json.dumps(rebuilt, default=str, sort_keys=True))
    keys = sorted(set(recorded) | set(rebuilt))
    return [
        f"{k}: recorded {recorded.get(k, '<absent>')!r}, rebuilt {rebuilt.get(k, '<absent>')!r}"
        for k in keys if recorded.get(k, "<absent>") != rebuilt.get(k, "<absent>")
    ]


#: Constructor arguments through which an encoder or LM reads model files (a nested ``*_args`` dict is searched too).
MODEL_LOCATION_ARGS = ("model_name_or_path", "model_name", "tokenizer_name", "checkpoint_path", "path")


def local_model_paths(init_args: Mapping[str, Any], prefix: str = "init_args") -> list[tuple[str, str]]:
    """``(key, value)`` of the recorded arguments that name a LOCAL file or folder rather than a model by name.

    A shared export names its frozen models by hub id or ``tiny:``/``packaged:`` name; a local path (absolute,
    ``~``, ``.``/``..``, a ``local-dir:``/``file:`` reference, or any value that exists on disk relative to the
    current directory) would make loading it read files outside its folder, so the loader refuses those unless
    the user passes the path themselves (``encoder_overrides``).
    """
    from pathlib import PurePosixPath, PureWindowsPath

    found = []
    for key, value in init_args.items():
        if isinstance(value, Mapping):
            found += local_model_paths(value, f"{prefix}.{key}")
            continue
        if key not in MODEL_LOCATION_ARGS or not isinstance(value, str) or not value:
            continue
        if value.startswith(("tiny:", "packaged:")):
            continue
        bare = value.split(":", 1)[1] if value.startswith(("local-dir:", "file:")) else value
        posix, windows = PurePosixPath(bare), PureWindowsPath(bare)
        if (bare != value or posix.is_absolute() or windows.is_absolute() or windows.drive or bare.startswith((".", "~"))
                or ".." in posix.parts or ".." in windows.parts or Path(bare).exists()):
            found.append((f"{prefix}.{key}", value))
    return found


def refuse_local_paths(init_args: Mapping[str, Any], key: str, who: str, hint: str) -> None:
    """:class:`ExportError` naming each recorded argument of ``key`` that is a local path (:func:`local_model_paths`)."""
    bad = local_model_paths(init_args)
    if bad:
        listed = ", ".join(f"{k} {v!r}" for k, v in bad)
        raise ExportError(f"{who}: config.json {key}.{listed} names a local path; an export names its frozen models by "
                          f"hub id or tiny:/packaged: name, so loading it never reads files outside its folder. {hint}")


def instantiate(cls: type, init_args: Mapping[str, Any], where: str) -> Any:
    """``cls(**init_args)``; a constructor refusing the recorded arguments becomes an :class:`ExportError`."""
    try:
        return cls(**dict(init_args))
    except (TypeError, ValueError) as err:
        raise ExportError(f"{where}: {cls.__qualname__}(**init_args) failed: {err}") from err


def build_encoder(cfg: Any, key: str, who: str, override: Mapping[str, Any] | None = None, strict: bool = True,
                  trusted: ClassList | None = None, label: str | None = None, hint: str | None = None) -> nn.Module:
    """Rebuild a frozen encoder from ``{"class_path", "init_args", "cache_key", "output_dim", "spec"}``.

    Args:
        cfg: The recorded encoder entry.
        key: Its config.json key (``towers.text.encoder``, ``image_encoder``), for messages.
        who: What it belongs to, for messages (``"tower 'text'"``, ``"image_encoder"``).
        override: ``{init_arg: value}`` replacing recorded arguments (a local copy of the same checkpoint).
        strict: Refuse an encoder whose ``cache_key`` differs from the recorded one (else warn).
        trusted: Class paths trusted outside the project's packages.
        label: Name of the class slot in refusals (default ``"<who> encoder"``).
        hint: How the caller's users pass a local path themselves (default: the embedding export's
            ``encoder_overrides``), in the refusal of a recorded local path.

    Raises:
        ExportError: A refused class, or an encoder other than the recorded one (a different ``output_dim``
            always; a different ``cache_key`` when ``strict``).
    """
    from encoders.base import Encoder

    label = label or f"{who} encoder"
    path = field(cfg, "class_path", str, key)
    cls = resolve_class(path, Encoder, label, trusted)
    recorded = field(cfg, "init_args", dict, key)
    mine = {k: v for k, v in recorded.items() if k not in (override or {})}  # what the user passes is theirs to trust
    refuse_local_paths(mine, key, label, hint or (
        "To load a local model you trust, pass its path yourself: "
        "AlignedModel.from_pretrained(..., encoder_overrides={<tower>: {<argument>: <path>}}) "
        "(mmalign embed: --encoder_overrides '{<tower>: {<argument>: <path>}}'); a path other than the "
        "recorded one is another cache_key, so it also needs strict=False (--strict false)."))
    init_args = {**recorded, **dict(override or {})}
    output_dim = field(cfg, "output_dim", int, key)
    encoder = instantiate(cls, init_args, f"{label} {path}")
    problems = []
    if encoder.cache_key != cfg.get("cache_key"):
        problems.append(f"cache_key {encoder.cache_key} != recorded {cfg.get('cache_key')}")
        problems += [f"  {d}" for d in spec_diff(cfg.get("spec", {}), encoder.spec())]
    if int(encoder.output_dim) != output_dim:
        raise ExportError(
            f"{who}: the rebuilt encoder {path} gives {encoder.output_dim}-d features but the projector was trained "
            f"on {output_dim}-d ones\n" + "\n".join(problems)
        )
    if problems:
        msg = (f"{who}: the encoder rebuilt from config.json ({path}) is not the one the projector was trained "
               "on:\n" + "\n".join(problems))
        if strict:
            raise ExportError(msg + "\n(pass strict=False to load it anyway)")
        warnings.warn(msg, stacklevel=4)
    return encoder


def check_projector(cfg: Any, weights: WeightsFile, prefix: str, key: str, who: str, label: str | None = None,
                    trusted: ClassList | None = None) -> tuple[type, dict[str, Any], list[str]]:
    """Resolve a recorded projector and compare its meta-device build with the weights header.

    Nothing is allocated: the projector is built on ``meta``, with a submodule budget proportional to the
    number of tensors the file stores under ``prefix``.

    Args:
        cfg: The recorded projector entry (``class_path``, ``init_args``).
        weights: The opened weights file.
        prefix: Its tensors' prefix in the file (``towers.text.projector.``).
        key: Its config.json key, for messages.
        who: What it belongs to, for messages (``"tower 'text'"``, ``"projector"``).
        label: Name of the class slot in refusals (default ``"<who> projector"``).
        trusted: Class paths trusted outside the project's packages.

    Returns:
        ``(class, init_args, problems)``: problems list missing/unexpected/reshaped tensors.
    """
    from projectors.base import Projector

    label = label or f"{who} projector"
    path = field(cfg, "class_path", str, key)
    cls = resolve_class(path, Projector, label, trusted)
    init_args = field(cfg, "init_args", dict, key)
    meta = build_on_meta(cls, init_args, f"{label} {path}", max_modules=8 * weights.count(prefix) + 64)
    expected = {prefix + k: v for k, v in meta.state_dict().items()}
    return cls, dict(init_args), check_tensors(weights, expected, prefix, who)
