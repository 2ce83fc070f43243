"""Helpers every encoder family (and the frozen LM) shares: dtype names, pooling, quiet loading, and
the constructor-argument record that lets exports rebuild encoders, projectors and LMs.

Kept apart from :mod:`encoders.base` so that a family module needs only what it uses, and so that
there is exactly one dtype parser and one masked pooling in the code base.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import torch
from torch import Tensor

_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16", "fp64": "float64", "double": "float64"}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Parse a dtype given in a config: ``"bfloat16"``/``"bf16"``/``"torch.bfloat16"``/``torch.bfloat16``.

    Args:
        dtype: A floating dtype, its name (with or without ``torch.``) or a short alias
            (``fp32``, ``fp16``, ``half``, ``bf16``); ``None`` passes through ("keep the current dtype").

    Raises:
        ValueError: Not a floating-point dtype (weights and features are never integers).
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_FLOAT_DTYPES)}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_FLOAT_DTYPES)} (or fp32/fp16/bf16)")
    return getattr(torch, name)


def dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16`` (or any alias :func:`torch_dtype` takes) -> ``"bfloat16"``."""
    return str(torch_dtype(dtype)).removeprefix("torch.")


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real tokens. ``tokens [B, T, D]``, ``mask [B, T]`` (True = real) -> ``[B, D]``."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype).unsqueeze(-1)  # [B, T, 1]
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


POOLINGS = ("mean", "max")


def pool_frames(tokens: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Pool ``tokens [B, T, D]`` over frames where ``mask [B, T]`` is True -> ``[B, D]``.

    Computed in float32 (a half-precision sum over 1500 Whisper frames loses digits), returned in
    the tokens' dtype.

    Args:
        tokens: Frame states.
        mask: True on real frames.
        pooling: ``"mean"`` or ``"max"``.
    """
    t = tokens.float()
    if pooling == "mean":
        return masked_mean(t, mask).to(tokens.dtype)
    if pooling == "max":
        return t.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1).to(tokens.dtype)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' load report: encoders load model halves (a CLIP vision tower out of a
    full CLIP checkpoint, Whisper's encoder) on purpose, so "unexpected keys" are expected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _record_value(value: Any) -> Any:
    # A torch.dtype given in Python becomes its name: the record goes into JSON (export config.json).
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


class RecordsInitArgs:
    """Mixin: every instance remembers the arguments it was constructed with, by parameter name.

    Subclasses never write the record by hand: ``__init_subclass__`` wraps each subclass's
    ``__init__`` and binds the call to its signature (defaults applied), the idea of
    sentence-transformers' ``get_config_dict``. Only the outermost constructor records, so a
    subclass that adds arguments records its own signature. ``torch.dtype`` values are recorded by
    name, keeping the record JSON-serialisable. ``init_args()`` then rebuilds an equal object:
    ``type(obj)(**obj.init_args())``.
    """

    _init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            if type(self) is cls:
                # Recorded before the body runs, so __init__ may already use it (e.g. in error messages).
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                record: dict[str, Any] = {}
                params = inspect.signature(init).parameters
                for name, value in list(bound.arguments.items())[1:]:  # [0] is self
                    if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                        record.update({k: _record_value(v) for k, v in value.items()})
                    else:
                        record[name] = _record_value(value)
                object.__setattr__(self, "_init_args", record)
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def init_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this object (exports store them in ``config.json``)."""
        return dict(getattr(self, "_init_args", {}))
