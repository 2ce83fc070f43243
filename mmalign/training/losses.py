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


def contrastive_memory_bytes(batch_size: int, block_size: int | None = None, world_size: int = 1, queue_size: int = 0) -> int:
    """Bytes of logits-sized buffers one contrastive loss call needs on one rank (fp32).

    Dense: about 4 ``[B, W*B]`` fp32 buffers live at the backward's peak (logits, softmax/sigmoid,
    mask or targets, their gradient) per direction; blocked: the same for ``[block, W*B]``. A batch of
    32,768 needs ~17 GB dense and ~0.5 GB with ``block_size=1024`` (what ``block_size`` is for).
    A :class:`ClipLoss` queue adds ``queue_size`` columns to the a->b direction (``[B, W*B + queue_size]``,
    counted here) and holds the queue itself: ``queue_size * (4 * D + 8)`` bytes (4,096 rows of D=384: 6.3 MB).
    """
    rows = batch_size if block_size is None else min(block_size, batch_size)
    return 4 * 4 * rows * (batch_size * world_size + queue_size)


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


QUEUE_BUFFERS = ("queue", "queue_groups", "queue_ptr", "queue_filled")
_NO_GROUP = torch.iinfo(torch.int64).min  # queue rows without a group id: never equal to a batch row's id


