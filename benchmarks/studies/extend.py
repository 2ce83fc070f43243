"""Extend the quickstart's space with multilingual-e5-small for languages its USE-m text tower does not cover.

    python -m benchmarks.studies.extend                      # needs runs/quickstart/export (`mmalign quickstart`)
    python -m benchmarks.studies.extend --epochs 40 --output runs/extend_study

1. Builds ``data/extend_emoji``: parallel text of TRAINING concepts only (emoji names of data/emoji's train concepts
   and CLDR territory names from babel, English beside en/fa/id) and a test split of the quickstart's held-out
   concepts (80 concepts never seen by any projector: images, espeak speech in en/de/es/fr, names in 14 languages).
2. Runs ``mmalign extend --recipe offline/extend`` twice (the same recipe, two training sets): distillation on
   English only (the new tower reaches fa/id through mE5's own multilinguality) and on English + fa/id parallel text.
3. Scores retrieval on the held-out concepts in every language THROUGH THE EXTENDED EXPORT (the new text tower
   against the old image and speech towers), beside chance, the old USE-m text tower on the same names, and a
   closed-form least-squares map (ridge, λ picked on val) from mE5 features to the old text tower's space fit on the
   same training rows. Writes ``<output>/extend_results.json`` and prints the Markdown tables of docs/extend.md.

Encoder features come from the runs' feature caches (each item encoded once); a check embeds a few test items end to
end with ``AlignedModel.embed_text``/``embed_image`` from the extended export and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Languages of the new tower's parallel training text (fa and id: emoji languages USE-m does not cover).
NEW_LANGUAGES = ("fa", "id")
PARALLEL = ("en", *NEW_LANGUAGES)
SPEECH_LANGUAGES = ("en", "de", "es", "fr")
RIDGE = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def build_data(root: Path, emoji: Path = Path("data/emoji"), trimodal: Path = Path("data/emoji_trimodal")) -> dict[str, Any]:
    """Write ``train.jsonl`` (en + fa + id), ``train_en.jsonl``, ``val.jsonl``, ``val_en.jsonl`` and ``test.jsonl``."""
    from babel import Locale

    names: dict[str, dict[str, str]] = {}
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for r in _read(emoji / f"{split}.jsonl"):
            names.setdefault(r["concept"], {})[r["lang"]] = r["text"]
            split_of[r["concept"]] = split
    languages = sorted({lang for n in names.values() for lang in n})
    held_rows = _read(trimodal / "test.jsonl")
    held = sorted({r["concept"] for r in held_rows})
    seen_by_space = {r["concept"] for s in ("train", "val") for r in _read(trimodal / f"{s}.jsonl")}
    train_c = sorted(c for c, s in split_of.items() if s == "train")
    val_c = sorted(c for c, s in split_of.items() if s == "val")
    assert not set(held) & (set(train_c) | set(val_c) | seen_by_space), "held-out concepts must be unseen"

    def text_rows(concepts: list[str], langs: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"id": f"{c}-{lang}", "concept": c, "lang": lang, "text": names[c][lang], "text_en": names[c]["en"]}
                for c in concepts for lang in langs if names[c].get(lang) and names[c].get("en")]

    en = Locale("en")
    cldr = []
    for code, en_name in sorted(en.territories.items()):
        if not code.isalpha():  # "001" (World) and other numeric regions are not names of places people search for
            continue
        for lang in PARALLEL:
            name = Locale.parse(lang).territories.get(code)
            if name:
                cldr.append({"id": f"cldr-{code}-{lang}", "concept": f"cldr:{code}", "lang": lang, "text": name, "text_en": en_name})
    image_of = {r["concept"]: r["image"] for r in held_rows}
    audio_of = {(r["concept"], r["lang"]): r["audio"] for r in held_rows if r.get("audio")}
    rel = lambda p: os.path.relpath(trimodal / p, root)  # noqa: E731 - manifests resolve paths against their folder
    test = []
    for c in held:
        for lang in languages:
            row = {"id": f"{c}-{lang}", "concept": c, "lang": lang, "text": names[c][lang], "text_en": names[c]["en"],
                   "image": rel(image_of[c])}
            if (c, lang) in audio_of:
                row["audio"] = rel(audio_of[(c, lang)])
            test.append(row)
    files = {
        "train": text_rows(train_c, PARALLEL) + cldr, "train_en": text_rows(train_c, ("en",)) + [r for r in cldr if r["lang"] == "en"],
        "val": text_rows(val_c, PARALLEL), "val_en": text_rows(val_c, ("en",)), "test": test,
    }
    for name, rows in files.items():
        _write(root / f"{name}.jsonl", rows)
    info = {"languages": languages, "held_out_concepts": len(held), "train_concepts": len(train_c), "val_concepts": len(val_c),
            "cldr_rows": len(cldr), "rows": {k: len(v) for k, v in files.items()}}
    (root / "info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


# -- features from a run's cache -------------------------------------------------------------

def cached(split_dir: Path, field: str, key_prefix: str) -> np.ndarray:
    """``[N_rows, D]`` float32 pooled features of the entry ``<field>--<key_prefix>*`` (NaN rows: field absent)."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    [name] = [n for n in manifest["entries"] if n.startswith(f"{field}--{key_prefix}")]
    entry = manifest["entries"][name]
    pooled = np.concatenate([np.load(split_dir / name / f"shard-{i:05d}.pooled.npy") for i in range(len(entry["shards"]))])
    rows = np.load(split_dir / name / "rows.npy")
    out = np.full((len(rows), pooled.shape[1]), np.nan, dtype=np.float32)
    out[rows >= 0] = pooled[rows[rows >= 0]].astype(np.float32)
    return out


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form least squares with an intercept: ``W [D_in + 1, D_out]`` minimising ``|[x, 1] W - y|^2 + lam |W|^2``."""
    xb = np.concatenate([x, np.ones((len(x), 1), dtype=x.dtype)], 1).astype(np.float64)
    return np.linalg.solve(xb.T @ xb + lam * np.eye(xb.shape[1]), xb.T @ y.astype(np.float64)).astype(np.float32)


def apply(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1), dtype=x.dtype)], 1) @ w


def r_at_1(queries: np.ndarray, q_concepts: list[str], gallery: np.ndarray, g_concepts: list[str]) -> float:
    """Fraction of queries whose most similar gallery item (cosine) is of their concept."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    top = (q @ g.T).argmax(1)
    return float(np.mean([g_concepts[j] == c for j, c in zip(top, q_concepts)]))


