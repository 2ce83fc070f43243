"""Evaluation report: ``metrics.json`` + ``report.md`` + PNG plots in one folder.

``results`` is a plain dict; these keys get tables and plots (any other key is kept in the JSON):

- ``"retrieval"``: ``{lang: {direction: metrics}}`` (e.g. merged outputs of
  ``per_language_retrieval`` for several modality pairs) -> one Markdown table per direction
  (rows = languages; R@1, R@5, R@10, MRR, medR) and ``recall_at_1.png``.
- ``"cross_lingual"``: the dict from ``cross_lingual_retrieval`` -> a matrix table and
  ``cross_lingual.png``.
- ``"xsim"``: ``{pair: error_rate}`` -> a table.
- ``"zeroshot"``: ``{lang: {"top1": ..., "top5": ...}}`` -> a table.

``embeddings`` (optional) maps a group name (modality, e.g. ``"image"``, ``"text"``) to ``[N, D]``
embeddings in the shared space -> ``projection.png`` (PCA by modality, and by language when
``langs`` is given) and ``similarity.png`` (cosine matrix of the first rows of the first two groups,
which should be aligned pairs: a bright diagonal is good).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import plots

__all__ = ["to_jsonable", "write_report"]

_TABLE_COLUMNS = ("R@1", "R@5", "R@10", "MRR", "medR")


def to_jsonable(obj: Any) -> Any:
    """Tensors/arrays -> lists, non-finite floats -> None, tuple keys -> "a->b" strings."""
    if isinstance(obj, Mapping):
        return {("->".join(map(str, k)) if isinstance(k, tuple) else str(k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Tensor):
        obj = obj.tolist()
    elif hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        if percent:
            return f"{100 * value:.1f}"
        return f"{value:g}" if float(value).is_integer() else f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(header)) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]


def _retrieval_md(retrieval: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    lines = ["## Retrieval", "", "R@k in %, MRR in [0, 1], medR = median rank (1 is best).", ""]
    directions = list(dict.fromkeys(d for per_dir in retrieval.values() for d in per_dir))
    for direction in directions:
        rows = []
        for lang, per_dir in retrieval.items():
            if direction in per_dir:
                m = per_dir[direction]
                rows.append([str(lang)] + [_fmt(m.get(c), percent=c.startswith("R@")) for c in _TABLE_COLUMNS])
        lines += [f"### {direction}", ""] + _table(["lang", *_TABLE_COLUMNS], rows)
    return lines


def _cross_lingual_md(cl: Mapping[str, Any]) -> list[str]:
    langs, matrix, metric = cl["languages"], cl["matrix"], cl.get("metric", "R@1")
    rows = [[f"**{q}**"] + [_fmt(v, percent=metric.startswith("R@")) for v in row] for q, row in zip(langs, matrix)]
    return [f"## Cross-lingual retrieval ({metric}, rows = query language, columns = gallery language)", ""] + _table(
        ["query \\ gallery", *langs], rows
    )


def _flat_md(title: str, section: Mapping[str, Any], note: str = "") -> list[str]:
    lines = [f"## {title}", ""] + ([note, ""] if note else [])
    first = next(iter(section.values()), None)
    if isinstance(first, Mapping):
        cols = list(dict.fromkeys(c for v in section.values() for c in v))
        rows = [[str(k)] + [_fmt(v.get(c), percent=True) for c in cols] for k, v in section.items()]
        return lines + _table(["", *cols], rows)
    return lines + _table(["", "value (%)"], [[str(k), _fmt(v, percent=True)] for k, v in section.items()])


def write_report(
    results: Mapping[str, Any],
    output_dir: str | Path,
    embeddings: Mapping[str, Tensor] | None = None,
    langs: Mapping[str, Sequence[str]] | None = None,
    title: str = "mmalign evaluation",
    similarity_sample: int = 32,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and PNG plots into ``output_dir``.

    Args:
        results: Metrics dict (keys described in the module docstring).
        output_dir: Folder to write into (created if missing).
        embeddings: Optional ``{group: [N, D]}`` shared-space embeddings for the projection and
            similarity plots.
        langs: Optional ``{group: N language codes}`` to colour the projection by language.
        title: Report title.
        similarity_sample: Rows of the first two embedding groups in ``similarity.png``.

    Returns:
        ``{"metrics": path, "report": path, <plot name>: path, ...}`` of the files written.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(to_jsonable(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if results.get("retrieval"):
        paths["recall_at_1"] = plots.plot_recall_bars(results["retrieval"], out / "recall_at_1.png", "R@1")
    if results.get("cross_lingual"):
        cl = results["cross_lingual"]
        paths["cross_lingual"] = plots.plot_heatmap(
            cl["matrix"], cl["languages"], cl["languages"], out / "cross_lingual.png",
            title=f"cross-lingual {cl.get('metric', 'R@1')}", xlabel="gallery language", ylabel="query language",
        )
    if embeddings:
        paths["projection"] = plots.plot_projection(embeddings, out / "projection.png", langs=langs)
        groups = list(embeddings)
        if len(groups) >= 2:
            a = F.normalize(torch.as_tensor(embeddings[groups[0]]).float()[:similarity_sample], dim=-1)
            b = F.normalize(torch.as_tensor(embeddings[groups[1]]).float()[:similarity_sample], dim=-1)
            paths["similarity"] = plots.plot_heatmap(
                a @ b.T, [str(i) for i in range(len(a))], [str(i) for i in range(len(b))], out / "similarity.png",
                title=f"cosine similarity, {groups[0]} (rows) vs {groups[1]} (columns)",
                xlabel=groups[1], ylabel=groups[0], annotate=False,
            )

    lines = [f"# {title}", ""]
    if results.get("retrieval"):
        lines += _retrieval_md(results["retrieval"]) + ["![R@1 per language](recall_at_1.png)", ""]
    if results.get("cross_lingual"):
        lines += _cross_lingual_md(results["cross_lingual"]) + ["![cross-lingual](cross_lingual.png)", ""]
    if results.get("xsim"):
        lines += _flat_md("xsim error rate", results["xsim"], "Error rate in % (lower is better).")
    if results.get("zeroshot"):
        lines += _flat_md("Zero-shot classification", results["zeroshot"], "Top-k accuracy in %.")
    for name in ("projection", "similarity"):
        if name in paths:
            lines += [f"![{name}]({paths[name].name})", ""]
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines), encoding="utf-8")
    return paths