def _under_functorch() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad) is running this code."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _check_queue_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"queue_size must be a non-negative int (0: no queue), got {value!r}")
    return value


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP; Radford et al., 2021; van den Oord et al., 2018), optionally with a queue of
    negatives from earlier steps (MoCo; He et al., 2020).

    Inputs: ``a_embeds [B, D]`` and ``b_embeds [B, D]``, row i of one paired with row i of the other.
    Embeddings are L2-normalised here. With ``gather=True`` (default) negatives come from all ranks.

    Args:
        false_negatives: What to do with other rows of the same group (``groups``: the manifest's
            ``concept``, passed by :class:`~mmalign.training.module.AlignmentModule`): ``"keep"`` treats them as
            negatives (plain CLIP), ``"mask"`` leaves them out of the softmax. Use ``"mask"`` when a batch
            can hold one concept several times (the same picture captioned in several languages, one name
            spoken in several languages): they are not negatives, and pushing them apart fights the
            alignment. Queue entries of a row's own group are left out too.
        block_size: Compute the logits in ``[block_size, W*B]`` row blocks (see :func:`row_blocked_sum`):
            same loss and gradients as dense, memory ``O(block_size * W*B)``; for batches of many
            thousands of rows (32k: ``block_size: 1024``; :func:`contrastive_memory_bytes` gives the
            figure). ``None`` (default): dense.
        queue_size: Rows of a FIFO queue (MoCo's "queue", uCLIP's memory bank) of detached, L2-normalised
            ``b`` embeddings from earlier training steps, appended as extra negative columns to the
            **a -> b** softmax only: ``logits_per_a = scale * a @ [b_batch ; queue].T`` (``[B, W*B + N]``).
            ``0`` (default): no queue, plain CLIP. Only the ``b`` side is queued because a queued row is
            the embedding its tower gave at an earlier step: with a frozen ``b`` tower and no projector
            (the pivot's teacher) the queue is exact; when ``b`` trains its rows go stale (MoCo needs a
            momentum encoder for that), and a queue of the trained ``a`` side would always be stale.
            In training mode (``self.training``) only: the current batch's rows are enqueued *after* its
            loss (a batch is never its own negative), valid rows only under a partial-modality ``mask``,
            the all-gathered rows under DDP with ``gather=True`` (every rank holds the same queue; DDP's
            ``broadcast_buffers`` copies rank 0's to the others each step, the same rows, so it costs one
            broadcast; with ``gather=False`` that broadcast would replace each rank's own rows), with
            their ``groups`` ids so ``false_negatives="mask"`` leaves out same-concept entries. Under
            eval the loss is the plain in-batch loss (validation losses do not depend on the training
            history) and nothing is enqueued. The queue is a persistent buffer, allocated at the first
            step (its width is the embedding's): it is saved in checkpoints (exact resume) but not in
            exports. Cost: the queue ``N * (4 * D + 8)`` bytes and ``N`` more logits columns per row.
            The queue is updated in place, so it cannot run under ``torch.func`` transforms (the
            ``--sweep`` engine, :mod:`mmalign.training.sweep`: refused there); under GradCache
            (``grad_cache_chunk``) the loss runs once per step on the full batch, so the queue works
            unchanged. Rows of a new epoch may meet their own earlier copy in the queue: with
            ``"keep"`` such a copy is a negative (rare when ``N`` is far below an epoch's rows);
            ``"mask"`` with per-row groups leaves it out.

    Returns: ``{"clip_loss": scalar}``.
    """

    training_buffers = QUEUE_BUFFERS  # training state: checkpoints hold them, exports do not (export_state)

    def __init__(
        self, logit_scale: float = 1 / 0.07, learnable_scale: bool = True, max_scale: float = 100.0, gather: bool = True,
        false_negatives: str = "keep", block_size: int | None = None, queue_size: int = 0,
    ) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable_scale, max_scale)
        self.gather = gather
        self.false_negatives = _check_false_negatives(false_negatives)
        self.block_size = _check_block_size(block_size)
        self.queue_size = _check_queue_size(queue_size)
        if self.queue_size:  # lazy: [0] until the first training step knows D
            self.register_buffer("queue", torch.zeros(0))  # [N, D] fp32, unit rows
            self.register_buffer("queue_groups", torch.zeros(0, dtype=torch.int64))  # [N]
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))  # next row to write
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.int64))  # rows holding an embedding

    def queued(self) -> tuple[Tensor, Tensor]:
        """The queue's filled rows, oldest first: ``(embeds [n, D], group ids [n])`` (``n <= queue_size``)."""
        if not self.queue_size or self.queue.numel() == 0:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        n, ptr = int(self.queue_filled), int(self.queue_ptr)
        order = torch.arange(ptr - n, ptr, device=self.queue.device) % self.queue_size
        return self.queue[order], self.queue_groups[order]

    @torch.no_grad()
    def enqueue(self, rows: Tensor, groups: Tensor | None = None) -> None:
        """Append ``rows [m, D]`` (normalised here, detached) FIFO: the oldest rows are overwritten; ``groups [m]``
        int64 ids (None or negative ids: rows that match no group)."""
        if not self.queue_size:
            raise RuntimeError("this ClipLoss has no queue (queue_size=0)")
        rows = F.normalize(rows.detach().float(), dim=-1)
        if self.queue.numel() == 0:
            self.queue = torch.zeros(self.queue_size, rows.shape[1], device=rows.device)
            self.queue_groups = torch.full((self.queue_size,), _NO_GROUP, dtype=torch.int64, device=rows.device)
        if rows.shape[1] != self.queue.shape[1]:
            raise ValueError(f"queue rows have width {self.queue.shape[1]}, got rows of width {rows.shape[1]}")
        g = torch.full((len(rows),), _NO_GROUP, dtype=torch.int64, device=rows.device) if groups is None else groups
        g = torch.where(g < 0, torch.full_like(g, _NO_GROUP), g)  # group_ids' per-batch ids of unlabelled rows
        rows, g = rows[-self.queue_size:], g[-self.queue_size:]  # more rows than the queue: the newest ones
        idx = (int(self.queue_ptr) + torch.arange(len(rows), device=rows.device)) % self.queue_size
        self.queue[idx] = rows.to(self.queue.device)
        self.queue_groups[idx] = g.to(self.queue_groups.device)
        self.queue_ptr.fill_((int(self.queue_ptr) + len(rows)) % self.queue_size)
        self.queue_filled.fill_(min(int(self.queue_filled) + len(rows), self.queue_size))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The queue is allocated at the first step: size the (still empty) buffers to the checkpoint's
        # before the copy, or empty them again for a checkpoint saved before any step.
        if self.queue_size:
            for name in ("queue", "queue_groups"):
                saved, mine = state_dict.get(prefix + name), getattr(self, name)
                if saved is None or tuple(saved.shape) == tuple(mine.shape):
                    continue
                if saved.numel() and len(saved) != self.queue_size:
                    error_msgs.append(f"{prefix}{name}: the checkpoint's queue holds {len(saved)} rows, this loss has "
                                      f"queue_size={self.queue_size} (resume with the same queue_size)")
                    continue
                if saved.numel() == 0 or mine.numel() == 0:
                    setattr(self, name, torch.empty(saved.shape, dtype=mine.dtype, device=mine.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(
        self, a_embeds: Tensor, b_embeds: Tensor, groups: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Args: ``mask [B]`` bool (optional): rows that hold both towers (partial-modality batches). The
        others are neither queries nor negatives (nor enqueued); the loss equals the loss of the valid rows
        alone, across ranks too (:func:`masked_row_mean`)."""
        use_queue = bool(self.queue_size) and self.training
        if use_queue and _under_functorch():
            raise RuntimeError(
                "ClipLoss(queue_size>0) updates its queue buffer in place every step, which torch.func transforms "
                "(vmap/grad: the `--sweep` engine of mmalign/training/sweep.py) cannot do: train the runs one by "
                "one without --sweep, or set queue_size: 0")
        a, b = F.normalize(a_embeds.float(), dim=-1), F.normalize(b_embeds.float(), dim=-1)
        scale = self.logit_scale()
        rank = 0
        all_a, all_b = a, b
        if self.gather:
            all_a, rank = gather_with_grad(a)
            all_b, _ = gather_with_grad(b)
        offset = rank * a.shape[0]
        same = all_groups = None
        if self.false_negatives == "mask" and groups is not None:
            all_groups = gather_groups(groups) if self.gather else groups
            same = (groups, all_groups)
        valid = all_valid = None
        if mask is not None:  # partial-modality batch: rows without both towers are neither queries nor negatives
            valid = mask.bool()
            all_valid = gather_groups(valid.long()).bool() if self.gather else valid  # [W*B]
        queue = queue_groups = None
        if use_queue and int(self.queue_filled) > 0:  # a copy: the enqueue below (and a checkpointed block's
            queue, queue_groups = self.queued()          # recompute in the backward) must see this step's queue
            queue = queue.to(a.device).clone()           # [n, D]
        out = self._loss(a, b, all_a, all_b, scale, offset, same, valid, all_valid, queue, queue_groups)
        if use_queue:  # after the loss: this batch is a negative of the next steps, never of itself
            rows = all_b.detach()
            g = all_groups  # stored for false_negatives="mask" (the only reader); None: rows of no group
            if all_valid is not None:
                rows, g = rows[all_valid], (g[all_valid] if g is not None else None)
            if len(rows):
                self.enqueue(rows, g)
        return {"clip_loss": out}

    def _loss(self, a, b, all_a, all_b, scale, offset, same, valid, all_valid, queue, queue_groups) -> Tensor:
        if valid is None and (self.block_size is None or self.block_size >= a.shape[0]):
            logits_per_a = scale * a @ all_b.T  # [B, W*B]
            logits_per_b = scale * b @ all_a.T  # [B, W*B]
            labels = torch.arange(a.shape[0], device=a.device) + offset  # offset by rank
            if same is not None:
                same_mask = same_group_mask(same[0], same[1], offset)
                logits_per_a = logits_per_a.masked_fill(same_mask, float("-inf"))
                logits_per_b = logits_per_b.masked_fill(same_mask, float("-inf"))
            if queue is not None:  # the queue's columns after the batch's: [B, W*B + n]
                logits_q = scale * a @ queue.T
                if same is not None:
                    logits_q = logits_q.masked_fill(same[0][:, None] == queue_groups[None, :], float("-inf"))
                logits_per_a = torch.cat([logits_per_a, logits_q], dim=1)
            return (F.cross_entropy(logits_per_a, labels) + F.cross_entropy(logits_per_b, labels)) / 2

        def rows_loss(start: int, stop: int, x: Tensor, y: Tensor, s: Tensor, extra: Tensor | None = None) -> Tensor:
            logits = s * x[start:stop] @ y.T  # [block, W*B]
            labels = torch.arange(start, stop, device=x.device) + offset
            if same is not None:
                same_mask = same[0][start:stop, None] == same[1][None, :]
                same_mask[torch.arange(stop - start, device=x.device), labels] = False
                logits = logits.masked_fill(same_mask, float("-inf"))
            if valid is not None:
                logits = logits.masked_fill(~all_valid[None, :], float("-inf"))
            if extra is not None:  # queue columns appended per block: [block, W*B + n]
                logits_q = s * x[start:stop] @ extra.T
                if same is not None:
                    logits_q = logits_q.masked_fill(same[0][start:stop, None] == queue_groups[None, :], float("-inf"))
                logits = torch.cat([logits, logits_q], dim=1)
            if valid is not None:
                keep = valid[start:stop]
                logits, labels = logits[keep], labels[keep]
            return F.cross_entropy(logits, labels, reduction="sum")

        n = a.shape[0]
        rows_loss_a = rows_loss if queue is None else (lambda start, stop, x, y, s: rows_loss(start, stop, x, y, s, queue))
        total = (row_blocked_sum(rows_loss_a, n, self.block_size, a, all_b, scale)
                 + row_blocked_sum(rows_loss, n, self.block_size, b, all_a, scale)) / 2
        return total / n if valid is None else masked_row_mean(total.reshape(1), valid.sum())


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
