"""``mmalign eval``: evaluate a recipe (optionally from a checkpoint) and write a per-language report.

    mmalign eval --config configs/uclip_pivot.yaml --config configs/offline/uclip_pivot.yaml --ckpt_path best --output eval/
    mmalign eval --benchmark xm3600 --root data/xm3600 --model exports/x --output eval/   # standard benchmarks

Any LightningCLI option of the recipe (``--data.init_args.test=...``) may follow. Everything is written under
``--output`` (no ``lightning_logs`` or other file in the working directory). The report has, for every retrieval pair
of the recipe, both directions per language (R@1/5/10, MRR, median rank) with the mean over languages and the pooled
figure (one gallery holding every language, explained in the report), the ceiling of every multilingual student text
tower (the frozen encoder's own student(L) -> student(English) retrieval, no projector) beside the recipe, xsim error
rates per language (LASER/SONAR protocol, margin-based), a text(lang A) -> text(lang B) matrix, zero-shot
classification naming its tower pair and prompt templates, a gallery of top-5 retrievals for a few queries, and
plots (bar charts, a 2-D projection of the shared space).
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


def evaluation_results(
    module: Any, collected: dict[str, Any], xsim_margin: str | None = "ratio", templates: str | dict = "general",
    pivot: str = "en", examples: int = 4,
) -> dict[str, Any]:
    """Retrieval, xsim, cross-lingual, ceiling, zero-shot and example results from what an evaluation epoch collected.

    Args:
        module: The evaluated :class:`~mmalign.AlignmentModule`.
        collected: ``module.last_eval["collected"]`` (embeddings, meta and keys of the evaluation rows).
        xsim_margin: xsim margin (``"ratio"``, ``"distance"``) or ``None`` for plain cosine.
        templates: Zero-shot prompt set: a name of :data:`~mmalign.evaluation.zeroshot.TEMPLATE_SETS` or
            ``{lang: [templates]}``; ``"general"`` is the set for pictures, speech towers always use ``"name"``.
        pivot: The language of the ceilings' gallery (student(L) -> student(pivot)).
        examples: Queries per retrieval direction in the example gallery (0: none).
    """
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
    results["retrieval_mean"] = language_means(results["retrieval"])
    results["pooled"] = pooled_counts(module, collected)
    ceilings = ceiling_results(module, collected, results["retrieval"], pivot)
    if ceilings:
        results["ceilings"] = ceilings
    skipped = {name: _no_ceiling(tower) for name, tower in module.towers.items()
               if tower.trainable and name not in ceilings}
    if skipped:
        results["ceilings_skipped"] = skipped
    zeroshot = zero_shot_results(module, collected, templates)
    if zeroshot:
        results["zeroshot"] = zeroshot
    if examples:
        results["examples"] = retrieval_examples(module, collected, examples)
    return results


def language_means(retrieval: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``{direction: metrics}``: the unweighted mean over the languages of each metric (the pooled ``"all"`` row and
    ``medR`` left out: a mean of medians is no median)."""
    out: dict[str, dict[str, float]] = {}
    directions = dict.fromkeys(d for lang, per in retrieval.items() if lang != "all" for d in per)
    for direction in directions:
        per_lang = [per[direction] for lang, per in retrieval.items() if lang != "all" and direction in per]
        keys = [k for k in per_lang[0] if k not in ("medR", "num_queries") and all(k in m for m in per_lang)]
        out[direction] = {k: sum(float(m[k]) for m in per_lang) / len(per_lang) for k in keys}
        out[direction]["languages"] = len(per_lang)
    return out


def _pair_keys(module: Any, collected: dict[str, Any], a: str, b: str):
    """Rows holding both towers and the identity of each row's item per side, as the pooled evaluation counts them
    (:meth:`~mmalign.AlignmentModule.evaluate_collected`: text keys carry their language, one string may name two
    concepts in two languages; keys absent: every row is its own item)."""
    from mmalign.training.module import _rows_with

    embeds, meta, keys = _rows_with(collected, (a, b))
    sides = {}
    for name in (a, b):
        field = module.towers[name].field
        k = keys.get(field)
        if k is None:
            k = list(range(len(meta["lang"])))
        elif field == "text":
            k = [f"{lang}:{v}" for lang, v in zip(meta["lang"], k)]
        sides[name] = k
    return embeds, meta, sides


