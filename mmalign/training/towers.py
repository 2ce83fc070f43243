"""Towers (frozen encoder -> projector) and objectives (a loss between two towers)."""

from __future__ import annotations

import inspect

from typing import Callable

import torch
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
        lr_scale: This tower's projector trains at ``lr_scale`` times the optimizer's learning rate (its own
            parameter group; the scheduler scales it alike). E.g. a :class:`projectors.CascadeResidual` that
            corrects an ASR cascade gently while the image tower beside it learns at the full rate.
        center: Close the modality gap (Liang et al., NeurIPS 2022: each tower's outputs sit in a cone of their
            own, and the offset between two towers' cones is noise for retrieval between them). The tower keeps
            the running mean of its outputs over the training rows (buffer ``embedding_mean``, tracked in training
            steps by :meth:`track_mean`, like BatchNorm's statistics) and, outside training (``eval()``: validation,
            test, export, ``embed_*``), returns ``output - mean`` (re-normalised when ``normalize``). The
            objectives train on the plain outputs. The mean travels in checkpoints and exports.
        center_momentum: Weight of each training batch in the running mean once the mean has seen
            ``batch rows / center_momentum`` rows; before that the mean is the plain average of every row seen.
    """

    def __init__(self, encoder: Encoder, field: str, projector: ProjectorFactory | None = None, normalize: bool = False,
                 lr_scale: float = 1.0, center: bool = False, center_momentum: float = 0.01) -> None:
        super().__init__()
        if not (isinstance(lr_scale, (int, float)) and lr_scale > 0 and lr_scale == lr_scale and lr_scale != float("inf")):
            raise ValueError(f"tower on field {field!r}: lr_scale must be a positive finite number, got {lr_scale!r}")
        if not (isinstance(center_momentum, (int, float)) and 0 < center_momentum <= 1):
            raise ValueError(f"tower on field {field!r}: center_momentum must be in (0, 1], got {center_momentum!r}")
        self.encoder = encoder
        self.field = field
        self.normalize = normalize
        self.lr_scale = float(lr_scale)
        self.center = bool(center)
        self.center_momentum = float(center_momentum)
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
        if self.center:
            self.register_buffer("embedding_mean", torch.zeros(self.out_dim))  # [D], of the plain outputs
            self.register_buffer("embedding_count", torch.zeros((), dtype=torch.long))  # training rows averaged
        return self.out_dim

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.projector.parameters())

    def project(self, features: EncoderOutput) -> Tensor:
        embeds = self.projector(features)
        if self.normalize:
            embeds = F.normalize(embeds, dim=-1)
        if self.center and not self.training:
            embeds = embeds - self.embedding_mean.to(device=embeds.device, dtype=embeds.dtype)
            embeds = F.normalize(embeds, dim=-1) if self.normalize else embeds
        return embeds

    @torch.no_grad()
    def track_mean(self, embeds: Tensor, rows: Tensor | int | None = None) -> None:
        """Fold a training batch's outputs into the running mean (``center=True`` towers; a no-op otherwise).

        Tensor ops only (no ``.item()``, no data-dependent branch), so a sweep's ``vmap`` over members runs it with
        each member's own stacked buffers.

        Args:
            embeds: ``[N, D]`` this tower's plain (uncentred) outputs of the batch's rows that hold its field, or
                ``[D]`` their SUM when ``rows`` is given (what a DDP all-reduce yields).
            rows: Number of rows summed in ``embeds`` (``[]`` tensor or int); None: ``embeds`` is ``[N, D]``.
        """
        if not self.center:
            return
        total = embeds.float().sum(0) if rows is None else embeds.float()
        n = torch.as_tensor(len(embeds) if rows is None else rows, dtype=torch.float32, device=total.device)
        seen = self.embedding_count.float()
        # the plain average until the window is full, then an EMA; a batch without rows changes nothing
        weight = torch.where(n > 0, torch.clamp(n / (seen + n).clamp(min=1.0), min=self.center_momentum), 0.0)
        mean = self.embedding_mean.float()
        self.embedding_mean.copy_(mean + weight * (total / n.clamp(min=1.0) - mean))
        self.embedding_count.add_(n.round().long())

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
        params = inspect.signature(loss.forward).parameters
        # Contrastive losses take the rows' group ids (the manifest's concept) to mask false negatives.
        self.takes_groups = "groups" in params
        # ... and a row mask (partial-modality batches): masked rows are neither queries nor negatives, and the
        # batch keeps its size on every rank, so the DDP gather still lines up.
        self.takes_mask = "mask" in params

    def forward(self, embeds: dict[str, Tensor], groups: Tensor | None = None, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Weighted loss terms on the rows that hold both towers.

        Args:
            embeds: ``{tower: [B, D]}`` (rows without a tower's field hold zeros there).
            groups: ``[B]`` int64 group ids, for losses that accept them.
            mask: ``[B]`` bool, rows that have both towers (None: every row). Losses that accept ``mask``
                get it (always, so every DDP rank runs the same collectives); others see the selected rows
                only, and return ``{}`` when there are none.
        """
        a, b = self.towers
        x_a, x_b = embeds[a], embeds[b]
        extra: dict[str, Tensor] = {}
        if self.takes_mask:
            extra["mask"] = mask if mask is not None else torch.ones(len(x_a), dtype=torch.bool, device=x_a.device)
        elif mask is not None and not bool(mask.all()):
            if not bool(mask.any()):
                return {}
            x_a, x_b = x_a[mask], x_b[mask]
            groups = groups[mask] if groups is not None else None
        if self.takes_groups and groups is not None:
            extra["groups"] = groups
        return {k: self.weight * v for k, v in self.loss(x_a, x_b, **extra).items()}
