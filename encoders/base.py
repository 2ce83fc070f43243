"""The one encoder contract every frozen backbone in mmalign follows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Sequence

import torch
from torch import Tensor, nn


class Modality(StrEnum):
    IMAGE = "image"
    SPEECH = "speech"
    TEXT = "text"


@dataclass
class EncoderOutput:
    """What a frozen encoder hands to a projector.

    Attributes:
        pooled: One vector per item, ``[B, D]``.
        tokens: Per-token (patch, frame, subword) states, ``[B, T, D]``, or ``None`` for
            encoders that only give sentence vectors.
        mask: ``[B, T]`` bool, True on real tokens (False on padding), or ``None``.
    """

    pooled: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EncoderOutput":
        """Move to ``device``; ``dtype`` applies to the float tensors only (never the mask)."""
        def move(t: Tensor | None, cast: bool) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else None)

        return EncoderOutput(move(self.pooled, True), move(self.tokens, True), move(self.mask, False))

    def float(self) -> "EncoderOutput":
        return EncoderOutput(
            pooled=self.pooled.float(),
            tokens=None if self.tokens is None else self.tokens.float(),
            mask=self.mask,
        )

    def __getitem__(self, index: Any) -> "EncoderOutput":
        return EncoderOutput(
            pooled=self.pooled[index],
            tokens=None if self.tokens is None else self.tokens[index],
            mask=None if self.mask is None else self.mask[index],
        )


class Encoder(nn.Module):
    """Base class of frozen pretrained encoders.

    Subclasses set ``modality`` and ``output_dim``, build their backbone in ``__init__`` and
    call ``self.freeze()`` at the end; they implement ``preprocess`` (raw items -> CPU tensors,
    run inside DataLoader workers) and ``encode`` (tensors -> :class:`EncoderOutput`).

    Frozen means: no parameter requires grad, the module stays in eval mode whatever
    ``.train()`` is called with, ``forward`` runs under ``torch.inference_mode()``, and the
    weights are left out of ``state_dict()`` so checkpoints hold projectors only.
    """

    modality: Modality
    output_dim: int
    #: Whether ``encode`` returns ``tokens``/``mask`` (projectors that pool tokens need it).
    has_tokens: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False
        self.register_load_state_dict_post_hook(Encoder._forget_frozen_keys)

    # -- identity -------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description used for ``cache_key`` and exports.

        Subclasses return what determines their outputs: model id/path, revision, pooling,
        dtype and any preprocessing option. The default lists the class only.
        """
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}"}

    def init_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this encoder (for exported checkpoints)."""
        return dict(getattr(self, "_init_args", {}))

    @property
    def cache_key(self) -> str:
        """Stable identity of this encoder's outputs: ``<class>-<hash of spec>``."""
        spec = json.dumps(self.spec(), sort_keys=True, default=str)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
        return f"{type(self).__name__}-{digest}"

    # -- freezing -------------------------------------------------------------------------
    def freeze(self) -> "Encoder":
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        nn.Module.train(self, False)
        return self

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen encoders stay in eval mode: dropout and batch-norm statistics never change.
        return nn.Module.train(self, False if self._frozen else mode)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        if self._frozen:
            destination = kwargs.get("destination", args[0] if args else None)
            return destination if destination is not None else {}
        return super().state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        self._load_prefix = prefix
        if self._frozen:  # frozen weights come from the pretrained source, never a checkpoint
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _forget_frozen_keys(module: "Encoder", incompatible_keys: Any) -> None:
        # Registered as a load_state_dict post-hook: checkpoints never hold frozen encoder weights, so
        # their absence is not a "missing key" (strict loading of projector checkpoints stays strict).
        if module._frozen:
            prefix = getattr(module, "_load_prefix", "")
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]

    # -- data -----------------------------------------------------------------------------
    def preprocess(self, items: Sequence[Any]) -> dict[str, Tensor]:
        """Turn raw items (paths, arrays, strings) into a batch of CPU tensors."""
        raise NotImplementedError

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        raise NotImplementedError

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        if not self._frozen:
            return self.encode(inputs)
        with torch.inference_mode():
            out = self.encode(inputs)
        # Clone out of inference mode so projectors can use the tensors in autograd.
        return EncoderOutput(
            pooled=out.pooled.clone(),
            tokens=None if out.tokens is None else out.tokens.clone(),
            mask=None if out.mask is None else out.mask.clone(),
        )

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real tokens. ``tokens [B, T, D]``, ``mask [B, T]`` (True = real)."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype).unsqueeze(-1)  # [B, T, 1]
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def check_texts(items: Sequence[Any]) -> list[str]:
    """Return ``items`` as a list of non-blank strings; errors name the offending index."""
    if isinstance(items, str):
        raise TypeError("expected a sequence of strings, got a single string; wrap it in a list")
    texts = list(items)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text item #{i} is a {type(t).__name__}, not a str: {t!r:.80}")
        if not t.strip():
            raise ValueError(f"text item #{i} is empty or whitespace only: {t!r}")
    return texts
