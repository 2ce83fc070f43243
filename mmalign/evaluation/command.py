"""``mmalign eval``: evaluate a recipe (optionally from a checkpoint) and write a per-language report.

    mmalign eval --config configs/uclip_pivot.yaml --config configs/offline/uclip_pivot.yaml --ckpt_path runs/x/last.ckpt --output eval/
    mmalign eval --benchmark xm3600 --root data/xm3600 --model exports/x --output eval/   # standard benchmarks

Any LightningCLI option of the recipe (``--data.init_args.test=...``) may follow. The report has, for every
retrieval pair of the recipe, both directions per language (R@1/5/10, MRR, median rank), xsim error rates per
language (LASER/SONAR protocol, margin-based), a text(lang A) -> text(lang B) matrix for every text tower
whose rows span several languages, and plots (bar charts, heatmaps, a 2-D projection of the shared space).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def _aligned_per_language(a: torch.Tensor, b: torch.Tensor, meta: dict, keys_a: list | None, keys_b: list | None):
    """Yield ``(lang, a_rows, b_rows)`` with one row per (concept, key) pair for xsim (which needs 1:1 pairs)."""
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(meta["lang"]):
        by_lang.setdefault(lang, []).append(i)
    for lang, idx in by_lang.items():
        seen_a, seen_b, rows = set(), set(), []
        for i in idx:
            ka = keys_a[i] if keys_a else i
            kb = keys_b[i] if keys_b else i
            if ka in seen_a or kb in seen_b:
                continue  # xsim needs a bijection: keep the first pair of each item
            seen_a.add(ka)
            seen_b.add(kb)
            rows.append(i)
        if len(rows) > 1:
            t = torch.as_tensor(rows)
            yield lang, a[t], b[t]


def evaluation_results(module: Any, collected: dict[str, Any], xsim_margin: str | None = "ratio") -> dict[str, Any]:
    """Retrieval, xsim and cross-lingual results from the embeddings an evaluation epoch collected."""
    from mmalign.evaluation import cross_lingual_retrieval, xsim_error_rate

    from mmalign.training.module import _rows_with

    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    results: dict[str, Any] = {"retrieval": {}, "xsim": {}, "cross_lingual": {}, "pairs": {}}
    for pair, per_lang in module.evaluate_collected(collected).items():
        for lang, directions in per_lang.items():
            results["retrieval"].setdefault(lang, {}).update(directions)
        results["pairs"][pair] = getattr(module, "pair_kinds", {}).get(pair, "trained")  # trained | emergent
        a, b = pair.split("|")
        embeds, meta, keys = _rows_with(collected, (a, b))  # the rows holding both towers
        ka, kb = keys.get(module.towers[a].field), keys.get(module.towers[b].field)
        for lang, xa, xb in _aligned_per_language(embeds[a], embeds[b], meta, ka, kb):
            results["xsim"][f"{lang}: {a}->{b}"] = xsim_error_rate(xa, xb, margin=xsim_margin)
    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    if len(set(meta["lang"])) > 1:
        for name, tower in module.towers.items():
            field_keys = keys.get(tower.field)
            # only towers whose inputs differ across languages (not an English anchor repeated per row)
            if tower.encoder.modality == "text" and field_keys and len(set(field_keys)) > len(set(meta["concept"])):
                results["cross_lingual"] = cross_lingual_retrieval(embeds[name], meta["lang"], meta["concept"],
                                                                   keys=field_keys, missing="drop")
                results["cross_lingual"]["tower"] = name
                break
    if not results["cross_lingual"]:
        del results["cross_lingual"]
    zeroshot = zero_shot_results(module, collected)
    if zeroshot:
        results["zeroshot"] = zeroshot
    return results


def zero_shot_results(module: Any, collected: dict[str, Any]) -> dict[str, Any]:
    """Babel-ImageNet-style zero-shot classification: the evaluation concepts are the classes, their names in
    each language (the text field) fill per-language prompt templates, image (or speech) embeddings are classified.
    """
    from mmalign.evaluation import DEFAULT_TEMPLATES, zero_shot_accuracy, zero_shot_classifier

    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    text = next((n for n, t in module.towers.items() if t.encoder.modality == "text" and t.field == "text"), None)
    other = next((n for n, t in module.towers.items() if t.encoder.modality != "text"), None)
    if text is None or other is None or other not in embeds:
        return {}
    concepts = sorted(set(meta["concept"]))
    index = {c: i for i, c in enumerate(concepts)}
    names: dict[str, dict[str, str]] = {}
    for concept, lang, name in zip(meta["concept"], meta["lang"], keys["text"]):
        names.setdefault(lang, {}).setdefault(concept, name)
    classnames = {lang: [d[c] for c in concepts] for lang, d in names.items() if len(d) == len(concepts) and lang in DEFAULT_TEMPLATES}
    if not classnames:
        return {}
    tower = module.towers[text]

    def encode(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return tower.project(tower.encoder(tower.encoder.preprocess(prompts)).to(module.device)).float().cpu()

    weights = zero_shot_classifier(encode, classnames, DEFAULT_TEMPLATES)
    # one query per distinct input of the non-text tower (an image is shared by all languages of a concept)
    other_keys = keys.get(module.towers[other].field) or list(range(len(meta["concept"])))
    first = {}
    for i, k in enumerate(other_keys):
        if k is not None:  # None: the row lacks that field (partial-modality rows)
            first.setdefault(k, i)
    rows = torch.as_tensor(sorted(first.values()))
    labels = torch.as_tensor([index[meta["concept"][i]] for i in rows.tolist()])
    return zero_shot_accuracy(embeds[other][rows], labels, weights)


def evaluate(argv: list[str]) -> dict[str, Any]:
    """Entry point of ``mmalign eval`` (see the module docstring); ``--benchmark`` scores an export on a standard
    benchmark instead (:mod:`mmalign.evaluation.benchmarks`)."""
    if any(a == "--benchmark" or a.startswith("--benchmark=") for a in argv):
        from mmalign.evaluation.benchmarks import benchmark_command

        return benchmark_command(argv)
    parser = argparse.ArgumentParser(prog="mmalign eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="eval", help="report folder")
    parser.add_argument("--ckpt_path", default=None, help="Lightning checkpoint with the trained projectors")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--xsim_margin", choices=["ratio", "distance", "none"], default="ratio")
    ours, rest = parser.parse_known_args(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        parser.error("--config recipe.yaml is required")

    from mmalign.evaluation import write_report
    from mmalign.recipe import load_recipe

    cli = load_recipe(rest)
    run = cli.trainer.test if ours.split == "test" else cli.trainer.validate
    run(cli.model, cli.datamodule, ckpt_path=ours.ckpt_path, verbose=False)
    collected = cli.model.last_eval["collected"]
    results = evaluation_results(cli.model, collected, None if ours.xsim_margin == "none" else ours.xsim_margin)
    results["provenance"] = {"config": [a for a in rest], "ckpt_path": ours.ckpt_path, "split": ours.split}
    paths = write_report(results, ours.output, embeddings=collected["embeds"],
                         langs={k: collected["meta"]["lang"] for k in collected["embeds"]})
    print(Path(paths["report"]).read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return results