def pick_lambda(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, concepts: list[str]) -> float:
    """The ridge strength with the best val R@1 (val text -> the old text tower's English embedding)."""
    scores = {lam: r_at_1(apply(ridge(x_tr, y_tr, lam), x_val), concepts, y_val, concepts) for lam in RIDGE}
    return max(scores, key=scores.get)


# -- the study -------------------------------------------------------------------------------

def run(base: Path, output: Path, data: Path, epochs: int | None, variants: tuple[str, ...] = ("en+fa+id", "en"),
        reuse: bool = False) -> dict[str, Any]:
    from encoders.base import EncoderOutput
    from mmalign.export import AlignedModel
    from mmalign.extend import extend

    info = build_data(data)
    print(f"[extend study] data: {json.dumps(info)}")
    timings, runs = {}, {}
    for variant, train, val, test in (("en+fa+id", "train", "val", "test"), ("en", "train_en", "val_en", None)):
        if variant not in variants:
            continue
        if reuse and (output / variant / "results.json").is_file():  # a finished run of this variant: score it again
            runs[variant] = json.loads((output / variant / "results.json").read_text())
            continue
        start = time.time()
        args = [] if test else ["--data.init_args.test=null"]
        runs[variant] = extend("offline/extend", base=str(base), output=str(output / variant), train=str(data / f"{train}.jsonl"),
                               val=str(data / f"{val}.jsonl"), test=str(data / f"{test}.jsonl") if test else None,
                               max_epochs=epochs, evaluate=test is not None, args=args)
        timings[variant] = round(time.time() - start)
    test_rows = _read(data / "test.jsonl")
    tdir = output / "en+fa+id" / "cache" / "test"
    feats = {  # per test row
        "e5": cached(tdir, "text", "MultilingualE5Small"), "image": cached(tdir, "image", "ExportEncoder"),
        "speech": cached(tdir, "audio", "ExportEncoder"),
    }
    concepts = [r["concept"] for r in test_rows]
    langs = sorted({r["lang"] for r in test_rows})
    by_lang = {lang: [i for i, r in enumerate(test_rows) if r["lang"] == lang] for lang in langs}
    first = {}
    for i, c in enumerate(concepts):
        first.setdefault(c, i)
    img_idx = list(first.values())  # one image per concept
    images, img_concepts = feats["image"][img_idx], [concepts[i] for i in img_idx]
    speech_idx = [i for i, r in enumerate(test_rows) if r.get("audio")]
    speech, speech_concepts = feats["speech"][speech_idx], [concepts[i] for i in speech_idx]
    # the old text tower (USE-m) on the same names: what the space answers without the extension
    old = AlignedModel.from_pretrained(base, device="cpu", towers=["text"])
    old_text = old.embed_text([r["text"] for r in test_rows], tower="text", progress=True).numpy()
    systems: dict[str, np.ndarray] = {"old text tower (USE-m)": old_text}
    lambdas = {}
    for variant in runs:
        cdir = output / variant / "cache"
        x_tr, y_tr = cached(cdir / "train", "text", "MultilingualE5Small"), cached(cdir / "train", "text_en", "ExportEncoder")
        x_val, y_val = cached(cdir / "val", "text", "MultilingualE5Small"), cached(cdir / "val", "text_en", "ExportEncoder")
        val_concepts = [r["concept"] for r in _read(data / ("val.jsonl" if variant != "en" else "val_en.jsonl"))]
        lam = lambdas[variant] = pick_lambda(x_tr, y_tr, x_val, y_val, val_concepts)
        systems[f"least squares ({variant})"] = apply(ridge(x_tr, y_tr, lam), feats["e5"])
        model = AlignedModel.from_pretrained(output / variant / "export", device="cpu", towers=["text_new"])
        systems[f"extend ({variant})"] = model.embed_features(EncoderOutput(pooled=torch.from_numpy(feats["e5"])), "text_new").numpy()
    results: dict[str, Any] = {"text->image": {}, "speech->text": {}}
    for name, emb in systems.items():
        for lang in langs:
            idx = by_lang[lang]
            results["text->image"].setdefault(name, {})[lang] = r_at_1(emb[idx], [concepts[i] for i in idx], images, img_concepts)
            gallery = emb[idx]  # one name per concept in this language
            results["speech->text"].setdefault(name, {})[lang] = r_at_1(speech, speech_concepts, gallery, [concepts[i] for i in idx])
    check = end_to_end_check(output / "en+fa+id" / "export", data, test_rows, systems["extend (en+fa+id)"], images, img_idx)
    command = "python -m benchmarks.studies.extend" + (f" --epochs {epochs}" if epochs else "")
    command += "" if variants == ("en+fa+id", "en") else f" --variants {','.join(variants)}"
    out = {"command": command, "data": info,
           "chance": 1 / len(img_idx), "queries_per_language": {"text->image": len(img_idx), "speech->text": len(speech_idx)},
           "ridge_lambda": lambdas, "seconds": timings, "results": results, "end_to_end_check": check,
           "new_languages": list(NEW_LANGUAGES)}
    (output / "extend_results.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(tables(out))
    return out


def end_to_end_check(export: Path, data: Path, rows: list[dict[str, Any]], text_emb: np.ndarray, images: np.ndarray,
                     img_idx: list[int]) -> dict[str, float]:
    """Embed a few test items straight through the extended export (raw text and image files) and compare with the
    cache-based embeddings used above: max abs difference (the cache stores fp16 encoder features)."""
    from mmalign.export import AlignedModel

    model = AlignedModel.from_pretrained(export, device="cpu", towers=["text_new", "image"])
    sample = [i for i, r in enumerate(rows) if r["lang"] in NEW_LANGUAGES][:6]
    text = model.embed_text([rows[i]["text"] for i in sample], tower="text_new").numpy()
    image_paths = [str((data / rows[i]["image"]).resolve()) for i in img_idx[:4]]
    image = model.embed_image(image_paths, tower="image").numpy()
    return {"text_new_max_abs_diff": float(np.abs(text - text_emb[sample]).max()),
            "image_max_abs_diff": float(np.abs(image - images[:4]).max())}


def tables(out: dict[str, Any]) -> str:
    """The Markdown tables of docs/extend.md."""
    chance = out["chance"]
    blocks = []
    for direction, what in (("text->image", "new-language text -> image (the old image tower; emergent for every text "
                                             "tower: no text tower was ever trained with images here)"),
                            ("speech->text", "speech (en/de/es/fr clips of the held-out concepts, old speech tower) -> "
                                             "text in the language of the column")):
        res = out["results"][direction]
        langs = list(next(iter(res.values())))
        order = [l for l in ("fa", "id") if l in langs] + [l for l in langs if l not in ("fa", "id")]
        lines = [f"**{direction}**: {what}; R@1 over {int(round(1 / chance))} held-out concepts, chance {chance:.3f}.", "",
                 "| system | " + " | ".join(f"**{l}**" if l in out["new_languages"] else l for l in order) + " | mean |",
                 "|---|" + "---|" * (len(order) + 1)]
        for name, per in res.items():
            vals = [per[l] for l in order]
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="runs/quickstart/export", help="the export to extend (mmalign quickstart)")
    parser.add_argument("--output", default="runs/extend_study")
    parser.add_argument("--data", default="data/extend_emoji")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--variants", default="en+fa+id,en", help="training sets: en+fa+id (parallel text), en (English only)")
    parser.add_argument("--reuse", action="store_true", help="score finished runs of a variant again instead of retraining")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not (Path(args.base) / "config.json").is_file():
        raise SystemExit(f"{args.base} is not an export: run `mmalign quickstart` first (it writes runs/quickstart/export)")
    run(Path(args.base), Path(args.output), Path(args.data), args.epochs, tuple(args.variants.split(",")), args.reuse)


if __name__ == "__main__":
    main()
