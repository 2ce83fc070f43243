"""Objectives between tower outputs: plain modules over embeddings (never holding a model).

Every loss returns ``dict[str, Tensor]`` whose keys end in ``_loss``; the LightningModule sums them.
Contrastive losses gather embeddings across ranks *with gradients* and use the local rows against the
global batch, so each rank's loss is the full-batch loss restricted to its rows and DDP's gradient
averaging reproduces the single-process gradient of the global batch.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All-gather ``x`` ([B, D], same B on every rank) across ranks keeping gradients.

    Returns the concatenation ``[world_size * B, D]`` and this rank's index (0 when not distributed).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank()


def gather_groups(groups: Tensor) -> Tensor:
    """All-gather group ids (``[B]`` int64, no gradient) in the same rank order as :func:`gather_with_grad`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return groups
    parts = [torch.empty_like(groups) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, groups.contiguous())
    return torch.cat(parts)


def group_ids(labels: Sequence[object], device: torch.device | str | None = None) -> Tensor:
    """Stable int64 ids ``[B]`` for group labels (e.g. the manifest's ``concept``), equal across processes.

    ``None`` labels get a unique negative id each, so unlabelled rows never share a group.
    """
    ids = []
    for i, label in enumerate(labels):
        if label is None:
            ids.append(-1 - i)
        else:
            ids.append(int.from_bytes(hashlib.blake2b(str(label).encode(), digest_size=7).digest(), "little"))
    return torch.tensor(ids, dtype=torch.int64, device=device)


def same_group_mask(local: Tensor, columns: Tensor, offset: int) -> Tensor:
    """``[B, W*B]`` True where row i and column j share a group but are not the pair (i, i + offset)."""
    mask = local[:, None] == columns[None, :]
    idx = torch.arange(local.shape[0], device=local.device)
    mask[idx, idx + offset] = False
    return mask


def masked_row_mean(row_losses: Tensor, count: Tensor) -> Tensor:
    """Mean of ``row_losses`` (the valid local rows' loss terms, any length) over the valid rows of the GLOBAL batch.

    Each rank divides its own sum by the mean count per rank (``n_global / world_size``), so DDP's
    gradient averaging gives ``sum over every valid row / n_global``: the single-process loss on the
    valid rows, however unevenly they fall on ranks. A batch with no valid row contributes 0.

    Args:
        row_losses: ``[n_local]`` loss of each valid local row.
        count: ``[]`` number of valid local rows (float).
    """
    total, world = count.detach().float(), 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total, world = total.clone(), dist.get_world_size()
        dist.all_reduce(total)
    return row_losses.sum() * world / total.clamp(min=1.0)


FALSE_NEGATIVES = ("keep", "mask")


def _check_false_negatives(value: str) -> str:
    if value not in FALSE_NEGATIVES:
        raise ValueError(f"false_negatives must be one of {FALSE_NEGATIVES}, got {value!r}")
    return value


