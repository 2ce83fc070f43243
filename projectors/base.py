"""Shared helpers for projectors: every projector maps an ``EncoderOutput`` to ``[B, out_dim]``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from encoders.base import EncoderOutput
from encoders.utils import RecordsInitArgs


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class Projector(RecordsInitArgs, nn.Module):
    """Base class: ``(in_dim, out_dim)`` constructor, ``forward(EncoderOutput) -> [B, out_dim]``.

    ``uses_tokens`` tells the feature cache whether token sequences must be stored. Constructor
    arguments are recorded automatically (:class:`encoders.utils.RecordsInitArgs`, as for encoders),
    so :meth:`config` rebuilds any projector without per-class code.
    """

    uses_tokens: bool = False

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuild this projector (weights aside)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, features: EncoderOutput) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, params={self.num_parameters:,}"


class Identity(Projector):
    """No projection: the pooled encoder output is the tower output (e.g. a frozen teacher)."""

    def forward(self, features: EncoderOutput) -> Tensor:
        return features.pooled
