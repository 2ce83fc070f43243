"""``mmalign compare``: the metrics of several runs or reports as one table (and a plot).

    mmalign compare --runs '[runs/a, runs/b, eval/c]'                   # a table on the terminal
    mmalign compare --runs '[runs/s0, runs/s1]' --metrics 'val/*R@1,*loss' --output cmp/   # + cmp/compare.{md,csv,png}

What each argument may be (read with the standard library and the safe checkpoint reader only):

* a Lightning log folder (``.../version_N`` with ``metrics.csv`` or TensorBoard event files): the **last**
  logged value of every metric (and its history, for the plot), plus ``best/<monitor>`` from
  ``checkpoints/last.ckpt``'s ModelCheckpoint state (read with ``torch.load(weights_only=True)``);
* a run root (``default_root_dir``, holding ``lightning_logs/version_*`` or ``version_*``): its newest version;
* an ``mmalign eval`` report folder (``metrics.json``) or a ``results.json``: every number in it, keyed by its
  path (``retrieval/de/image->text/R@1``);
* one of those files, or a ``.ckpt``.

A folder holding several of them (a run root with ``results.json`` and ``lightning_logs/``) gives all of their
metrics. Rows are aligned by metric name; the best value of each row (highest, or lowest for losses, ranks and
error rates) is marked ``*`` when at least two runs have it and they differ.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: Metric name endings where lower is better (the last path component, case-insensitive).
LOWER_IS_BETTER = re.compile(r"(loss|medr|meanr|median_rank|mean_rank|error|err|xsim|perplexity|ppl|wer|cer)(_\w+)?$", re.I)
#: Columns that are bookkeeping, not results: listed but never ranked.
NOT_RANKED = re.compile(r"^(epoch|step|global_step)$|(^|/)(num_\w+|n_\w+|count|lr(-\w+)?|time\w*|created)$", re.I)
REPORT_FILES = ("metrics.json", "results.json")


@dataclass
class Run:
    """The metrics of one run or report: ``metrics`` ``{name: value}``, ``history`` ``{name: [(step, value)]}``."""

    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """``{"a/b/c": number}`` of every finite number in nested dicts (lists are indexed; strings skipped)."""
    out: dict[str, float] = {}
    items: Iterable[tuple[Any, Any]] = obj.items() if isinstance(obj, Mapping) else \
        enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        name = f"{prefix}/{key}" if prefix else str(key)
        number = _number(value)
        if number is not None:
            out[name] = number
        else:
            out.update(flatten(value, name))
    return out


def read_metrics_csv(path: Path) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    """Last value of every column of Lightning's ``metrics.csv`` and each column's ``(step, value)`` history."""
    last: dict[str, float] = {}
    history: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = _parse(row.get("step"))
            for key, text in row.items():
                if key is None or key in ("step",) or text in (None, ""):
                    continue
                value = _parse(text)
                if value is None:
                    continue
                last[key] = value
                if key != "epoch":
                    history.setdefault(key, []).append((step if step is not None else len(history.get(key, [])), value))
    return last, history


def _parse(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_tensorboard(folder: Path) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]]]:
    """Last value and ``(step, value)`` history of every scalar in a TensorBoard log folder (Lightning's default
    logger), read with tensorboard's own ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    last: dict[str, float] = {}
    history: dict[str, list[tuple[float, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        events = [(float(e.step), float(e.value)) for e in acc.Scalars(tag) if math.isfinite(e.value)]
        if tag == "hp_metric" or not events:  # Lightning's placeholder hyper-parameter metric
            continue
        last[tag] = events[-1][1]
        if tag != "epoch":
            history[tag] = events
    return last, history


def _has_log(folder: Path) -> bool:
    return (folder / "metrics.csv").is_file() or any(folder.glob("events.out.tfevents.*"))


def _checkpoint_scores(ckpt: Path) -> dict[str, float]:
    from mmalign.export.checkpoint import checkpoint_metrics, load_checkpoint

    return dict(checkpoint_metrics(load_checkpoint(ckpt)) or {})


def _newest_version(root: Path) -> Path | None:
    """The ``version_N`` with the highest N under ``root`` or ``root/lightning_logs`` that has a log
    (``metrics.csv`` or TensorBoard events)."""
    found = []
    for base in (root, root / "lightning_logs"):
        for d in base.glob("version_*"):
            m = re.fullmatch(r"version_(\d+)", d.name)
            if m and _has_log(d):
                found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def read_run(path: str | Path) -> Run:
    """The metrics of a run folder, report folder or metrics file (see the module docstring).

    Raises:
        FileNotFoundError: No such file or folder.
        ValueError: Nothing readable in it (the message lists what was looked for).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such run or report: {p}")
    run = Run(p)

    def add(source: Path, metrics: Mapping[str, float], history: Mapping[str, list] | None = None) -> None:
        run.metrics.update(metrics)
        run.history.update(history or {})
        run.sources.append(str(source))

    if p.is_file():
        if p.suffix == ".ckpt":
            add(p, _checkpoint_scores(p))
        elif p.name.endswith(".csv"):
            add(p, *read_metrics_csv(p))
        elif p.suffix == ".json":
            add(p, _read_json_metrics(p))
        else:
            raise ValueError(f"{p}: not a metrics.csv, metrics.json/results.json or .ckpt")
        return run
    log = p if _has_log(p) else _newest_version(p)
    if log is not None:
        if (log / "metrics.csv").is_file():
            add(log / "metrics.csv", *read_metrics_csv(log / "metrics.csv"))
        else:
            add(log, *read_tensorboard(log))
    for last in ([log / "checkpoints" / "last.ckpt"] if log is not None else []) + [p / "checkpoints" / "last.ckpt"]:
        if last.is_file():  # ModelCheckpoint's state: best/<monitor>
            add(last, _checkpoint_scores(last))
            break
    for name in REPORT_FILES:
        if (p / name).is_file():
            add(p / name, _read_json_metrics(p / name))
    if not run.sources:
        raise ValueError(f"{p}: no metrics.csv or TensorBoard events (Lightning log folder), lightning_logs/version_*, "
                         "checkpoints/last.ckpt, metrics.json (mmalign eval report) or results.json in it")
    return run


def _read_json_metrics(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from err
    if isinstance(data, Mapping) and isinstance(data.get("results"), Mapping):  # quickstart's results.json
        results = data["results"]
        # {"image|text": {lang: {"image->text": {...}}}}: the direction names the pair; as in eval reports
        if results and all("|" in str(k) and isinstance(v, Mapping) for k, v in results.items()):
            merged: dict[str, Any] = {}
            for by_lang in results.values():
                for lang, directions in by_lang.items():
                    merged.setdefault(lang, {}).update(directions if isinstance(directions, Mapping) else {})
            return flatten({"retrieval": merged})
        return flatten(results)
    return flatten(data)


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short distinct column names: the fewest trailing path components that tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(x) for x in parts) + 1):
        labels = ["/".join(x[-n:]) for x in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def lower_is_better(name: str) -> bool:
    return bool(LOWER_IS_BETTER.search(name.rsplit("/", 1)[-1]))


def best_index(values: Sequence[float | None], name: str) -> int | None:
    """Index of the best value of a row, or None (unranked column, fewer than two values, or all equal)."""
    present = [(v, i) for i, v in enumerate(values) if v is not None]
    if NOT_RANKED.search(name) or len(present) < 2 or len({v for v, _ in present}) == 1:
        return None
    return (min(present) if lower_is_better(name) else max(present))[1]


def table(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> tuple[list[str], list[str], list[list[float | None]]]:
    """``(run labels, metric names, values [metric][run])``, metrics in name order, filtered by glob patterns."""
    names = sorted({k for r in runs for k in r.metrics})
    if metrics:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in metrics)]
    return run_labels([r.path for r in runs]), names, [[r.metrics.get(n) for r in runs] for n in names]


def _fmt(value: float | None, integers: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if integers else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _row_cells(row: Sequence[float | None]) -> list[str]:
    """A row's values, all as integers when all are (epochs, ranks), else with one precision."""
    integers = all(v == int(v) for v in row if v is not None)
    return [_fmt(v, integers) for v in row]


def format_table(labels: Sequence[str], names: Sequence[str], values: Sequence[Sequence[float | None]],
                 markdown: bool = False) -> str:
    """The table as aligned text (``*`` marks the best of each row) or as Markdown (best in bold)."""
    rows = []
    for name, row in zip(names, values):
        best = best_index(row, name)
        cells = _row_cells(row)
        if best is not None:
            cells[best] = f"**{cells[best]}**" if markdown else f"{cells[best]}*"
        arrow = "" if NOT_RANKED.search(name) else (" (lower better)" if lower_is_better(name) else "")
        rows.append([name + arrow, *cells])
    header = ["metric", *labels]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot(runs: Sequence[Run], labels: Sequence[str], names: Sequence[str], values: Sequence[Sequence[float | None]],
         path: Path, max_panels: int = 12) -> Path:
    """One bar panel per metric (its own y scale; best bar outlined), plus per-step curves where runs logged
    a history (Lightning logs), saved as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(n, row) for n, row in zip(names, values) if not NOT_RANKED.search(n)][:max_panels]
    ranked = [n for n in names if not NOT_RANKED.search(n)]
    curves = [n for n in ranked if any(len(r.history.get(n, [])) > 1 for r in runs)][:4]  # logged per step
    cols = min(4, max(1, len(shown)))
    bar_rows = math.ceil(len(shown) / cols) if shown else 0
    total_rows = bar_rows + (1 if curves else 0)
    if total_rows == 0:
        raise ValueError("nothing to plot: no ranked metric in the table")
    fig = plt.figure(figsize=(3.6 * cols, 2.9 * total_rows + 0.6), layout="constrained")
    grid = fig.add_gridspec(total_rows, max(cols, len(curves) or 1))
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for k, (name, row) in enumerate(shown):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        best = best_index(row, name)
        xs = range(len(runs))
        bars = ax.bar(xs, [v if v is not None else 0 for v in row], color=[colours(i % colours.N) for i in xs])
        for i, (bar, v, cell) in enumerate(zip(bars, row, _row_cells(row))):
            ax.annotate("n/a" if v is None else cell, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, fontweight="bold" if i == best else "normal")
            if i == best:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
        ax.set_title(name + (" (lower better)" if lower_is_better(name) else ""), fontsize=9)
        short = all(len(label) <= 12 for label in labels)
        ax.set_xticks(list(xs), [label if short else str(i + 1) for i, label in enumerate(labels)], fontsize=8)
        ax.margins(y=0.18)
        ax.tick_params(axis="y", labelsize=8)
    for k, name in enumerate(curves):
        ax = fig.add_subplot(grid[bar_rows, k])
        for i, r in enumerate(runs):
            h = r.history.get(name) or []
            if h:
                ax.plot([s for s, _ in h], [v for _, v in h], marker="o", ms=3, color=colours(i % colours.N), label=str(i + 1))
        ax.set_title(f"{name} per step", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % colours.N)) for i in range(len(runs))]
    fig.legend(handles, [f"{i + 1}: {label}" for i, label in enumerate(labels)], loc="outside lower center",
               ncol=min(3, len(runs)), fontsize=8, frameon=False)
    fig.suptitle("mmalign compare" + (f" ({len(shown)} of {len(ranked)} metrics; --metrics picks)"
                                      if len(shown) < len(ranked) else ""), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return path


def compare(runs: list[str], metrics: list[str] | str | None = None, output: str | None = None, plot_metrics: int = 12) -> str:
    """Compare the metrics of several runs or reports in one table (``*`` marks each row's best).

    Args:
        runs: Lightning log folders (``version_N`` with ``metrics.csv``, or a run root with ``lightning_logs/``),
            ``mmalign eval`` report folders (``metrics.json``), ``results.json`` files, ``.ckpt`` files.
        metrics: Glob patterns of the metric names to show, a list or comma-separated (``'val/*R@1,*loss'``;
            quote a leading ``*`` inside a YAML list: ``'["*R@1"]'``); default: all.
        output: Folder to write ``compare.md`` (Markdown, best in bold), ``compare.csv`` and ``compare.png``.
        plot_metrics: At most this many metric panels in the plot (the first rows of the table).

    Returns:
        The table as printed.
    """
    if isinstance(runs, str):
        runs = [runs]
    if not runs:
        raise ValueError("give at least one run or report to compare")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    loaded = [read_run(r) for r in runs]
    labels, names, values = table(loaded, metrics)
    if not names:
        known = sorted({k for r in loaded for k in r.metrics})
        raise ValueError(f"no metric matches {metrics}; metrics: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    text = format_table(labels, names, values)
    print(text)
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        md = "\n".join(["Runs: " + "; ".join(f"`{lab}` = {', '.join(r.sources)}" for lab, r in zip(labels, loaded)), "",
                        format_table(labels, names, values, markdown=True), ""])
        atomic_write(out / "compare.md", lambda f: f.write(md.encode("utf-8")))

        def write_csv(f: Any) -> None:
            import io

            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["metric", *labels, "best"])
            for name, row in zip(names, values):
                best = best_index(row, name)
                w.writerow([name, *("" if v is None else repr(v) for v in row), "" if best is None else labels[best]])
            f.write(buf.getvalue().encode("utf-8"))

        atomic_write(out / "compare.csv", write_csv)
        png = plot(loaded, labels, names, values, out / "compare.png", plot_metrics)
        print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {png}")
    return text


def atomic_write(path: Path, write: Any) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then ``os.replace`` (never half a file)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> None:
    """``mmalign compare RUN_OR_REPORT ... [--metrics ...] [--output DIR]``: bare arguments are the runs."""
    import sys

    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
    bare, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-"):
            rest.append(arg)
            if "=" not in arg and arg not in ("-h", "--help"):
                rest.append(next(it, ""))
        else:
            bare.append(arg)
    if bare:
        rest += ["--runs", json.dumps(bare)]
    CLI(compare, args=rest, as_positional=False)


if __name__ == "__main__":
    main()
