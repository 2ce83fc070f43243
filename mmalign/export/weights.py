"""Weights of an export (``model.safetensors``): written with a checksum, read back only after checks.

Reading is ordered so that nothing a config.json claims is allocated before it is checked:

1. :func:`open_weights`: the path is confined to the export folder, and the tensor names, shapes and dtypes
   come from the safetensors header (safetensors itself refuses a file shorter or longer than its header says);
2. :func:`build_on_meta` + :func:`check_tensors`: each module is built on the ``meta`` device (no memory)
   from its recorded arguments, and its state-dict shapes must equal the header's, so a config claiming a
   137 GB projector is refused before any allocation;
3. :func:`verify_checksum`: size and sha256 equal the recorded ones;
4. :func:`load_tensors`: the tensors are read and refused if any floating value is NaN/Inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from mmalign.export.format import WEIGHTS_NAME, ExportError, confine, sha256_file

#: safetensors dtype names of the dtypes exported weights may have (trainable weights are floating point).
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
#: Non-floating buffers a module may legitimately hold (BatchNorm's ``num_batches_tracked``); accepted only where
#: the rebuilt module has a buffer of exactly that dtype.
OTHER_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
_NAMES = {v: k for k, v in {**FLOAT_DTYPES, **OTHER_DTYPES}.items()}


def _not_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_weights(state: Mapping[str, Tensor], directory: Path, source: str) -> dict[str, Any]:
    """Write ``state`` as ``directory/model.safetensors``; returns config.json's ``weights`` entry.

    Args:
        state: Tensors to store (contiguous CPU tensors).
        directory: Folder of the export being written.
        source: What the tensors come from, for the message (``"the module"``, a checkpoint path).

    Raises:
        ExportError: A tensor holds NaN/Inf (a diverged run), or has a dtype exports do not carry.
    """
    from safetensors.torch import save_file

    bad = _not_finite(state)
    if bad:
        raise ExportError(f"{source}: tensors {bad} hold NaN/Inf values (did training diverge?); refusing to export them")
    odd = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in _NAMES]
    if odd:
        raise ExportError(f"{source}: tensors {odd} have dtypes exports do not carry")
    path = directory / WEIGHTS_NAME
    save_file(dict(state), str(path), metadata={"format": "pt"})
    return {
        "file": WEIGHTS_NAME,
        "sha256": sha256_file(path),
        "num_bytes": path.stat().st_size,
        "num_parameters": sum(v.numel() for v in state.values()),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
    }


@dataclass
class WeightsFile:
    """An export's weights file after its header was read (no tensor loaded yet).

    Attributes:
        path: The file, inside the export folder.
        info: config.json's ``weights`` entry.
        header: ``{name: (shape, safetensors dtype name)}`` from the file's header.
    """

    path: Path
    info: dict[str, Any]
    header: dict[str, tuple[tuple[int, ...], str]] = dc_field(default_factory=dict)

    def numel(self, prefix: str = "") -> int:
        """Number of values stored under ``prefix``."""
        return sum(math.prod(s) for k, (s, _) in self.header.items() if k.startswith(prefix))

    def count(self, prefix: str = "") -> int:
        """Number of tensors stored under ``prefix``."""
        return sum(1 for k in self.header if k.startswith(prefix))


def open_weights(root: Path, config: Mapping[str, Any]) -> WeightsFile:
    """Confine and open the weights file named by config.json and read its header (not its tensors).

    Raises:
        ExportError: No ``weights`` entry or no sha256 recorded, a path leaving the folder, a missing or
            unreadable file (truncated, trailing bytes, bad header), or a tensor of a dtype exports never hold.
    """
    from safetensors import SafetensorError, safe_open

    info = config.get("weights")
    if not isinstance(info, dict):
        raise ExportError(f"{root}: config.json has no 'weights' object")
    sha = info.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ExportError(f"{root}: config.json records no valid sha256 of the weights ({sha!r:.70}); every export "
                          "written by mmalign has one, so the weights cannot be verified")
    path = confine(root, info.get("file", WEIGHTS_NAME), "weights.file")
    if not path.is_file():
        raise ExportError(f"{root}: weights file {info.get('file', WEIGHTS_NAME)} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {}
            for key in f.keys():
                piece = f.get_slice(key)
                header[key] = (tuple(int(d) for d in piece.get_shape()), piece.get_dtype())
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path} is not a readable safetensors file: {err}") from err
    odd = [f"{k} ({d})" for k, (_, d) in header.items() if d not in FLOAT_DTYPES and d not in OTHER_DTYPES]
    if odd:
        raise ExportError(f"{path}: tensors {odd} have dtypes an export never holds")
    return WeightsFile(path, dict(info), header)


def build_on_meta(cls: type, init_args: Mapping[str, Any], where: str, max_modules: int) -> nn.Module:
    """``cls(**init_args)`` on the ``meta`` device: shapes without memory.

    Building a module is a Python loop over its submodules, so a config asking for millions of blocks would
    take hours even on ``meta``; the build is stopped once it registers more than ``max_modules`` submodules
    (the caller sizes it from the number of tensors the weights file holds).

    Raises:
        ExportError: The arguments do not build a ``cls`` or build one far larger than the weights file.
    """
    registered = 0

    def count(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal registered
        registered += 1
        if registered > max_modules:
            raise ExportError(f"{where}: the recorded arguments build more than {max_modules} submodules, far more "
                              "than the weights file holds tensors for; refusing to build it")

    handle = nn.modules.module.register_module_module_registration_hook(count)
    try:
        with torch.device("meta"):
            return cls(**dict(init_args))
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - a constructor given wrong arguments raises anything
        raise ExportError(f"{where}: {cls.__qualname__}(**init_args) failed: {type(err).__name__}: {err}") from err
    finally:
        handle.remove()


def check_tensors(weights: WeightsFile, expected: Mapping[str, Tensor], prefix: str, where: str) -> list[str]:
    """Problems between the header's tensors under ``prefix`` and a (meta-built) module's state dict.

    Args:
        weights: The opened weights file.
        expected: The rebuilt module's state dict, keys already prefixed.
        prefix: The part of the file the module owns (``"towers.text.projector."``).
        where: Label of the module in messages (``"tower 'text'"``).
    """
    found = {k: v for k, v in weights.header.items() if k.startswith(prefix)}
    problems = [f"{where}: missing tensor {k} {tuple(v.shape)}" for k, v in expected.items() if k not in found]
    problems += [f"{where}: unexpected tensor {k} {s}" for k, (s, _) in found.items() if k not in expected]
    for k, v in expected.items():
        if k not in found:
            continue
        shape, dtype = found[k]
        if shape != tuple(v.shape):
            problems.append(f"{where}: tensor {k} has shape {shape}, the rebuilt module needs {tuple(v.shape)}")
        elif v.is_floating_point() and dtype not in FLOAT_DTYPES:
            problems.append(f"{where}: tensor {k} has dtype {dtype}; weights must be floating point")
        elif not v.is_floating_point() and OTHER_DTYPES.get(dtype) != v.dtype:
            problems.append(f"{where}: tensor {k} has dtype {dtype}, the rebuilt module holds {v.dtype}")
    return problems


def check_listed(weights: WeightsFile, keys: Iterable[str]) -> list[str]:
    """Problems of tensors that no module is rebuilt for (temperatures): present, floating, shaped as listed."""
    listed = weights.info.get("tensors") or {}
    problems = []
    for k in keys:
        meta = listed.get(k) if isinstance(listed, dict) else None
        if k not in weights.header:
            problems.append(f"tensor {k} listed in config.json is missing")
        elif not isinstance(meta, dict) or list(weights.header[k][0]) != meta.get("shape"):
            problems.append(f"tensor {k} has shape {weights.header[k][0]}, config.json records "
                            f"{meta.get('shape') if isinstance(meta, dict) else None}")
        elif weights.header[k][1] not in FLOAT_DTYPES:
            problems.append(f"tensor {k} has dtype {weights.header[k][1]}; weights must be floating point")
    return problems


def verify_checksum(weights: WeightsFile) -> None:
    """Refuse a weights file whose size or sha256 differs from config.json's record."""
    size, recorded = weights.path.stat().st_size, weights.info.get("num_bytes")
    if recorded is not None and size != recorded:  # no need to hash a file of the wrong size
        raise ExportError(f"{weights.path} is {size:,} bytes, config.json records {recorded!r}, so its sha256 differs "
                          "from the one recorded at export: the weights were modified or truncated after export")
    if sha256_file(weights.path) != weights.info["sha256"]:
        raise ExportError(f"{weights.path} has the expected tensors but its sha256 differs from the one recorded at "
                          "export: the weights were modified after export")


def load_tensors(weights: WeightsFile, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read every tensor (after the checks above) and refuse NaN/Inf values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights.path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{weights.path} is not a readable safetensors file: {err}") from err
    bad = _not_finite(tensors)
    if bad:
        raise ExportError(f"{weights.path}: tensors {bad} hold NaN/Inf values; refusing to load them")
    return tensors
