"""The one encoder contract every frozen backbone in mmalign follows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Sequence

import torch
from torch import Tensor

from encoders.frozen import FrozenModule
from encoders.utils import RecordsInitArgs, masked_mean  # noqa: F401  (masked_mean: re-exported)


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


class Encoder(RecordsInitArgs, FrozenModule):
    """Base class of frozen pretrained encoders.

    Subclasses set ``modality`` and ``output_dim`` (and ``token_dim`` when they give tokens), build
    their backbone in ``__init__`` and call ``self.freeze()`` at the end; they implement ``preprocess``
    (raw items -> CPU tensors, run inside DataLoader workers) and ``encode`` (tensors ->
    :class:`EncoderOutput`). The constructor's arguments are recorded automatically
    (:meth:`init_args`), so ``type(enc)(**enc.init_args())`` rebuilds an equal encoder: subclasses
    take JSON-friendly arguments (names, paths, numbers) and never write that record themselves.

    Frozen (:class:`encoders.frozen.FrozenModule`) means: no parameter requires grad, the module stays
    in eval mode whatever ``.train()`` is called with, ``forward`` runs under ``torch.inference_mode()``,
    and the weights are left out of ``state_dict()`` so checkpoints hold projectors only.

    Attributes:
        modality: What the encoder reads (:class:`Modality`).
        output_dim: Size ``D`` of ``EncoderOutput.pooled`` ``[B, D]``.
        has_tokens: Whether ``encode`` returns ``tokens``/``mask`` (projectors that pool tokens need it).
        token_dim: Size of ``EncoderOutput.tokens`` ``[B, T, token_dim]``; ``None`` for encoders that
            give pooled vectors only. It may differ from ``output_dim`` (CLIP: projected pooled
            vector, unprojected patch states).
    """

    modality: Modality
    output_dim: int
    has_tokens: bool = True
    token_dim: int | None = None

    # -- identity -------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description used for ``cache_key`` and exports.

        Subclasses return what determines their outputs: model id/path, revision, pooling,
        dtype and any preprocessing option. The default lists the class only.
        """
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}"}

    @property
    def cache_key(self) -> str:
        """Stable identity of this encoder's outputs: ``<class>-<hash of spec>``."""
        spec = json.dumps(self.spec(), sort_keys=True, default=str)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
        return f"{type(self).__name__}-{digest}"

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