def pooled_counts(module: Any, collected: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{direction: {"queries", "gallery", "positives_per_query", "gallery_languages"}}`` of the pooled ``"all"`` row:
    one gallery holding every language's items, so a query whose concept appears in k languages of the gallery
    has k positives (teacher English -> student in 12 languages: a hit on any of 12 translations counts)."""
    out: dict[str, dict[str, float]] = {}
    for a, b in module.retrieval_pairs:
        if a not in collected["embeds"] or b not in collected["embeds"]:
            continue
        _, meta, sides = _pair_keys(module, collected, a, b)
        if len(set(meta["lang"])) < 2:
            continue
        first = {name: {} for name in (a, b)}
        for i, concept in enumerate(meta["concept"]):
            for name in (a, b):
                first[name].setdefault(sides[name][i], (concept, meta["lang"][i]))
        for q, g in ((a, b), (b, a)):
            per_concept: dict[Any, int] = {}
            for concept, _ in first[g].values():
                per_concept[concept] = per_concept.get(concept, 0) + 1
            positives = [per_concept.get(concept, 0) for concept, _ in first[q].values()]
            out[f"{q}->{g}"] = {
                "queries": len(positives), "gallery": len(first[g]),
                "positives_per_query": sum(positives) / max(1, len(positives)),
                "gallery_languages": len({lang for _, lang in first[g].values()}),
            }
    return out


def _no_ceiling(tower: Any) -> str:
    """Why a student tower has no ceiling row in the report."""
    if tower.encoder.modality != "text":
        article = "an" if tower.encoder.modality[0] in "aeiou" else "a"
        return (f"{article} {tower.encoder.modality} encoder ({_describe_encoder(tower.encoder)}): its frozen features have no text "
                "side, so no frozen-student figure bounds its cross-modal retrieval")
    return "its test rows do not span several languages including the pivot language"


def _describe_encoder(encoder: Any) -> str:
    name = next((getattr(encoder, a) for a in ("model_name_or_path", "model_name") if isinstance(getattr(encoder, a, None), str)), None)
    return type(encoder).__name__ + (f" ({name})" if name else "")


def ceiling_results(module: Any, collected: dict[str, Any], retrieval: dict[str, Any], pivot: str = "en") -> dict[str, Any]:
    """For each student text tower (it has a trainable projector and its inputs span several languages, the pivot
    included): the frozen encoder's own ``student(L) -> student(pivot)`` R@1 (no projector; the ceiling,
    :func:`~mmalign.evaluation.baselines.student_ceiling`) beside the same retrieval through the projector and,
    for each pair whose other tower reads one text per concept (the pivot/teacher), the recipe's per-language
    ``student(L) -> teacher`` R@1, each with its fraction of the ceiling."""
    from mmalign.evaluation.baselines import ceiling_rows, frozen_features, student_ceiling

    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    out: dict[str, Any] = {}
    for name, tower in module.towers.items():
        texts = keys.get(tower.field)
        if tower.encoder.modality != "text" or not tower.trainable or name not in embeds or not texts:
            continue
        rows = [i for i, t in enumerate(texts) if t is not None]
        langs = [meta["lang"][i] for i in rows]
        if pivot not in langs or len(set(langs)) < 2:
            continue
        concepts = [meta["concept"][i] for i in rows]
        row_texts = [texts[i] for i in rows]
        unique = list(dict.fromkeys(row_texts))
        was_training = tower.training
        tower.eval()
        feats = frozen_features(tower.encoder, unique, device=module.device, progress=True)
        tower.train(was_training)
        index = {t: j for j, t in enumerate(unique)}
        frozen = feats[torch.as_tensor([index[t] for t in row_texts])]
        ceiling = student_ceiling(frozen, langs, concepts, pivot=pivot, keys=row_texts)
        ceil_r1 = {lang: m["R@1"] for lang, m in ceiling.items()}
        projected = student_ceiling(embeds[name][torch.as_tensor(rows)], langs, concepts, pivot=pivot, keys=row_texts)
        entry: dict[str, Any] = {
            "encoder": _describe_encoder(tower.encoder), "pivot": pivot, "ceiling": ceiling,
            "against": {f"{name}(L)->{name}({pivot}) through the projector": ceiling_rows(
                {lang: m["R@1"] for lang, m in projected.items()}, ceil_r1)},
        }
        for a, b in module.retrieval_pairs:
            if name not in (a, b):
                continue
            other = b if a == name else a
            other_keys = keys.get(module.towers[other].field)
            if module.towers[other].encoder.modality != "text" or not other_keys:
                continue
            per_concept: dict[Any, set] = {}
            for concept, k in zip(meta["concept"], other_keys):
                if k is not None:
                    per_concept.setdefault(concept, set()).add(k)
            if any(len(v) > 1 for v in per_concept.values()):
                continue  # the other tower reads the query's own language: not a pivot pair
            direction = f"{name}->{other}"
            recipe = {lang: per[direction]["R@1"] for lang, per in retrieval.items() if lang != "all" and direction in per}
            entry["against"][f"{name}(L)->{other} (the recipe's pair)"] = ceiling_rows(recipe, ceil_r1)
        out[name] = entry
    return out


def retrieval_examples(module: Any, collected: dict[str, Any], num_queries: int = 4, k: int = 5) -> dict[str, list]:
    """``{direction: [example]}``: for each retrieval direction, one query from each of ``num_queries`` languages
    (spread over the languages present; the query picked by position, never by outcome) with its top-``k``
    gallery items in the query's language, as the per-language tables rank them
    (:func:`~mmalign.evaluation.retrieval.top_k_examples`)."""
    from mmalign.evaluation.retrieval import top_k_examples
    from mmalign.training.module import _rows_with

    out: dict[str, list] = {}
    for a, b in module.retrieval_pairs:
        if a not in collected["embeds"] or b not in collected["embeds"]:
            continue
        embeds, meta, sides = _pair_keys(module, collected, a, b)
        _, _, raw = _rows_with(collected, (a, b))
        shown = {name: raw.get(module.towers[name].field) or [str(i) for i in range(len(meta["lang"]))] for name in (a, b)}
        langs = list(dict.fromkeys(meta["lang"]))
        m = min(num_queries, len(langs))
        picked = [langs[round(j * (len(langs) - 1) / max(1, m - 1))] for j in range(m)]
        for q, g in ((a, b), (b, a)):
            examples = []
            for n, lang in enumerate(dict.fromkeys(picked)):
                idx = [i for i, l in enumerate(meta["lang"]) if l == lang]
                qi = list({sides[q][i]: i for i in reversed(idx)}.values())[::-1]  # first row of each item
                gi = list({sides[g][i]: i for i in reversed(idx)}.values())[::-1]
                pick = qi[(len(qi) * (2 * n + 1)) // (2 * max(1, len(picked)))]  # spread over the query list
                ex = top_k_examples(
                    embeds[q][torch.as_tensor([pick])], embeds[g][torch.as_tensor(gi)], [meta["concept"][pick]],
                    [meta["concept"][i] for i in gi], [shown[q][pick]], [shown[g][i] for i in gi], k=k)[0]
                ex.update(lang=lang, query_modality=module.towers[q].encoder.modality,
                          gallery_modality=module.towers[g].encoder.modality)
                examples.append(ex)
            out[f"{q}->{g}"] = examples
    return out


def resolve_templates(spec: str | dict, data_info: dict | None = None) -> tuple[str, dict[str, list[str]]]:
    """``(name, {lang: templates})`` of a zero-shot prompt set: a name of
    :data:`~mmalign.evaluation.zeroshot.TEMPLATE_SETS`, a JSON file ``{lang: [templates]}``, or ``"auto"``: the set
    the evaluation data's ``info.json`` names (``"prompt_templates": "emoji"``), else ``"general"``."""
    from mmalign.evaluation.zeroshot import TEMPLATE_SETS

    if isinstance(spec, dict):
        return "custom", spec
    if spec == "auto":
        spec = (data_info or {}).get("prompt_templates") or "general"
    if spec in TEMPLATE_SETS:
        return spec, TEMPLATE_SETS[spec]
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict) or not all(isinstance(v, list) for v in loaded.values()):
            raise ValueError(f"{path}: prompt templates must be a JSON object {{lang: [templates with {{}}]}}")
        return str(path), loaded
    raise ValueError(f"unknown prompt templates {spec!r}: use one of {', '.join(TEMPLATE_SETS)}, auto, or a .json file")


