"""Towers (frozen encoder -> projector) and objectives (a loss between two towers)."""

from __future__ import annotations

import inspect

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import Encoder, EncoderOutput
from projectors.base import Identity, Projector

ProjectorFactory = Callable[[int, int], Projector]


class Tower(nn.Module):
    """A frozen encoder followed by a trainable projector.

    Args:
        encoder: The frozen encoder.
        field: The sample field this tower reads (``image``, ``audio``, ``text``, ``text_en``...).
        projector: Factory ``(in_dim, out_dim) -> Projector`` (LightningCLI builds it from
            ``class_path``/``init_args`` without dimensions). ``None``: the encoder's pooled output is
            the tower output (a frozen teacher), and its size must equal the shared dimension.
        normalize: L2-normalise the tower output.
    """

    def __init__(self, encoder: Encoder, field: str, projector: ProjectorFactory | None = None, normalize: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.field = field
        self.normalize = normalize
        self._projector_factory = projector
        self.projector: Projector | None = None
        self.out_dim: int | None = None

    def build(self, embed_dim: int | None) -> int:
        """Instantiate the projector for a shared dimension; returns the tower's output size."""
        if self._projector_factory is None:
            self.projector = Identity(self.encoder.output_dim, self.encoder.output_dim)
        else:
            if embed_dim is None:
                raise ValueError(f"tower on field {self.field!r} has a projector: set the module's embed_dim")
            self.projector = self._projector_factory(self.encoder.output_dim, embed_dim)
        self.out_dim = self.projector.out_dim
        return self.out_dim

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.projector.parameters())

    def project(self, features: EncoderOutput) -> Tensor:
        embeds = self.projector(features)
        return F.normalize(embeds, dim=-1) if self.normalize else embeds

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.project(self.encoder(inputs))


class Objective(nn.Module):
    """A weighted loss between the outputs of two named towers.

    Args:
        loss: A loss module ``(a_embeds, b_embeds) -> {"..._loss": Tensor}`` from :mod:`mmalign.training.losses`.
        towers: ``[a, b]``: names of the two towers; for distillation ``a`` is the student, ``b`` the teacher.
        weight: Multiplier of every loss term this objective returns.
    """

    def __init__(self, loss: nn.Module, towers: list[str], weight: float = 1.0) -> None:
        super().__init__()
        if len(towers) != 2:
            raise ValueError(f"an objective compares exactly two towers, got {towers}")
        self.loss = loss
        self.towers = list(towers)
        self.weight = weight
        # Contrastive losses take the rows' group ids (the manifest's concept) to mask false negatives.
        self.takes_groups = "groups" in inspect.signature(loss.forward).parameters

    def forward(self, embeds: dict[str, Tensor], groups: Tensor | None = None) -> dict[str, Tensor]:
        """Weighted loss terms; ``groups [B]`` (int64 group ids) reach losses that accept them."""
        a, b = self.towers
        extra = {"groups": groups} if self.takes_groups and groups is not None else {}
        return {k: self.weight * v for k, v in self.loss(embeds[a], embeds[b], **extra).items()}
