"""Objectives between tower outputs: plain modules over embeddings (never holding a model).

Every loss returns ``dict[str, Tensor]`` whose keys end in ``_loss``; the LightningModule sums them.
Contrastive losses gather embeddings across ranks *with gradients* and use the local rows against the
global batch, so each rank's loss is the full-batch loss restricted to its rows and DDP's gradient
averaging reproduces the single-process gradient of the global batch.
"""

from __future__ import annotations

import math

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

    Returns: ``{"clip_loss": scalar}``.
    """

    def __init__(self, logit_scale: float = 1 / 0.07, learnable_scale: bool = True, max_scale: float = 100.0, gather: bool = True) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable_scale, max_scale)
        self.gather = gather

    def forward(self, a_embeds: Tensor, b_embeds: Tensor) -> dict[str, Tensor]:
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

    Returns: ``{"siglip_loss": scalar}``.
    """

    def __init__(self, logit_scale: float = 10.0, logit_bias: float = -10.0, learnable: bool = True, gather: bool = True) -> None:
        super().__init__()
        self.logit_scale = LogitScale(logit_scale, learnable, max_scale=100.0)
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)), requires_grad=learnable)
        self.gather = gather

    def forward(self, a_embeds: Tensor, b_embeds: Tensor) -> dict[str, Tensor]:
        a, b = F.normalize(a_embeds.float(), dim=-1), F.normalize(b_embeds.float(), dim=-1)
        rank, all_b = 0, b
        if self.gather:
            all_b, rank = gather_with_grad(b)
        logits = self.logit_scale() * a @ all_b.T + self.logit_bias  # [B, W*B]
        targets = -torch.ones_like(logits)
        idx = torch.arange(a.shape[0], device=a.device)
        targets[idx, idx + rank * a.shape[0]] = 1.0
        loss = -F.logsigmoid(targets * logits).sum(dim=1).mean()
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