def zero_shot_results(module: Any, collected: dict[str, Any], templates: str | dict = "general") -> dict[str, Any]:
    """Babel-ImageNet-style zero-shot classification: the evaluation concepts are the classes, their names in
    each language (the text field) fill per-language prompt templates, image (or speech) embeddings are classified.

    One entry per (text tower, non-text tower) pair: ``{"text->image": {"text_tower", "classified_tower",
    "templates" (the set's name), "prompts" ({lang: templates used}), "classes", "queries", "accuracy"
    ({lang: {"top1", "top5"}})}}``. Pictures use ``templates`` (general by default); speech uses the bare names.
    """
    from mmalign.evaluation.zeroshot import TEMPLATE_SETS, zero_shot_accuracy, zero_shot_classifier

    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    text = next((n for n, t in module.towers.items() if t.encoder.modality == "text" and t.field == "text"), None)
    if text is None or "text" not in keys:
        return {}
    set_name, prompt_set = resolve_templates(templates)
    concepts = sorted(set(meta["concept"]))
    index = {c: i for i, c in enumerate(concepts)}
    names: dict[str, dict[str, str]] = {}
    for concept, lang, name in zip(meta["concept"], meta["lang"], keys["text"]):
        if name is not None:
            names.setdefault(lang, {}).setdefault(concept, name)
    tower = module.towers[text]

    def encode(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return tower.project(tower.encoder(tower.encoder.preprocess(prompts)).to(module.device)).float().cpu()

    out: dict[str, Any] = {}
    for other, other_tower in module.towers.items():
        if other_tower.encoder.modality == "text" or other not in embeds:
            continue
        used_name, used = (set_name, prompt_set) if other_tower.encoder.modality == "image" else ("name", TEMPLATE_SETS["name"])
        classnames = {lang: [d[c] for c in concepts] for lang, d in names.items() if len(d) == len(concepts) and lang in used}
        if not classnames:
            continue
        weights = zero_shot_classifier(encode, classnames, used)
        # one query per distinct input of the non-text tower (an image is shared by all languages of a concept)
        other_keys = keys.get(other_tower.field) or list(range(len(meta["concept"])))
        first = {}
        for i, k in enumerate(other_keys):
            if k is not None:  # None: the row lacks that field (partial-modality rows)
                first.setdefault(k, i)
        rows = torch.as_tensor(sorted(first.values()))
        labels = torch.as_tensor([index[meta["concept"][i]] for i in rows.tolist()])
        out[f"{text}->{other}"] = {
            "text_tower": text, "classified_tower": other, "modality": other_tower.encoder.modality,
            "templates": used_name, "prompts": {lang: list(used[lang]) for lang in classnames},
            "classes": len(concepts), "queries": len(rows),
            "accuracy": zero_shot_accuracy(embeds[other][rows], labels, weights),
        }
    return out


def projection_inputs(module: Any, collected: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Each tower's distinct test items (first row of each input) and their language for the projection plot; an
    input shared by several languages (an image of a concept, the teacher's English name repeated on every
    language's row) is one point labelled ``"shared"``, not one point per language drawn on top of each other."""
    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    present = collected.get("present") or {}
    out_e, out_l = {}, {}
    for name, x in embeds.items():
        field_keys = keys.get(module.towers[name].field) if name in module.towers else None
        mask = present.get(name)
        first: dict[Any, int] = {}
        langs: dict[Any, set] = {}
        for i in range(len(x)):
            if mask is not None and not bool(mask[i]):
                continue  # the row lacks this tower's field (partial-modality rows)
            k = field_keys[i] if field_keys else i
            if k is None:
                continue
            first.setdefault(k, i)
            langs.setdefault(k, set()).add(meta["lang"][i])
        rows = list(first.values())
        out_e[name] = x[torch.as_tensor(rows, dtype=torch.long)]
        out_l[name] = [next(iter(langs[k])) if len(langs[k]) == 1 else "shared" for k in first]
    return out_e, out_l


def _data_info(cli: Any, split: str) -> dict | None:
    """The ``info.json`` beside the evaluated manifest, if any (it may name the dataset's prompt templates)."""
    splits = cli.datamodule.split_manifests() if hasattr(cli.datamodule, "split_manifests") else {}
    manifest = splits.get(split, (None,))[0]
    if isinstance(manifest, (list, tuple)):
        manifest = manifest[0] if manifest else None
    if not isinstance(manifest, (str, Path)):
        return None
    info = Path(manifest).parent / "info.json"
    try:
        return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else None
    except (OSError, ValueError):
        return None


def evaluate(argv: list[str]) -> dict[str, Any]:
    """Entry point of ``mmalign eval`` (see the module docstring); ``--benchmark`` scores an export on a standard
    benchmark instead (:mod:`mmalign.evaluation.benchmarks`)."""
    if any(a == "--benchmark" or a.startswith("--benchmark=") for a in argv):
        from mmalign.evaluation.benchmarks import benchmark_command

        return benchmark_command(argv)
    parser = argparse.ArgumentParser(prog="mmalign eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="eval", help="report folder")
    parser.add_argument("--ckpt_path", default=None, help="Lightning checkpoint with the trained projectors: a .ckpt, "
                        "a run folder, or best / last (the newest of the recipe's runs under its default_root_dir)")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--xsim_margin", choices=["ratio", "distance", "none"], default="ratio")
    parser.add_argument("--templates", default="auto",
                        help="zero-shot prompts for pictures: general (photo/picture/image/name), emoji, a JSON file "
                             "{lang: [templates]}, or auto (default): what the test data's info.json names as "
                             "\"prompt_templates\", else general. Speech is classified against the bare names.")
    parser.add_argument("--pivot", default="en", help="gallery language of the ceilings: student(L) -> student(pivot)")
    parser.add_argument("--examples", type=int, default=4, help="queries per direction in the retrieval examples (0: none)")
    ours, rest = parser.parse_known_args(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        parser.error("--config recipe.yaml is required")
    if ours.templates != "auto":
        resolve_templates(ours.templates)  # a misspelt set fails before the evaluation runs
    out = Path(ours.output).resolve()
    from mmalign.training.callbacks import resolve_ckpt_path  # best | last | a run folder, from the recipe's runs

    root = [b for a, b in zip(rest, rest[1:]) if a == "--trainer.default_root_dir"]
    root += [a.split("=", 1)[1] for a in rest if a.startswith("--trainer.default_root_dir=")]
    ours.ckpt_path = resolve_ckpt_path(None, ours.ckpt_path, "test", root_dir=root[-1] if root else None)
    # An evaluation logs nothing and writes only under --output: no ./lightning_logs, no checkpoints elsewhere.
    rest = [*rest, "--trainer.logger=false", f"--trainer.default_root_dir={out}"]

    from mmalign.evaluation import write_report
    from mmalign.recipe import load_recipe

    cli = load_recipe(rest)
    run = cli.trainer.test if ours.split == "test" else cli.trainer.validate
    run(cli.model, cli.datamodule, ckpt_path=ours.ckpt_path, verbose=False)
    collected = cli.model.last_eval["collected"]
    templates = ours.templates
    if templates == "auto":
        templates = (_data_info(cli, ours.split) or {}).get("prompt_templates") or "general"
    results = evaluation_results(cli.model, collected, None if ours.xsim_margin == "none" else ours.xsim_margin,
                                 templates=templates, pivot=ours.pivot, examples=ours.examples)
    results["provenance"] = {"config": [a for a in rest], "ckpt_path": ours.ckpt_path, "split": ours.split}
    embeds, langs = projection_inputs(cli.model, collected)
    paths = write_report(results, out, embeddings=embeds, langs=langs)
    print(Path(paths["report"]).read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return results
