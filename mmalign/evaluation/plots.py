"""PNG plots for evaluation reports (matplotlib, Agg canvas; no pyplot global state).

matplotlib is imported inside the functions, so importing :mod:`mmalign.evaluation` stays cheap
and never touches a display backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pca_2d", "plot_heatmap", "plot_projection", "plot_recall_bars", "plot_retrieval_examples"]


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
    fig.savefig(path, format="png", bbox_inches="tight")  # legends placed outside the axes stay in the picture
    return path


def plot_recall_bars(
    retrieval: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, metric: str = "R@1",
    means: Mapping[str, Mapping[str, float]] | None = None, title: str | None = None,
    reference: Mapping[str, float] | None = None, reference_label: str = "ceiling",
) -> Path:
    """Grouped bar chart: one group per language, one bar per direction (or method), height = ``metric`` in %.

    Args:
        retrieval: ``{lang: {direction: metrics}}`` as from ``per_language_retrieval``; a pooled ``"all"`` entry
            is left out (it is not a language: see the report).
        path: Output PNG path.
        metric: Which metric to plot.
        means: Optional ``{direction: metrics}`` drawn as a last, hatched group "mean" (the per-language mean).
        title: Plot title (default ``"<metric> per language"``).
        reference: Optional ``{lang: value}`` (fractions) drawn as a black bar across each language's group, e.g. the
            frozen student's own retrieval (the ceiling).
        reference_label: Legend label of ``reference``.
    """
    langs = [lang for lang in retrieval if lang != "all"]
    directions = list(dict.fromkeys(d for lang in langs for d in retrieval[lang]))
    groups = langs + (["mean"] if means else [])
    fig = _figure(min(18.0, max(6.0, 0.3 * len(groups) * max(1, len(directions)) + 3)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(directions))
    colours = _colours(len(directions))
    for j, direction in enumerate(directions):
        values = [100 * retrieval[lang].get(direction, {}).get(metric, float("nan")) for lang in langs]
        x = [i + (j - (len(directions) - 1) / 2) * width for i in range(len(langs))]
        ax.bar(x, values, width, label=direction, color=colours[j])
        if means and direction in means and metric in means[direction]:
            ax.bar(len(langs) + (j - (len(directions) - 1) / 2) * width + 0.3, 100 * means[direction][metric], width,
                   color=colours[j], hatch="//", edgecolor="k", linewidth=0.5)
    if reference:
        for i, lang in enumerate(langs):
            if lang in reference:
                ax.hlines(100 * reference[lang], i - 0.45, i + 0.45, colors="k", linewidth=2,
                          label=reference_label if i == 0 else None)
    ticks = list(range(len(langs))) + ([len(langs) + 0.3] if means else [])
    ax.set_xticks(ticks, groups)
    if means:
        ax.axvline(len(langs) - 0.35, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xlim(-0.6, ticks[-1] + 0.6 if ticks else 0.6)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 102)  # a reference line at 100 stays visible
    ax.set_title(title or f"{metric} per language" + (" (hatched: mean over languages)" if means else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _colours(n: int) -> list:
    """``n`` distinct colours, never grey (grey marks items shared by all languages): tab10 up to 9; beyond, tab20's
    9 dark shades first, then its 9 light ones, then tab20b's (38 in all, cycling beyond), so the first nine are
    always nine different hues."""
    from matplotlib import colormaps

    if n <= 9:
        return [colormaps["tab10"](i) for i in range(10) if i != 7][:n]
    tab20, tab20b = colormaps["tab20"], colormaps["tab20b"]
    pool = ([tab20(i) for i in range(0, 20, 2) if i != 14] + [tab20(i) for i in range(1, 20, 2) if i != 15]
            + [tab20b(i) for i in range(20)])
    return [pool[i % len(pool)] for i in range(n)]


#: Markers of the modalities / groups in the projection (distinct shapes, readable at small sizes).
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


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
    """2-D PCA of the shared space: by modality (left: one colour and marker per group) and by language (right, if
    given: one colour per language from tab20/tab20b, enough for 40 languages, and the group's marker).

    Args:
        embeddings: ``{modality or group name: [N_i, D]}``, all in the same space.
        path: Output PNG path.
        langs: Optional ``{name: N_i language codes}`` for the by-language panel.
        max_points_per_group: Evenly spaced subsample per group (keeps the plot readable and fast).
        normalize: L2-normalise before projecting (the geometry the metrics use).
    """
    names, chunks, lang_list, order = [], [], [], []
    for name, x in embeddings.items():
        x = torch.as_tensor(x).float().cpu()
        idx = torch.linspace(0, len(x) - 1, min(len(x), max_points_per_group)).round().long() if len(x) else torch.zeros(0, dtype=torch.long)
        chunks.append(x[idx])
        names += [name] * len(idx)
        if langs is not None:
            group_langs = list(langs.get(name, ["?"] * len(x)))
            if len(group_langs) != len(x):
                raise ValueError(f"langs[{name!r}] has {len(group_langs)} entries but embeddings[{name!r}] has {len(x)} rows")
            lang_list += [str(group_langs[i]) for i in idx.tolist()]
            order = list(dict.fromkeys([*order, *map(str, group_langs)]))  # languages in order of first appearance
    x = torch.cat(chunks)
    if len(x) < 2:
        raise ValueError(f"need at least two points to project, got {len(x)}")
    if normalize:
        x = F.normalize(x, dim=-1)
    xy = pca_2d(x).numpy()
    groups = list(dict.fromkeys(names))
    marker = {g: MARKERS[i % len(MARKERS)] for i, g in enumerate(groups)}
    by_lang = langs is not None
    fig = _figure(13.0 if by_lang else 6.5, 5.5)
    ax = fig.add_subplot(1, 2 if by_lang else 1, 1)
    for g, colour in zip(groups, _colours(len(groups))):
        sel = [i for i, n in enumerate(names) if n == g]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.6, marker=marker[g], color=colour, label=f"{g} ({len(sel)})")
    ax.set_title("PCA of the shared space, by tower")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend(fontsize="small", markerscale=1.5, title="tower (points)")
    if by_lang:
        from matplotlib.lines import Line2D

        ax2 = fig.add_subplot(1, 2, 2, sharex=ax, sharey=ax)
        languages = [lang for lang in order if lang != "shared" and lang in set(lang_list)]
        colour = dict(zip(languages, _colours(len(languages))))
        if "shared" in lang_list:  # one input for several languages (an image, an English anchor): grey, drawn first
            languages.insert(0, "shared")
            colour["shared"] = (0.6, 0.6, 0.6, 1.0)
        for g in groups:
            for lang in languages:
                sel = [i for i, (n, l) in enumerate(zip(names, lang_list)) if n == g and l == lang]
                if sel:
                    ax2.scatter(xy[sel, 0], xy[sel, 1], s=10, alpha=0.7, marker=marker[g], color=colour[lang])
        ax2.set_title("the same points by language (markers: towers, as on the left)")
        ax2.set_xlabel("PC1")
        handles = [Line2D([], [], linestyle="", marker="o", color=colour[lang],
                          label="shared by all languages" if lang == "shared" else lang) for lang in languages]
        # one legend (a legend added with add_artist is left out of the saved bounding box); the markers are the
        # left panel's, whose legend names the towers
        ax2.legend(handles=handles, fontsize="small", title="language", loc="upper left", bbox_to_anchor=(1.0, 1.0),
                   ncol=1 if len(languages) <= 20 else 2)
    return _save(fig, path)


def _renderable(text: str) -> bool:
    """Whether matplotlib's default font draws ``text`` correctly: every glyph present, and no script that needs
    shaping or right-to-left layout (Arabic, Hebrew, Indic), which matplotlib does not do."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    if any(0x0590 <= ord(c) <= 0x08FF or 0x0900 <= ord(c) <= 0x0DFF or 0xFB1D <= ord(c) <= 0xFEFF for c in text):
        return False
    font = _renderable.__dict__.get("font")
    if font is None:
        font = _renderable.__dict__["font"] = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    return all(c.isspace() or font.get_char_index(ord(c)) for c in text)


def _caption(item: Any, label: Any, width: int = 22) -> str:
    """A short caption of an example item: its text when drawable, else its concept label (file names shortened)."""
    import textwrap

    text = str(item)
    if _is_file(text):
        text = Path(text).name
    elif not _renderable(text):
        text = f"[{label}]"  # the font cannot draw it: show the concept id (report.md has the real text)
    return "\n".join(textwrap.wrap(text, width)[:3]) or " "


def _is_file(item: Any) -> bool:
    return isinstance(item, str) and len(item) < 4096 and Path(item).suffix.lower() in IMAGE_SUFFIXES + AUDIO_SUFFIXES


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")


def plot_retrieval_examples(examples: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, thumb: int = 96) -> Path:
    """A retrieval gallery: one row per example query (its direction and language, the query, then its top-k gallery
    items), green frames on correct items (the query's concept), red on wrong ones; images drawn as thumbnails, the
    concept id under every item. Text the default font cannot draw (right-to-left scripts, missing glyphs) shows as
    ``[concept id]`` (the Markdown report has the text itself).

    Args:
        examples: ``{direction: [example]}`` with examples as from
            :func:`~mmalign.evaluation.retrieval.top_k_examples` (plus ``"lang"``).
        path: Output PNG path.
        thumb: Thumbnail size in pixels.
    """
    rows = [(direction, ex) for direction, exs in examples.items() for ex in exs]
    if not rows:
        raise ValueError("no retrieval examples to draw")
    k = max(len(ex["top"]) for _, ex in rows)
    height = 1.8 * len(rows) + 0.6
    fig = _figure(1.9 * (k + 1) + 0.4, height)
    grid = fig.add_gridspec(len(rows), k + 1, wspace=0.12, hspace=0.95, top=1 - 1.0 / height, bottom=0.3 / height)
    fallback = False
    for r, (direction, ex) in enumerate(rows):
        cells = [(ex["query"], ex["label"], None)] + [(t["item"], t["label"], t["hit"]) for t in ex["top"]]
        for c, (item, label, hit) in enumerate(cells):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            frame = "0.4" if hit is None else ("#1a9850" if hit else "#d73027")
            for spine in ax.spines.values():
                spine.set_edgecolor(frame)
                spine.set_linewidth(1.0 if hit is None else 3.0)
            image = _thumbnail(item, thumb)
            if image is not None:
                ax.imshow(image)
            else:
                caption = _caption(item, label)
                fallback |= caption.startswith("[")
                ax.set_facecolor("0.97")
                ax.text(0.5, 0.5, caption, ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_xlabel(_caption(label, label, width=24)[:60], fontsize=7)
            if c == 0:
                rank = ex.get("rank")
                ax.set_title(f"{direction} [{ex.get('lang', '')}]\nquery"
                             + (f", its concept at rank {rank:g}/{ex['gallery_size']}" if rank is not None else ""),
                             fontsize=7.5, loc="left")
            else:
                ax.set_title(f"#{c} {'correct' if hit else 'wrong'}  ({float(ex['top'][c - 1]['score']):.2f})", fontsize=7.5,
                             color=frame)
    fig.suptitle("Top retrievals of a few test queries (green: the query's concept, red: another; cosine score)"
                 + ("\n[concept id]: text the plot font cannot draw; report.md has the text" if fallback else ""),
                 fontsize=9, y=1 - 0.2 / height, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _thumbnail(item: Any, size: int):
    """An RGB array of an image file item (None for anything else, or an unreadable file)."""
    if not (isinstance(item, str) and Path(item).suffix.lower() in IMAGE_SUFFIXES and Path(item).is_file()):
        return None
    try:
        from PIL import Image

        with Image.open(item) as im:
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im).convert("RGB")
            im.thumbnail((size, size))
            import numpy as np

            return np.asarray(im)
    except (OSError, ValueError):
        return None
