"""Does the SONAR student get better with more training vocabulary? (issue 9) On the product's feature cache.

The offline SONAR recipe (``configs/offline/sonar_speech.yaml``) learns sound -> meaning from ~1k spoken
emoji names per language and is scored on emoji names it never heard (60-concept galleries, 20 seeded draws,
en/de/es; the same draws as ``benchmarks/studies/offline_results.py``). Two ways to add vocabulary, each trained with
``mmalign``'s own path (``mmalign cache`` features, Lightning ``fit``), ``--seeds`` seeds per row:

* **more emoji names**: the recipe on 25 / 50 / 100% of the training concepts (a concept subset of the
  cached train split; all languages of a concept together). This is the curve the recipe sits on.
* **everyday words**: the emoji names plus ``--words`` frequent words per language from
  ``mmalign data words`` (wordfreq lists, spoken by espeak-ng; words equal to a val/test name excluded),
  appended as a second train manifest: ``train: [data/emoji/train.jsonl, data/words/train.jsonl]``.

Val rows score model selection; test rows are reported. The words cache starts as hard links to the recipe's
cache, so only the words' clips are encoded (Whisper base, 30 s window: ~2.2 clips/s on 2 cores).

Usage (repo root): ``HF_HUB_OFFLINE=1 python -m benchmarks.studies.sonar_vocabulary --json benchmarks/results/sonar_vocabulary.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from benchmarks.studies import offline_results as bench  # noqa: E402

LANGS = ["en", "de", "es"]


def score(cfg: dict[str, Any], seed: int, subsets: dict[str, list[set[str]]], keep_fraction: float = 1.0) -> dict[str, dict[str, float]]:
    """Train the recipe ``cfg`` (cached features) with ``seed``; 60-way R@1 per language on val and test."""
    model, dm = bench.build_recipe(cfg, seed=seed)
    dm.connect(model)
    dm.setup("fit")
    if keep_fraction < 1.0:
        ds = dm.datasets["train"]
        concepts = sorted({r["concept"] for r in ds.rows})
        random.Random(1).shuffle(concepts)
        keep = set(concepts[: round(keep_fraction * len(concepts))])
        dm.datasets["train"] = Subset(ds, [i for i, r in enumerate(ds.rows) if r["concept"] in keep])
    bench.fit_cached(model, dm, cfg["trainer"]["max_epochs"], seed=seed)
    out: dict[str, Any] = {"train_clips": len(dm.datasets["train"])}
    for split in ("val", "test"):
        rows, e = bench.cached_outputs(model, dm, split)
        out[split] = bench.subset_r1(rows, e["speech"], e["text"], LANGS, subsets[split])
    return out


def mean_rows(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {s: {lang: sum(r[s][lang] for r in runs) / len(runs) for lang in LANGS} for s in runs[0]}


def plot(files: list[Path], path: Path) -> None:
    """Test mean R@1 (60-way, en/de/es) against training clips: the emoji-names curve and the words points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    emoji: dict[int, float] = {}
    for f in files:
        saved = json.loads(Path(f).read_text())
        clips = saved["meta"]["train_clips"]
        for label, r in saved["results"].items():
            mean = 100 * sum(r["test"].values()) / len(r["test"])
            if label.startswith("emoji names +"):
                ax.scatter([clips[label]], [mean], color="C1", zorder=3)
                ax.annotate(f"+{saved['meta']['words_per_language']} words/lang", (clips[label], mean),
                            textcoords="offset points", xytext=(-30, -14), fontsize=8)
            else:
                emoji[clips[label]] = mean
    xs = sorted(emoji)
    ax.plot(xs, [emoji[x] for x in xs], "o-", color="C0", label="more emoji names (25/50/100% of train)")
    ax.scatter([], [], color="C1", label="emoji names + frequent words")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training clips (en + de + es)")
    ax.set_ylabel("test R@1, 60-way, mean en/de/es (%)")
    ax.set_title("SONAR student: held-out R@1 vs training vocabulary")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--words-root", default="data/words")
    ap.add_argument("--words", type=int, default=400, help="frequent words per language added to the emoji names")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(bench.DEFAULT_CACHE))
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of R@1 against training clips (from --json and --plot-with)")
    ap.add_argument("--plot-with", nargs="*", default=[], help="earlier --json files drawn on the same plot")
    ap.add_argument("--plot-only", action="store_true", help="only redraw --plot from --plot-with")
    args = ap.parse_args()
    if args.plot_only:
        plot([Path(f) for f in args.plot_with], Path(args.plot))
        return
    torch.set_num_threads(args.threads)
    data = Path(args.data).resolve()
    start = time.time()

    from mmalign.datasets.words import build_words_dataset

    words = build_words_dataset(args.words_root, languages=LANGS, words_per_language=args.words,
                                exclude=[data / "val.jsonl", data / "test.jsonl"], progress=True, overwrite=True)
    base = bench.load_config("sonar_speech")
    d = base["data"]["init_args"]
    for split in ("train", "val", "test"):
        d[split] = str(data / f"{split}.jsonl")
    m, dm = bench.build_recipe(base)
    cache_dir = Path(args.cache) / f"sonar_speech-{m.towers['speech'].encoder.cache_key}"
    encode_s = bench.product_cache(m, dm, cache_dir)
    with_words = copy.deepcopy(base)
    with_words["data"]["init_args"]["train"] = [d["train"], str(words.manifest.resolve())]
    words_cache = cache_dir.with_name(cache_dir.name + "-words")
    if not words_cache.exists():
        shutil.copytree(cache_dir, words_cache, copy_function=os.link)  # only the words' clips get encoded
    m, dm = bench.build_recipe(with_words)
    encode_s += bench.product_cache(m, dm, words_cache)
    d["cache_dir"] = str(cache_dir)
    with_words["data"]["init_args"]["cache_dir"] = str(words_cache)

    subsets = {}
    for split in ("val", "test"):
        concepts = sorted({r["concept"] for r in bench.load_rows(data, split)})
        rng = random.Random(0)
        subsets[split] = [set(rng.sample(concepts, 60)) for _ in range(20)]
    plan = [(f"emoji names, {int(100 * f)}% of the training concepts", base, f) for f in (0.25, 0.5)]
    plan += [("emoji names (the recipe)", base, 1.0),
             (f"emoji names + {args.words} frequent words per language", with_words, 1.0)]
    results, clips = {}, {}
    for label, cfg, fraction in plan:
        t0 = time.time()
        runs = []
        for seed in range(args.seeds):
            runs.append(score(cfg, seed, subsets, fraction))
            clips[label] = runs[-1].pop("train_clips")
        results[label] = mean_rows(runs)
        t = results[label]["test"]
        print(f"{label} ({time.time() - t0:.0f}s): val mean {100 * sum(results[label]['val'].values()) / 3:.1f} | test "
              + " ".join(f"{k} {100 * v:.1f}" for k, v in t.items()) + f" mean {100 * sum(t.values()) / 3:.1f}", flush=True)

    print("\n| training vocabulary | val mean | test en | test de | test es | test mean |\n|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {100 * sum(r['val'].values()) / 3:.1f} | "
              + " | ".join(f"{100 * r['test'][lang]:.1f}" for lang in LANGS) + f" | {100 * sum(r['test'].values()) / 3:.1f} |")
    meta = {"command": "python -m benchmarks.studies.sonar_vocabulary " + " ".join(sys.argv[1:]), "seeds": args.seeds,
            "words_per_language": args.words, "words_skipped": words.skipped, "train_clips": clips, "encode_seconds": round(encode_s, 1),
            "wall_seconds": round(time.time() - start, 1), "torch": torch.__version__}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        if args.plot:
            plot([*map(Path, args.plot_with), Path(args.json)], Path(args.plot))


if __name__ == "__main__":
    main()
