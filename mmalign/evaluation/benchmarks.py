"""Standard multilingual benchmarks read from local copies (no download), and their retrieval protocol.

Each loader returns a :class:`RetrievalSet`: a gallery of media (image or audio paths) and, per language,
captions pointing at their medium. Layouts (the files as their releases ship them, under ``root``):

========== ===================================================================================================
xm3600     ``captions.jsonl`` (``{"image/key": k, "<lang>": {"caption": [...]}, ...}``) + ``images/<k>.jpg``
xtd10      ``test_image_names.txt`` + ``test_1kcaptions_<lang>.txt`` (line i describes image i) + ``images/``
multi30k   ``data/task1/image_splits/test_<year>_flickr.txt`` + ``data/task1/raw/test_<year>_flickr.<lang>``
           (year 2016, 2017, 2018; ``.gz`` too) + ``images/`` (flickr30k-images)
flickr30k  Karpathy's ``dataset_flickr30k.json`` (split ``test``) + ``images/<filename>``
coco       Karpathy's ``dataset_coco.json`` (split ``test``) + ``<filepath>/<filename>`` (``val2014/...``)
fleurs     HF ``google/fleurs`` raw layout: ``data/<lang>_<region>/<split>.tsv`` + ``.../audio/<split>/<file>.wav``
commonvoice ``<split>.tsv`` + ``clips/`` (one locale folder)
babel_imagenet ``babel_imagenet.json`` (``{lang: [[class indices], [class names]]}``) + ImageNet ``val/<wnid>/``
           (wnids sorted = class index 0..999); a zero-shot classification benchmark (``mmalign classify``)
========== ===================================================================================================

Protocol (as CLIP_benchmark's ``zeroshot_retrieval`` and open_clip's multilingual tables): per language, every
caption is a query for text->image and is correct when its own image is in the top k; every image is a query
for image->text and is correct when *any* of its captions (in that language) is in the top k; cosine
similarity; R@1/5/10. ``captions="first"`` keeps only the first caption per image and language (XM3600 numbers
reported with one caption per image). Speech benchmarks (FLEURS, Common Voice) use the same protocol with
audio in place of images.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

BENCHMARKS = ("xm3600", "xtd10", "multi30k", "flickr30k", "coco", "fleurs", "commonvoice")


@dataclass
class RetrievalSet:
    """A retrieval benchmark: ``media`` paths and ``captions[lang] = [(media index, text)]``."""

    name: str
    modality: str  # "image" | "speech"
    media: list[str]
    captions: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def first_only(self) -> "RetrievalSet":
        out: dict[str, list[tuple[int, str]]] = {}
        for lang, caps in self.captions.items():
            seen: set[int] = set()
            out[lang] = [(i, t) for i, t in caps if not (i in seen or seen.add(i))]
        return RetrievalSet(self.name, self.modality, self.media, out)


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_xm3600(root: str | Path, languages: Sequence[str] | None = None) -> RetrievalSet:
    root = Path(root)
    media, caps = [], {}
    for line in _read_lines(_need(root / "captions.jsonl", "XM3600 captions.jsonl")):
        if not line.strip():
            continue
        row = json.loads(line)
        key = row["image/key"]
        idx = len(media)
        media.append(str(_need(root / "images" / f"{key}.jpg", "XM3600 image")))
        for lang, value in row.items():
            if lang == "image/key" or (languages and lang not in languages):
                continue
            for text in value.get("caption", []):
                caps.setdefault(lang, []).append((idx, text))
    return RetrievalSet("xm3600", "image", media, caps)


def load_xtd10(root: str | Path, languages: Sequence[str] | None = None) -> RetrievalSet:
    root = Path(root)
    names = [n for n in _read_lines(_need(root / "test_image_names.txt", "XTD10 test_image_names.txt")) if n.strip()]
    media = [str(_need(root / "images" / n, "XTD10 image")) for n in names]
    caps = {}
    for f in sorted(root.glob("test_1kcaptions_*.txt")):
        lang = f.stem.split("_")[-1]
        if languages and lang not in languages:
            continue
        lines = [t for t in _read_lines(f)][: len(names)]
        caps[lang] = [(i, t) for i, t in enumerate(lines) if t.strip()]
    return RetrievalSet("xtd10", "image", media, caps)


def load_multi30k(root: str | Path, year: int = 2016, languages: Sequence[str] | None = None) -> RetrievalSet:
    root = Path(root)
    task = root / "data" / "task1" if (root / "data" / "task1").is_dir() else root
    split = f"test_{year}_flickr"
    names_file = next((p for p in (task / "image_splits" / f"{split}.txt", task / "image_splits" / f"{split}.txt.gz") if p.exists()), None)
    names = [n for n in _read_lines(_need(names_file or task / "image_splits" / f"{split}.txt", "Multi30K image split"))
             if n.strip()]
    media = [str(_need(root / "images" / n, "Multi30K image (flickr30k-images)")) for n in names]
    caps = {}
    for f in sorted((task / "raw").glob(f"{split}.*")):
        lang = f.name[len(split) + 1:].removesuffix(".gz")
        if len(lang) != 2 or (languages and lang not in languages):
            continue
        caps[lang] = [(i, t) for i, t in enumerate(_read_lines(f)[: len(names)]) if t.strip()]
    return RetrievalSet(f"multi30k-{year}", "image", media, caps)


def load_karpathy(root: str | Path, dataset: str = "flickr30k", split: str = "test") -> RetrievalSet:
    root = Path(root)
    data = json.loads(_need(root / f"dataset_{dataset}.json", f"Karpathy dataset_{dataset}.json").read_text())
    media, caps = [], []
    for img in data["images"]:
        if img.get("split") != split:
            continue
        folder = root / img["filepath"] if img.get("filepath") else root / "images"
        idx = len(media)
        media.append(str(_need(folder / img["filename"], f"{dataset} image")))
        caps += [(idx, s["raw"]) for s in img["sentences"]]
    return RetrievalSet(dataset, "image", media, {"en": caps})


def load_fleurs(root: str | Path, split: str = "test", languages: Sequence[str] | None = None) -> RetrievalSet:
    """FLEURS: one audio gallery over all languages; ``captions[lang]`` are each clip's transcription."""
    root = Path(root)
    data = root / "data" if (root / "data").is_dir() else root
    media, caps = [], {}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        lang = folder.name.split("_")[0]
        if languages and lang not in languages and folder.name not in languages:
            continue
        tsv = folder / f"{split}.tsv"
        if not tsv.is_file():
            continue
        for row in csv.reader(_read_lines(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 4:
                continue
            idx = len(media)
            media.append(str(_need(folder / "audio" / split / row[1], "FLEURS audio")))
            caps.setdefault(lang, []).append((idx, row[2]))  # the raw transcription
    return RetrievalSet("fleurs", "speech", media, caps)


def load_commonvoice(root: str | Path, split: str = "test") -> RetrievalSet:
    from mmalign.data.sources import open_source

    rows = open_source({"path": str(root), "format": "commonvoice", "split": split}, required_fields=["audio", "text"])
    media, caps = [], {}
    for r in rows:
        caps.setdefault(r["lang"], []).append((len(media), r["text"]))
        media.append(r["audio"])
    return RetrievalSet("commonvoice", "speech", media, caps)


def load_babel_imagenet(root: str | Path, lang: str, max_per_class: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """``(image paths, labels, class names in lang)``: Babel-ImageNet's classes of ``lang`` on ImageNet val.

    Labels index the returned class names (Babel-ImageNet covers a subset of the 1000 classes per language).
    """
    root = Path(root)
    table = json.loads(_need(root / "babel_imagenet.json", "Babel-ImageNet babel_imagenet.json").read_text())
    if lang not in table:
        raise ValueError(f"Babel-ImageNet has no language {lang!r}; it has {len(table)}, e.g. {sorted(table)[:10]}")
    indices, names = table[lang]
    wnids = sorted(p.name for p in _need(root / "val", "ImageNet val folder").iterdir() if p.is_dir())
    images, labels = [], []
    for label, cls in enumerate(indices):
        files = sorted((root / "val" / wnids[cls]).iterdir())[: max_per_class]
        images += [str(f) for f in files]
        labels += [label] * len(files)
    return images, labels, list(names)


LOADERS: dict[str, Callable[..., RetrievalSet]] = {
    "xm3600": load_xm3600, "xtd10": load_xtd10, "multi30k": load_multi30k,
    "flickr30k": lambda root, **kw: load_karpathy(root, "flickr30k", **kw),
    "coco": lambda root, **kw: load_karpathy(root, "coco", **kw),
    "fleurs": load_fleurs, "commonvoice": load_commonvoice,
}


def load_benchmark(name: str, root: str | Path, **kwargs: Any) -> RetrievalSet:
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(LOADERS)} (babel_imagenet: mmalign classify)")
    return LOADERS[name](root, **kwargs)


def retrieval_scores(media_embeds: torch.Tensor, text_embeds: dict[str, torch.Tensor], bench: RetrievalSet,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """``{lang: {"text->media/R@k", "media->text/R@k"}}`` (percent) per the module's protocol.

    Args:
        media_embeds: ``[M, D]`` one row per medium of ``bench``.
        text_embeds: ``{lang: [C, D]}`` one row per caption of ``bench.captions[lang]``, in order.
    """
    from mmalign.evaluation.retrieval import retrieval_metrics

    m = bench.modality if bench.modality != "speech" else "audio"
    out: dict[str, dict[str, float]] = {}
    for lang, caps in bench.captions.items():
        cap_media = [i for i, _ in caps]
        used = sorted(set(cap_media))  # media with a caption in this language
        gal = media_embeds[torch.as_tensor(used)]
        t2m = retrieval_metrics(text_embeds[lang], gal, cap_media, used, ks=ks)
        m2t = retrieval_metrics(gal, text_embeds[lang], used, cap_media, ks=ks)
        out[lang] = {**{f"text->{m}/R@{k}": 100 * t2m[f"R@{k}"] for k in ks},
                     **{f"{m}->text/R@{k}": 100 * m2t[f"R@{k}"] for k in ks}}
    return out


def run_benchmark(model: Any, bench: RetrievalSet, batch_size: int = 64, captions: str = "all",
                  uncovered: str = "skip") -> dict[str, Any]:
    """Embed ``bench`` with an :class:`~mmalign.export.AlignedModel` (or anything with ``embed_image``/
    ``embed_speech``/``embed_text``) and score it.

    ``uncovered``: what to do with a benchmark language the model's text tower cannot embed (an encoder that
    declares its languages, e.g. USE-m's 16, against XM3600's 36; asked through ``model.language_problem``):
    ``"skip"`` scores the other languages and lists each skipped one with its reason under
    ``"skipped_languages"`` (counted in the table); ``"error"`` stops with that reason. Every language skipped is
    an error either way: there would be nothing to report."""
    if uncovered not in ("skip", "error"):
        raise ValueError(f"uncovered must be 'skip' or 'error', got {uncovered!r}")
    if captions == "first":
        bench = bench.first_only()
    skipped: dict[str, str] = {}
    check = getattr(model, "language_problem", None)
    for lang in list(bench.captions) if check is not None else ():
        problem = check(lang)
        if problem is None:
            continue
        if uncovered == "error":
            raise ValueError(f"{bench.name}: language {lang!r}: {problem} (--uncovered skip scores the languages the "
                             "model covers and lists the others)")
        skipped[lang] = problem
    if skipped and len(skipped) == len(bench.captions):
        raise ValueError(f"{bench.name}: the model covers none of its {len(skipped)} languages: "
                         f"{next(iter(skipped.values()))}")
    if skipped:
        bench = RetrievalSet(bench.name, bench.modality, bench.media,
                             {k: v for k, v in bench.captions.items() if k not in skipped})
    embed_media = model.embed_image if bench.modality == "image" else model.embed_speech
    media = embed_media(bench.media, batch_size=batch_size)
    texts = {lang: model.embed_text([t for _, t in caps], lang=lang, batch_size=batch_size) for lang, caps in bench.captions.items()}
    scores = retrieval_scores(media, texts, bench)
    return {"benchmark": bench.name, "protocol": f"CLIP_benchmark zeroshot_retrieval, captions={captions}",
            "num_media": len(bench.media), "num_captions": {k: len(v) for k, v in bench.captions.items()}, "retrieval": scores,
            "skipped_languages": skipped}


def format_table(result: dict[str, Any]) -> str:
    rows = result["retrieval"]
    cols = list(next(iter(rows.values())).keys()) if rows else []
    lines = [f"# {result['benchmark']} ({result['protocol']})", "", "| lang | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for lang in sorted(rows):
        lines.append(f"| {lang} | " + " | ".join(f"{rows[lang][c]:.1f}" for c in cols) + " |")
    skipped = result.get("skipped_languages") or {}
    if skipped:
        lines += ["", f"Skipped {len(skipped)} of {len(skipped) + len(rows)} languages the model does not cover: "
                  + ", ".join(sorted(skipped)) + f" (reasons in {result['benchmark']}.json)."]
    return "\n".join(lines)


def benchmark_command(argv: list[str]) -> dict[str, Any]:
    """``mmalign eval --benchmark NAME --root DIR --model EXPORT [--output DIR] [--captions all|first] [--year Y]``."""
    import argparse

    p = argparse.ArgumentParser(prog="mmalign eval --benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=sorted(LOADERS))
    p.add_argument("--root", required=True, help="local copy of the benchmark (layouts in the description)")
    p.add_argument("--model", required=True, help="export directory (mmalign export)")
    p.add_argument("--output", default="eval", help="folder for <benchmark>.json and <benchmark>.md")
    p.add_argument("--captions", choices=["all", "first"], default="all")
    p.add_argument("--year", type=int, default=2016, help="Multi30K test year (2016, 2017, 2018)")
    p.add_argument("--split", default="test", help="FLEURS / Common Voice split")
    p.add_argument("--languages", default=None, help="comma-separated subset")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--uncovered", choices=["skip", "error"], default="skip",
                   help="a language the model cannot embed: skip it (listed and counted in the report) or stop")
    a = p.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if a.benchmark == "multi30k":
        kwargs["year"] = a.year
    if a.benchmark in ("fleurs", "commonvoice"):
        kwargs["split"] = a.split
    if a.languages and a.benchmark in ("xm3600", "xtd10", "multi30k", "fleurs"):
        kwargs["languages"] = a.languages.split(",")
    bench = load_benchmark(a.benchmark, a.root, **kwargs)
    from mmalign.export.model import AlignedModel

    model = AlignedModel.from_pretrained(a.model, device=a.device)
    result = run_benchmark(model, bench, a.batch_size, a.captions, a.uncovered)
    result["provenance"] = {"model": a.model, "root": a.root, **kwargs}
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{bench.name}.json").write_text(json.dumps(result, indent=1))
    table = format_table(result)
    (out / f"{bench.name}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / (bench.name + '.json')} and {out / (bench.name + '.md')}")
    return result
