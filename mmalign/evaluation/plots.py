"""PNG plots for evaluation reports (matplotlib, Agg canvas; no pyplot global state).

matplotlib is imported inside the functions, so importing :mod:`mmalign.evaluation` stays cheap
and never touches a display backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pca_2d", "plot_heatmap", "plot_projection", "plot_recall_bars"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_recall_bars(
    retrieval: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, metric: str = "R@1"
) -> Path:
    """Grouped bar chart: one group per language, one bar per direction, height = ``metric`` in %.

    Args:
        retrieval: ``{lang: {direction: metrics}}`` as from ``per_language_retrieval``.
        path: Output PNG path.
        metric: Which metric to plot.
    """
    langs = list(retrieval)
    directions = list(dict.fromkeys(d for lang in langs for d in retrieval[lang]))
    fig = _figure(min(16.0, max(6.0, 0.35 * len(langs) * max(1, len(directions)) + 2)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(directions))
    for j, direction in enumerate(directions):
        values = [100 * retrieval[lang].get(direction, {}).get(metric, float("nan")) for lang in langs]
        ax.bar([i + (j - (len(directions) - 1) / 2) * width for i in range(len(langs))], values, width, label=direction)
    ax.set_xticks(range(len(langs)), langs)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{metric} per language")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_heatmap(
    matrix: Sequence[Sequence[float | None]] | Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    annotate: bool | None = None,
) -> Path:
    """Heatmap of a matrix (``None``/NaN cells left blank), values annotated when small enough."""
    m = torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in matrix])
    fig = _figure(max(4.0, 0.45 * len(col_labels) + 2), max(3.5, 0.4 * len(row_labels) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90 if len(col_labels) > 12 else 0)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate is None:
        annotate = m.numel() <= 400
    if annotate:
        mid = (im.norm.vmin + im.norm.vmax) / 2 if im.norm.vmin is not None else 0.0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not math.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="k" if m[i, j] > mid else "w")
    return _save(fig, path)


def pca_2d(x: Tensor) -> Tensor:
    """Exact 2-D PCA projection (SVD of the centred data): ``[N, D] -> [N, 2]``."""
    x = x.float()
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:2].T  # [N, <=2]
    if proj.shape[1] < 2:  # D == 1: pad so callers always get two columns
        proj = torch.cat([proj, torch.zeros(len(proj), 2 - proj.shape[1])], dim=1)
    return proj


def plot_projection(
    embeddings: Mapping[str, Tensor],
    path: str | Path,
    langs: Mapping[str, Sequence[str]] | None = None,
    max_points_per_group: int = 1000,
    normalize: bool = True,
) -> Path:
    """2-D PCA of the shared space, coloured by modality (left) and by language (right, if given).

    Args:
        embeddings: ``{modality or group name: [N_i, D]}``, all in the same space.
        path: Output PNG path.
        langs: Optional ``{name: N_i language codes}`` for the by-language panel.
        max_points_per_group: Evenly spaced subsample per group (keeps the plot readable and fast).
        normalize: L2-normalise before projecting (the geometry the metrics use).
    """
    names, chunks, lang_list = [], [], []
    for name, x in embeddings.items():
        x = torch.as_tensor(x).float().cpu()
        idx = torch.linspace(0, len(x) - 1, min(len(x), max_points_per_group)).round().long() if len(x) else torch.zeros(0, dtype=torch.long)
        chunks.append(x[idx])
        names += [name] * len(idx)
        if langs is not None:
            group_langs = list(langs.get(name, ["?"] * len(x)))
            if len(group_langs) != len(x):
                raise ValueError(f"langs[{name!r}] has {len(group_langs)} entries but embeddings[{name!r}] has {len(x)} rows")
            lang_list += [group_langs[i] for i in idx.tolist()]
    x = torch.cat(chunks)
    if len(x) < 2:
        raise ValueError(f"need at least two points to project, got {len(x)}")
    if normalize:
        x = F.normalize(x, dim=-1)
    xy = pca_2d(x).numpy()
    panels = [("modality", names)] + ([("language", lang_list)] if langs is not None else [])
    fig = _figure(6.0 * len(panels), 5.0)
    for p, (title, colours) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), p)
        groups = list(dict.fromkeys(colours))
        for g in groups:
            sel = [i for i, c in enumerate(colours) if c == g]
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, label=str(g))
        ax.set_title(f"PCA of the shared space, by {title}")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.legend(fontsize="x-small", markerscale=2, ncol=1 if len(groups) <= 14 else 2)
    return _save(fig, path)
