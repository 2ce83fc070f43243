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


def _check_block_size(value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"block_size must be a positive int or None, got {value!r}")
    return value


def row_blocked_sum(fn, rows: int, block_size: int | None, *args: Tensor) -> Tensor:
    """``sum_k fn(start_k, stop_k, *args)`` over row blocks, keeping one block's graph at a time.

    ``fn(start, stop, *args)`` returns the (scalar) loss sum of rows ``start:stop``; the rows of a
    contrastive loss are independent given the columns (each row's logsumexp spans all columns), so
    the row blocks add up to the dense loss exactly. With gradients on, every block runs under
    activation checkpointing: the forward keeps no ``[block, N]`` logits, the backward recomputes one
    block at a time, so peak memory is ``O(block_size * N)`` instead of ``O(B * N)`` (for one extra
    logits matmul per block). ``block_size=None`` (or ``>= rows``): one dense call, as before.
    """
    if block_size is None or block_size >= rows:
        return fn(0, rows, *args)
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and any(a.requires_grad for a in args)
    total = None
    for start in range(0, rows, block_size):
        stop = min(start + block_size, rows)
        part = checkpoint(fn, start, stop, *args, use_reentrant=False) if grad else fn(start, stop, *args)
        total = part if total is None else total + part
    return total


def contrastive_memory_bytes(batch_size: int, block_size: int | None = None, world_size: int = 1) -> int:
    """Bytes of logits-sized buffers one contrastive loss call needs on one rank (fp32).

    Dense: about 4 ``[B, W*B]`` fp32 buffers live at the backward's peak (logits, softmax/sigmoid,
    mask or targets, their gradient) per direction; blocked: the same for ``[block, W*B]``. A batch of
    32,768 needs ~17 GB dense and ~0.5 GB with ``block_size=1024`` (what ``block_size`` is for).
    """
    rows = batch_size if block_size is None else min(block_size, batch_size)
    return 4 * 4 * rows * batch_size * world_size


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
        block_size: Compute the logits in ``[block_size, W*B]`` row blocks (see :func:`row_blocked_sum`):
            same loss and gradients as dense, memory ``O(block_size * W*B)``; for batches of many
            thousands of rows (32k: ``block_size: 1024``; :func:`contrastive_memory_bytes` gives the
            figure). ``None`` (default): dense.

    Returns: ``{"clip_loss": scalar}``.
    """

    def __init__(
        self, logit_scale: float = 1 / 0.07, learnable_scale: bool = True, max_scale: float = 100.0, gather: bool = True,
        false_negatives: str = "keep", block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable_scale, max_scale)
        self.gather = gather
        self.false_negatives = _check_false_negatives(false_negatives)
        self.block_size = _check_block_size(block_size)

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
        offset = rank * a.shape[0]
        same = None
        if self.false_negatives == "mask" and groups is not None:
            all_groups = gather_groups(groups) if self.gather else groups
            same = (groups, all_groups)
        valid = all_valid = None
        if mask is not None:  # partial-modality batch: rows without both towers are neither queries nor negatives
            valid = mask.bool()
            all_valid = gather_groups(valid.long()).bool() if self.gather else valid  # [W*B]
        if valid is None and (self.block_size is None or self.block_size >= a.shape[0]):
            logits_per_a = scale * a @ all_b.T  # [B, W*B]
            logits_per_b = scale * b @ all_a.T  # [B, W*B]
            labels = torch.arange(a.shape[0], device=a.device) + offset  # offset by rank
            if same is not None:
                same_mask = same_group_mask(same[0], same[1], offset)
                logits_per_a = logits_per_a.masked_fill(same_mask, float("-inf"))
                logits_per_b = logits_per_b.masked_fill(same_mask, float("-inf"))
            loss = (F.cross_entropy(logits_per_a, labels) + F.cross_entropy(logits_per_b, labels)) / 2
            return {"clip_loss": loss}

        def rows_loss(start: int, stop: int, x: Tensor, y: Tensor, s: Tensor) -> Tensor:
            logits = s * x[start:stop] @ y.T  # [block, W*B]
            labels = torch.arange(start, stop, device=x.device) + offset
            if same is not None:
                same_mask = same[0][start:stop, None] == same[1][None, :]
                same_mask[torch.arange(stop - start, device=x.device), labels] = False
                logits = logits.masked_fill(same_mask, float("-inf"))
            if valid is not None:
                keep = valid[start:stop]
                logits = logits.masked_fill(~all_valid[None, :], float("-inf"))[keep]
                labels = labels[keep]
            return F.cross_entropy(logits, labels, reduction="sum")

        n = a.shape[0]
        total = (row_blocked_sum(rows_loss, n, self.block_size, a, all_b, scale)
                 + row_blocked_sum(rows_loss, n, self.block_size, b, all_a, scale)) / 2
        loss = total / n if valid is None else masked_row_mean(total.reshape(1), valid.sum())
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
        block_size: Row blocks of ``[block_size, W*B]`` logits (see :class:`ClipLoss`); ``None``: dense.

    Returns: ``{"siglip_loss": scalar}``.
    """

    def __init__(
        self, logit_scale: float = 10.0, logit_bias: float = -10.0, learnable: bool = True, gather: bool = True,
        false_negatives: str = "keep", block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable, max_scale=100.0)
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)), requires_grad=learnable)
        self.gather = gather
        self.false_negatives = _check_false_negatives(false_negatives)
        self.block_size = _check_block_size(block_size)

    def forward(
        self, a_embeds: Tensor, b_embeds: Tensor, groups: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Args: ``mask [B]`` bool (optional): rows holding both towers; see :class:`ClipLoss`."""
        a, b = F.normalize(a_embeds.float(), dim=-1), F.normalize(b_embeds.float(), dim=-1)
        rank, all_b = 0, b
        if self.gather:
            all_b, rank = gather_with_grad(b)
        all_groups = None
        if self.false_negatives == "mask" and groups is not None:
            all_groups = gather_groups(groups) if self.gather else groups
        offset = rank * a.shape[0]

        valid = all_valid = None
        if mask is not None:  # partial-modality batch: rows without both towers are neither queries nor negatives
            valid = mask.bool()
            all_valid = gather_groups(valid.long()).bool() if self.gather else valid  # [W*B]

        def rows_loss(start: int, stop: int, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
            logits = scale * x[start:stop] @ y.T + bias  # [block, W*B]
            targets = -torch.ones_like(logits)
            idx = torch.arange(stop - start, device=x.device)
            targets[idx, idx + start + offset] = 1.0
            terms = -F.logsigmoid(targets * logits)  # [block, W*B]
            if all_groups is not None:
                same_mask = groups[start:stop, None] == all_groups[None, :]
                same_mask[idx, idx + start + offset] = False
                terms = terms.masked_fill(same_mask, 0.0)
            if valid is not None:
                terms = terms.masked_fill(~all_valid[None, :], 0.0)[valid[start:stop]]
            return terms.sum()

        total = row_blocked_sum(rows_loss, a.shape[0], self.block_size, a, all_b, self.logit_scale(), self.logit_bias)
        loss = total / a.shape[0] if valid is None else masked_row_mean(total.reshape(1), valid.sum())
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
