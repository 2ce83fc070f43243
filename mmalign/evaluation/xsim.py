"""xsim: bitext-retrieval error rate, the LASER / SONAR multilingual similarity-search metric.

Row ``i`` of ``src`` is the translation of row ``i`` of ``tgt``. For each source sentence the
nearest target is looked up; the error rate is the fraction whose nearest target is not the
aligned one (Artetxe & Schwenk, 2019b, "Massively Multilingual Sentence Embeddings for Zero-Shot
Cross-Lingual Transfer and Beyond", TACL; used for SONAR in Duquenne et al., 2023, "SONAR:
Sentence-Level Multimodal and Language-Agnostic Representations").

With ``margin`` set, candidates are rescored with the margin criterion of Artetxe & Schwenk
(2019a, "Margin-based Parallel Corpus Mining with Multilingual Sentence Embeddings", ACL)::

    margin(x, y) = cos(x, y)  (op)  [ sum_{z in NN_k(x)} cos(x, z) / 2k + sum_{z in NN_k(y)} cos(y, z) / 2k ]

with ``op`` = ``/`` for ``"ratio"`` and ``-`` for ``"distance"``; ``NN_k(x)`` are the ``k`` nearest
targets of ``x`` and ``NN_k(y)`` the ``k`` nearest sources of ``y``. This penalises *hubs*
(targets close to everything). As in LASER's ``xsim.py``, the candidates are the ``k`` nearest
targets by cosine, rescored by margin; with ``margin=None`` the nearest by cosine over all targets
is used.

Ties are pessimistic, as in :mod:`mmalign.evaluation.retrieval`: a source counts as correct only
if its aligned target scores strictly above every other candidate (a collapsed model scores 100%
error, not 0%). Everything is chunked: at most ``[chunk, N]`` scores are held at once.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .retrieval import _check_embeds, auto_chunk_size

__all__ = ["xsim_error_rate", "xsim_errors"]

Margin = Literal["ratio", "distance"] | None


def _topk_mean_and_candidates(x: Tensor, y: Tensor, k: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each row of ``x``: mean cosine of its ``k`` nearest ``y`` rows, their scores and indices."""
    means, values, indices = [], [], []
    for start in range(0, len(x), step):
        top = torch.topk(x[start : start + step] @ y.T, k, dim=1)  # values/indices [c, k]
        values.append(top.values)
        indices.append(top.indices)
        means.append(top.values.mean(dim=1))
    return torch.cat(means), torch.cat(values), torch.cat(indices)


def xsim_errors(
    src: Tensor,
    tgt: Tensor,
    margin: Margin = "ratio",
    k: int = 4,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> Tensor:
    """Per-source error flags of xsim (True = nearest target is not the aligned one).

    Args:
        src: ``[N, D]`` source-language embeddings.
        tgt: ``[N, D]`` target-language embeddings; row ``i`` translates ``src[i]``.
        margin: ``"ratio"`` (LASER default), ``"distance"``, or ``None`` (plain cosine).
        k: Neighbours on each side for the margin (clipped to ``N``).
        chunk_size: Rows scored at once (``None``: automatic, ~64 MiB score blocks).
        normalize: L2-normalise first (cosine); set False for pre-normalised embeddings.

    Returns:
        ``[N]`` bool tensor on CPU.
    """
    x = _check_embeds(src, "src")  # [N, D]
    y = _check_embeds(tgt, "tgt").to(x.device)  # [N, D]
    if x.shape != y.shape:
        raise ValueError(f"src and tgt must have the same shape (aligned rows), got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError("xsim needs at least one aligned pair")
    if margin not in (None, "ratio", "distance"):
        raise ValueError(f"margin must be None, 'ratio' or 'distance', got {margin!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    n = len(x)
    step = auto_chunk_size(n, chunk_size)
    arange = torch.arange(n, device=x.device)

    if margin is None:
        errors = torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, step):
            scores = x[start : start + step] @ y.T  # [c, N]
            rows = arange[start : start + len(scores)]
            aligned = scores[torch.arange(len(scores), device=x.device), rows]  # [c]
            other = scores >= aligned[:, None]
            other[torch.arange(len(scores), device=x.device), rows] = False
            errors[start : start + len(scores)] = other.any(dim=1).cpu()
        return errors

    k = min(k, n)
    fwd_mean, cand_cos, cand_idx = _topk_mean_and_candidates(x, y, k, step)  # [N], [N, k], [N, k]
    bwd_mean, _, _ = _topk_mean_and_candidates(y, x, k, step)  # [N]
    denom = (fwd_mean[:, None] + bwd_mean[cand_idx]) / 2  # [N, k]
    scores = cand_cos / denom if margin == "ratio" else cand_cos - denom  # [N, k]
    is_aligned = cand_idx == arange[:, None]  # [N, k]
    aligned = scores.masked_fill(~is_aligned, float("-inf")).amax(dim=1)  # [N]; -inf if not a candidate
    beaten = ((scores >= aligned[:, None]) & ~is_aligned).any(dim=1)
    return (beaten | ~is_aligned.any(dim=1)).cpu()


def xsim_error_rate(
    src: Tensor,
    tgt: Tensor,
    margin: Margin = "ratio",
    k: int = 4,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> float:
    """xsim error rate in [0, 1]: fraction of sources whose nearest target is not the aligned one.

    See :func:`xsim_errors` for the arguments; the LASER/SONAR default is ``margin="ratio", k=4``.
    Swap ``src`` and ``tgt`` for the other direction.
    """
    return xsim_errors(src, tgt, margin=margin, k=k, chunk_size=chunk_size, normalize=normalize).float().mean().item()
