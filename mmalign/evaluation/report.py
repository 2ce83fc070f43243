"""Evaluation report: ``metrics.json`` + ``report.md`` + PNG plots in one folder.

``results`` is a plain dict; these keys get tables and plots (any other key is kept in the JSON):

- ``"retrieval"``: ``{lang: {direction: metrics}}`` (e.g. merged outputs of ``per_language_retrieval`` for several
  modality pairs) -> one Markdown table per direction (rows = languages, then the **mean over languages**, then the
  pooled ``"all"`` entry when there is one, named and explained: one gallery holding every language, where a query
  has one positive per language its concept appears in) and ``recall_at_1.png``. ``"retrieval_mean"``
  (``{direction: metrics}``) and ``"pooled"`` (``{direction: {"queries", "gallery", "positives_per_query",
  "gallery_languages"}}``) are used when given (the mean is computed otherwise).
- ``"ceilings"``: ``{tower: {"encoder", "pivot", "ceiling", "against": {what: ceiling_rows}}}`` from
  ``mmalign eval`` -> a table per student tower: the frozen encoder's own retrieval (no projector), the recipe and
  the fraction of the ceiling it keeps.
- ``"cross_lingual"``: the dict from ``cross_lingual_retrieval`` -> a matrix table and ``cross_lingual.png``.
- ``"xsim"``: ``{pair: error_rate}`` -> a table.
- ``"zeroshot"``: ``{"text->image": {"text_tower", "classified_tower", "templates", "prompts", "classes", "queries",
  "accuracy": {lang: {"top1", "top5"}}}}`` (the tower pair and the prompt templates are named in the report), or a
  plain ``{lang: {"top1": ..., "top5": ...}}`` -> a table each.
- ``"examples"``: ``{direction: [example]}`` (``top_k_examples`` plus ``"lang"``) -> a table of the top retrievals
  of a few queries and ``examples.png`` (thumbnails for image items).

``embeddings`` (optional) maps a group name (tower or modality) to ``[N, D]`` embeddings in the shared space ->
``projection.png`` (PCA by tower, and by language when ``langs`` is given: tab20 colours, a marker per tower).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def _mean_over_languages(retrieval: Mapping[str, Mapping[str, Mapping[str, float]]], direction: str) -> dict[str, float]:
    per_lang = [per[direction] for lang, per in retrieval.items() if lang != "all" and direction in per]
    keys = [k for k in _TABLE_COLUMNS if k != "medR" and all(k in m for m in per_lang)]
    return {k: sum(float(m[k]) for m in per_lang) / len(per_lang) for k in keys} if per_lang else {}


def _pooled_note(direction: str, counts: Mapping[str, Any] | None) -> str:
    if counts and counts["positives_per_query"] <= 1.0:
        return (f"¹ *pooled*: the {counts['queries']} queries of every language against ONE gallery of "
                f"{counts['gallery']} items ({counts['gallery_languages']} language(s), one item per concept): the "
                "query-weighted mean of the languages' figures.")
    if counts:
        return (f"¹ *pooled*: the {counts['queries']} queries of every language against ONE gallery of "
                f"{counts['gallery']} items in {counts['gallery_languages']} language(s); a query is a hit when its top "
                f"item is any item of its concept, and it has {counts['positives_per_query']:.1f} such items on average "
                "(one per language its concept appears in), so the pooled figure can exceed every language's own. "
                "Compare recipes with the mean over languages.")
    return ("¹ *pooled*: every language's queries against one gallery holding every language; a query is a hit when "
            "its top item is any item of its concept (in any language), so the pooled figure can exceed every "
            "language's own. Compare recipes with the mean over languages.")


def _retrieval_md(
    retrieval: Mapping[str, Mapping[str, Mapping[str, float]]], means: Mapping[str, Mapping[str, float]] | None = None,
    pooled: Mapping[str, Mapping[str, Any]] | None = None, pairs: Mapping[str, str] | None = None,
) -> list[str]:
    lines = ["## Retrieval", "", "R@k in %, MRR in [0, 1], medR = median rank (1 is best). Each language's row ranks that "
             "language's queries against that language's gallery; *mean* is the unweighted mean of the language rows.", ""]
    kinds = {}
    for pair, kind in (pairs or {}).items():
        a, b = pair.split("|")
        kinds[f"{a}->{b}"] = kinds[f"{b}->{a}"] = kind
    directions = list(dict.fromkeys(d for per_dir in retrieval.values() for d in per_dir))
    languages = [lang for lang in retrieval if lang != "all"]
    for direction in directions:
        rows = []
        for lang in languages:
            if direction in retrieval[lang]:
                m = retrieval[lang][direction]
                rows.append([str(lang)] + [_fmt(m.get(c), percent=c.startswith("R@")) for c in _TABLE_COLUMNS])
        n = len(rows)
        note = []
        if n > 1:
            m = (means or {}).get(direction) or _mean_over_languages(retrieval, direction)
            rows.append([f"**mean ({n} languages)**"] + [f"**{_fmt(m.get(c), percent=c.startswith('R@'))}**" if c in m else "–"
                                                          for c in _TABLE_COLUMNS])
            if direction in retrieval.get("all", {}):
                m = retrieval["all"][direction]
                rows.append(["pooled ¹"] + [_fmt(m.get(c), percent=c.startswith("R@")) for c in _TABLE_COLUMNS])
                note = [_pooled_note(direction, (pooled or {}).get(direction)), ""]
        kind = f" ({kinds[direction]} pair)" if direction in kinds else ""
        lines += [f"### {direction}{kind}", ""] + _table(["lang", *_TABLE_COLUMNS], rows) + note
    return lines


def _ceilings_md(ceilings: Mapping[str, Any]) -> list[str]:
    lines = ["## Ceilings: what the frozen student encoder retrieves by itself", "",
             "*ceiling* = R@1 of the frozen student encoder alone, no projector: student(L) -> student(pivot), the "
             "gallery being the pivot-language rows of the same concepts (e.g. USE-m de -> USE-m en). A projector "
             "maps that space into another one, so the recipe's retrieval from L is bounded in practice by what the "
             "encoder itself separates; *of ceiling* = recipe / ceiling (1.0: the projector keeps all of it). "
             "R@1 in %.", ""]
    for tower, entry in ceilings.items():
        against = entry.get("against", {})
        langs = list(entry["ceiling"])
        header = ["lang", "ceiling"]
        for what in against:
            header += [f"recipe: {what}", "of ceiling"]
        rows = []
        for lang in langs + ["mean"]:
            if lang == "mean":
                if len(langs) < 2:
                    continue
                first = next(iter(against.values()), {})
                ceil = first.get("mean", {}).get("ceiling")
                cells = ["**mean**", f"**{_fmt(ceil, percent=True)}**"]
                for rows_ in against.values():
                    r = rows_.get("mean", {})
                    ratio = r.get("of_ceiling")
                    cells += [f"**{_fmt(r.get('recipe'), percent=True)}**", "–" if ratio is None else f"**{ratio:.2f}**"]
                rows.append(cells)
                continue
            else:
                cells = [lang, _fmt(entry["ceiling"][lang]["R@1"], percent=True)]
            for rows_ in against.values():
                r = rows_.get(lang, {})
                ratio = r.get("of_ceiling")
                cells += [_fmt(r.get("recipe"), percent=True), "–" if ratio is None else f"{ratio:.2f}"]
            rows.append(cells)
        lines += [f"### {tower}: {entry.get('encoder', '')}, pivot {entry['pivot']}", ""] + _table(header, rows)
    return lines


def _zeroshot_md(zeroshot: Mapping[str, Any]) -> list[str]:
    first = next(iter(zeroshot.values()), None)
    if not (isinstance(first, Mapping) and "accuracy" in first):  # a plain {lang: {top1, top5}}
        return _flat_md("Zero-shot classification", zeroshot, "Top-k accuracy in %.")
    lines = ["## Zero-shot classification", "",
             "The evaluation concepts are the classes; each class's weight is the mean of its name's prompt embeddings "
             "in that language (CLIP prompt ensembling). Top-k accuracy in %.", ""]
    for pair, z in zeroshot.items():
        prompts = z.get("prompts", {})
        en = prompts.get("en") or next(iter(prompts.values()), [])
        shown = ", ".join(f"`{t}`" for t in en)
        lines += [f"### {z['text_tower']} -> {z['classified_tower']} ({z.get('modality', '')})", "",
                  f"Classes: {z['classes']} concepts; queries: {z['queries']} distinct {z.get('modality', 'item')} inputs. "
                  f"Prompt templates: **{z['templates']}**, {len(en)} per language"
                  + (f" (en: {shown})" if en else "") + "; every language's templates are in metrics.json.", ""]
        acc = z["accuracy"]
        cols = list(dict.fromkeys(c for v in acc.values() for c in v))
        rows = [[lang] + [_fmt(v.get(c), percent=True) for c in cols] for lang, v in acc.items()]
        if len(acc) > 1:
            rows.append([f"**mean ({len(acc)} languages)**"]
                        + [f"**{_fmt(sum(v[c] for v in acc.values()) / len(acc), percent=True)}**" for c in cols])
        lines += _table(["lang", *cols], rows)
    return lines


def _item_md(item: Any, label: Any) -> str:
    text = str(item)
    if Path(text).suffix.lower() in plots.IMAGE_SUFFIXES + plots.AUDIO_SUFFIXES:
        return f"{label} ({Path(text).name})"
    return text.replace("|", "\\|")


def _examples_md(examples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    k = max((len(ex["top"]) for exs in examples.values() for ex in exs), default=0)
    lines = ["## Retrieval examples", "",
             f"A few test queries per direction (one per language, spread over the languages; picked by position, not "
             f"by outcome) and their top {k} items in that language's gallery. ✓ = the query's concept; the cosine "
             "score in brackets; *rank* = the rank of the first correct item.", ""]
    rows = []
    for direction, exs in examples.items():
        for ex in exs:
            rank = ex.get("rank")
            cells = [direction, str(ex.get("lang", "")), _item_md(ex["query"], ex["label"]),
                     "–" if rank is None else f"{rank:g} / {ex['gallery_size']}"]
            cells += [("✓ " if t["hit"] else "✗ ") + f"{_item_md(t['item'], t['label'])} ({t['score']:.2f})" for t in ex["top"]]
            rows.append(cells + [""] * (k - len(ex["top"])))
    return lines + _table(["direction", "lang", "query", "rank", *[f"#{i + 1}" for i in range(k)]], rows)


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
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and PNG plots into ``output_dir`` (nothing anywhere else).

    Args:
        results: Metrics dict (keys described in the module docstring).
        output_dir: Folder to write into (created if missing).
        embeddings: Optional ``{group: [N, D]}`` shared-space embeddings for the projection plot.
        langs: Optional ``{group: N language codes}`` to colour the projection by language.
        title: Report title.

    Returns:
        ``{"metrics": path, "report": path, <plot name>: path, ...}`` of the files written.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(to_jsonable(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    retrieval = results.get("retrieval") or {}
    means = results.get("retrieval_mean")
    if retrieval:
        if means is None and sum(lang != "all" for lang in retrieval) > 1:
            directions = dict.fromkeys(d for per in retrieval.values() for d in per)
            means = {d: _mean_over_languages(retrieval, d) for d in directions}
        paths["recall_at_1"] = plots.plot_recall_bars(retrieval, out / "recall_at_1.png", "R@1", means=means)
    if results.get("cross_lingual"):
        cl = results["cross_lingual"]
        paths["cross_lingual"] = plots.plot_heatmap(
            cl["matrix"], cl["languages"], cl["languages"], out / "cross_lingual.png",
            title=f"cross-lingual {cl.get('metric', 'R@1')}" + (f" ({cl['tower']} tower)" if cl.get("tower") else ""),
            xlabel="gallery language", ylabel="query language",
        )
    if results.get("examples"):
        paths["examples"] = plots.plot_retrieval_examples(results["examples"], out / "examples.png")
    if embeddings:
        paths["projection"] = plots.plot_projection(embeddings, out / "projection.png", langs=langs)

    lines = [f"# {title}", ""]
    if retrieval:
        lines += _retrieval_md(retrieval, means, results.get("pooled"), results.get("pairs"))
        lines += ["![R@1 per language](recall_at_1.png)", ""]
    if results.get("ceilings"):
        lines += _ceilings_md(results["ceilings"])
    if results.get("ceilings_skipped"):
        lines += ([] if results.get("ceilings") else ["## Ceilings", ""]) + [
            f"No ceiling for student tower `{name}`: {why}." for name, why in results["ceilings_skipped"].items()] + [""]
    if results.get("examples"):
        lines += _examples_md(results["examples"]) + ["![retrieval examples](examples.png)", ""]
    if results.get("cross_lingual"):
        lines += _cross_lingual_md(results["cross_lingual"]) + ["![cross-lingual](cross_lingual.png)", ""]
    if results.get("xsim"):
        lines += _flat_md("xsim error rate", results["xsim"], "Error rate in % (lower is better).")
    if results.get("zeroshot"):
        lines += _zeroshot_md(results["zeroshot"])
    if "projection" in paths:
        lines += ["## The shared space", "", "2-D PCA of the test embeddings (L2-normalised), by tower and by language.", "",
                  f"![projection]({paths['projection'].name})", ""]
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines), encoding="utf-8")
    return paths
