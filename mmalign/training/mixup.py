"""Latent mixup on cached features (FuseMix; Vouitsis et al., "Data-Efficient Multimodal Fusion on a Single
GPU", CVPR 2024).

Frozen encoders make every training pair a pair of fixed latent vectors, so augmentation can happen in the
latent space, for free: each row of a batch is mixed with another row, ``x~ = lam * x + (1 - lam) * x[perm]``,
with ONE ``lam ~ Beta(alpha, alpha)`` and ONE permutation shared by every modality of the row, so the mixed
image latent still pairs with the mixed text latent (FuseMix, Sec. 4.2). For a text-only pivot the pair is
the student's and the teacher's features of the same text.

Partial-modality rows (:func:`mmalign.training.module.presence`) are mixed only with rows holding the same
towers, so a row never mixes a present modality with an absent one. A batch's features hold the present rows
only, in row order; the permutation is applied in that order.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from encoders.base import EncoderOutput


def mixup_permutation(present: dict[str, Tensor], batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """``[B]`` int64 partner of each row: a random permutation within each group of rows holding the same towers."""
    if not present:
        return torch.randperm(batch_size, generator=generator)
    perm = torch.arange(batch_size)
    names = sorted(present)
    bits = torch.stack([present[n].cpu().bool() for n in names], 1).long()  # [B, T]
    codes = (bits * (2 ** torch.arange(len(names)))).sum(1)
    for code in codes.unique():
        rows = (codes == code).nonzero().squeeze(1)
        perm[rows] = rows[torch.randperm(len(rows), generator=generator)]
    return perm


def _mix(x: Tensor, lam: float, partner: Tensor) -> Tensor:
    return lam * x + (1.0 - lam) * x[partner]


def mix_features(
    features: dict[str, Any], lam: float, perm: Tensor, present: dict[str, Tensor] | None = None
) -> dict[str, Any]:
    """Mix every tower's features with their partner rows ``perm`` (``[B]``) by ``lam``.

    Args:
        features: ``{tower: EncoderOutput | {"pooled", "tokens"?, "mask"?}}``; a tower with a presence mask
            holds its present rows only.
        lam: Weight of the row itself.
        perm: Partner row of each batch row (:func:`mixup_permutation`: partners share the row's towers).
        present: ``{tower: [B] bool}`` presence masks (missing: every row).
    """
    out: dict[str, Any] = {}
    for name, f in features.items():
        mask = (present or {}).get(name)
        if mask is None:
            partner = perm.to(_pooled(f).device)
        else:  # partner rows in the coordinates of the present rows
            rank = torch.cumsum(mask.long(), 0) - 1
            partner = rank[perm.to(mask.device)][mask].to(_pooled(f).device)
        if isinstance(f, dict):
            g = dict(f)
            g["pooled"] = _mix(f["pooled"].float(), lam, partner)
            if f.get("tokens") is not None:
                g["tokens"] = _mix(f["tokens"].float(), lam, partner)
                if f.get("mask") is not None:
                    g["mask"] = f["mask"] | f["mask"][partner]
            out[name] = g
        else:
            tokens = None if f.tokens is None else _mix(f.tokens.float(), lam, partner)
            tmask = None if f.mask is None else f.mask | f.mask[partner]
            out[name] = EncoderOutput(pooled=_mix(f.pooled.float(), lam, partner), tokens=tokens, mask=tmask)
    return out


def _pooled(f: Any) -> Tensor:
    return f["pooled"] if isinstance(f, dict) else f.pooled


def mixup_batch(batch: dict[str, Any], alpha: float, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A copy of a cached-feature training batch with its features mixed (one ``lam``, one permutation).

    Args:
        batch: A batch with ``features`` (``mmalign cache`` + ``data.init_args.cache_dir``).
        alpha: Beta(alpha, alpha) concentration (FuseMix: 1, a uniform ``lam``).
        generator: Random source (default: torch's global one, seeded by ``seed_everything``).

    Raises:
        ValueError: The batch has no cached features (latent mixup mixes frozen features, not raw inputs).
    """
    if not batch.get("features"):
        raise ValueError("latent mixup needs cached features: train from `mmalign cache` (data.init_args.cache_dir)")
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    batch_size = len(batch["meta"]["id"])
    present = {k: v for k, v in batch.get("present", {}).items() if k in batch["features"]}
    lam = sample_beta(alpha, generator)
    perm = mixup_permutation(present, batch_size, generator)
    return {**batch, "features": mix_features(batch["features"], lam, perm, present), "mixup_lambda": lam}


def sample_beta(alpha: float, generator: torch.Generator | None = None) -> float:
    """One Beta(alpha, alpha) draw, seeded from ``generator`` (None: torch's global RNG, so ``seed_everything``
    fixes it): ``torch.distributions.Beta`` takes no generator, Python's ``betavariate`` is exact and cheap."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return random.Random(seed).betavariate(alpha, alpha)