class LogitScale(nn.Module):
    """Temperature as a module, stored as a log and clamped (CLIP, Radford et al., 2021; ImageBind).

    Args:
        init: Initial scale (1 / temperature); CLIP uses 1 / 0.07.
        learnable: Train it or keep it fixed.
        max_scale: Upper clamp (CLIP clamps at 100).
    """

    def __init__(self, init: float = 1 / 0.07, learnable: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learnable)
        self.max_log = math.log(max_scale)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP; Radford et al., 2021; van den Oord et al., 2018).

    Inputs: ``a_embeds [B, D]`` and ``b_embeds [B, D]``, row i of one paired with row i of the other.
    Embeddings are L2-normalised here. With ``gather=True`` (default) negatives come from all ranks.

    Args:
        false_negatives: What to do with other rows of the same group (``groups``: the manifest's
            ``concept``, passed by :class:`~mmalign.training.module.AlignmentModule`): ``"keep"`` treats them as
            negatives (plain CLIP), ``"mask"`` leaves them out of the softmax. Use ``"mask"`` when a batch
            can hold one concept several times (the same picture captioned in several languages, one name
            spoken in several languages): they are not negatives, and pushing them apart fights the
            alignment.

    Returns: ``{"clip_loss": scalar}``.
    """

    def __init__(
        self, logit_scale: float = 1 / 0.07, learnable_scale: bool = True, max_scale: float = 100.0, gather: bool = True,
        false_negatives: str = "keep",
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable_scale, max_scale)
        self.gather = gather
        self.false_negatives = _check_false_negatives(false_negatives)

    def forward(
        self, a_embeds: Tensor, b_embeds: Tensor, groups: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Args: ``mask [B]`` bool (optional): rows that hold both towers (partial-modality batches). The
        others are neither queries nor negatives; the loss equals the loss of the valid rows alone, across
        ranks too (:func:`masked_row_mean`)."""
        a, b = F.normalize(a_embeds.float(), dim=-1), F.normalize(b_embeds.float(), dim=-1)
        scale = self.logit_scale()
        rank = 0
        all_a, all_b = a, b
        if self.gather:
            all_a, rank = gather_with_grad(a)
            all_b, _ = gather_with_grad(b)
        logits_per_a = scale * a @ all_b.T  # [B, W*B]
        logits_per_b = scale * b @ all_a.T  # [B, W*B]
        labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]  # offset by rank
        if self.false_negatives == "mask" and groups is not None:
            all_groups = gather_groups(groups) if self.gather else groups
            same = same_group_mask(groups, all_groups, rank * a.shape[0])
            logits_per_a = logits_per_a.masked_fill(same, float("-inf"))
            logits_per_b = logits_per_b.masked_fill(same, float("-inf"))
        if mask is not None:
            mask = mask.bool()
            all_mask = gather_groups(mask.long()).bool() if self.gather else mask  # [W*B]
            logits_per_a = logits_per_a.masked_fill(~all_mask[None, :], float("-inf"))[mask]
            logits_per_b = logits_per_b.masked_fill(~all_mask[None, :], float("-inf"))[mask]
            rows = F.cross_entropy(logits_per_a, labels[mask], reduction="none") + F.cross_entropy(
                logits_per_b, labels[mask], reduction="none")
            return {"clip_loss": masked_row_mean(rows / 2, mask.sum())}
        loss = (F.cross_entropy(logits_per_a, labels) + F.cross_entropy(logits_per_b, labels)) / 2
        return {"clip_loss": loss}


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP; Zhai et al., 2023): every pair is a binary match/non-match problem.

    Inputs: ``a_embeds [B, D]``, ``b_embeds [B, D]`` (L2-normalised here). The loss of the local rows
    against the gathered columns, summed over columns and averaged over rows, equals the paper's
    ``-1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))`` on the global batch.

    Args:
        logit_scale: Initial scale ``t`` (paper: 10).
        logit_bias: Initial bias ``b`` (paper: -10).
        false_negatives: ``"keep"`` (paper) or ``"mask"``: pairs of different rows of the same group
            (``groups``, the manifest's ``concept``) are left out of the sum (see :class:`ClipLoss`).

    Returns: ``{"siglip_loss": scalar}``.
    """

    def __init__(
        self, logit_scale: float = 10.0, logit_bias: float = -10.0, learnable: bool = True, gather: bool = True,
        false_negatives: str = "keep",
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable, max_scale=100.0)
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)), requires_grad=learnable)
        self.gather = gather
        self.false_negatives = _check_false_negatives(false_negatives)

    def forward(
        self, a_embeds: Tensor, b_embeds: Tensor, groups: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Args: ``mask [B]`` bool (optional): rows holding both towers; see :class:`ClipLoss`."""
        a, b = F.normalize(a_embeds.float(), dim=-1), F.normalize(b_embeds.float(), dim=-1)
        rank, all_b = 0, b
        if self.gather:
            all_b, rank = gather_with_grad(b)
        logits = self.logit_scale() * a @ all_b.T + self.logit_bias  # [B, W*B]
        targets = -torch.ones_like(logits)
        idx = torch.arange(a.shape[0], device=a.device)
        targets[idx, idx + rank * a.shape[0]] = 1.0
        terms = -F.logsigmoid(targets * logits)  # [B, W*B]
        if self.false_negatives == "mask" and groups is not None:
            all_groups = gather_groups(groups) if self.gather else groups
            terms = terms.masked_fill(same_group_mask(groups, all_groups, rank * a.shape[0]), 0.0)
        if mask is not None:
            mask = mask.bool()
            all_mask = gather_groups(mask.long()).bool() if self.gather else mask  # [W*B]
            rows = terms.masked_fill(~all_mask[None, :], 0.0)[mask].sum(dim=1)
            return {"siglip_loss": masked_row_mean(rows, mask.sum())}
        loss = terms.sum(dim=1).mean()
        return {"siglip_loss": loss}


class MSELoss(nn.Module):
    """Teacher-student regression (M-CLIP, Carlsson et al., 2022; SONAR, Duquenne et al., 2023).

    ``a_embeds`` is the student, ``b_embeds`` the (frozen) teacher; the teacher side is detached.

    Args:
        normalize: L2-normalise both sides first (then MSE = 2 - 2 cos / D scaled).

    Returns: ``{"mse_loss": scalar}``.
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, a_embeds: Tensor, b_embeds: Tensor) -> dict[str, Tensor]:
        a, b = a_embeds.float(), b_embeds.float().detach()
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return {"mse_loss": F.mse_loss(a, b)}


class CosineLoss(nn.Module):
    """``1 - cos(student, teacher)`` averaged over the batch; the teacher side is detached.

    Returns: ``{"cosine_loss": scalar}``.
    """

    def forward(self, a_embeds: Tensor, b_embeds: Tensor) -> dict[str, Tensor]:
        cos = F.cosine_similarity(a_embeds.float(), b_embeds.float().detach(), dim=-1)
        return {"cosine_loss": (1 - cos).mean()}
