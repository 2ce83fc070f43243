"""``mmalign classify``: zero-shot image classification with an export and per-language prompt templates.

    mmalign classify --model exports/x --labels labels.txt --images photos/ --lang de
    mmalign classify --model exports/x --labels babel:de --babel_root data/babel_imagenet   # Babel-ImageNet, accuracy

Class weights are the mean of the class name's prompt embeddings (:func:`~mmalign.evaluation.zeroshot
.zero_shot_classifier`, CLIP's prompt ensembling); images are ranked against them by cosine similarity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmalign.evaluation.zeroshot import DEFAULT_TEMPLATES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

#: General photo prompts per language (no domain word such as "emoji"); avoid agreement with the class name.
GENERAL_TEMPLATES: dict[str, list[str]] = {lang: t[:2] for lang, t in DEFAULT_TEMPLATES.items()}
GENERAL_TEMPLATES["en"] = ["a photo of a {}.", "a picture of {}.", "a close-up photo of {}.", "a bright photo of {}.",
                           "a cropped photo of {}.", "a photo of a small {}.", "a photo of a large {}."]
GENERAL_TEMPLATES.update({
    "nl": ["een foto van {}.", "een afbeelding van {}."], "pl": ["zdjęcie: {}.", "obraz: {}."],
    "hi": ["{} की तस्वीर।", "{} का चित्र।"], "vi": ["ảnh {}.", "hình ảnh {}."], "uk": ["фотографія: {}.", "зображення: {}."],
    "sv": ["ett foto av {}.", "en bild av {}."], "cs": ["fotografie: {}.", "obrázek: {}."], "th": ["ภาพถ่ายของ{}", "รูปภาพของ{}"],
})


def _images(spec: str) -> tuple[list[str], list[str] | None]:
    """Paths from a folder (with class subfolders: also their labels), a ``.txt`` list, or one image."""
    p = Path(spec)
    if p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir())
        if subdirs:
            files = [(f, d.name) for d in subdirs for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            return [str(f) for f, _ in files], [c for _, c in files]
        return [str(f) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES], None
    if p.suffix == ".txt":
        return [str((p.parent / line.strip()).resolve()) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()], None
    if p.is_file():
        return [str(p)], None
    raise FileNotFoundError(f"images not found: {spec}")


def classify(
    model: str,
    labels: str,
    images: str | None = None,
    lang: str = "en",
    babel_root: str | None = None,
    templates: str | None = None,
    top_k: int = 5,
    output: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """Classify images zero-shot into the classes of ``labels``.

    Args:
        model: Export directory (``mmalign export``).
        labels: A ``.txt`` file with one class name per line (in ``lang``), or ``babel:<lang>`` for the
            Babel-ImageNet class names of that language (with ``babel_root``).
        images: A folder of images (with one subfolder per class named like ``labels``' lines: accuracy is
            reported), a ``.txt`` list of paths, or one image. Default with ``babel:``: ``babel_root/val``.
        lang: Language of the class names and of the prompt templates (``babel:<lang>`` sets it).
        babel_root: Folder with ``babel_imagenet.json`` and ImageNet ``val/<wnid>/``.
        templates: A JSON file ``{lang: ["a photo of {}.", ...]}`` overriding the general templates.
        top_k: Predictions kept per image.
        output: ``.json`` file for the predictions and accuracy (default: printed only).
        batch_size: Items per encoder call.
        device: ``cpu``, ``cuda``... (default: cuda if available).
        max_per_class: Babel-ImageNet: at most this many images per class.
    """
    import torch

    from mmalign.evaluation.zeroshot import zero_shot_classifier
    from mmalign.export.model import AlignedModel

    truth: list[int] | None = None
    if labels.startswith("babel:"):
        from mmalign.evaluation.benchmarks import load_babel_imagenet

        lang = labels.split(":", 1)[1]
        if babel_root is None:
            raise ValueError("labels=babel:<lang> needs --babel_root (babel_imagenet.json + ImageNet val/)")
        paths, truth, names = load_babel_imagenet(babel_root, lang, max_per_class)
    else:
        names = [n.strip() for n in Path(labels).read_text(encoding="utf-8").splitlines() if n.strip()]
        if images is None:
            raise ValueError("give --images (a folder, a .txt list or an image)")
        paths, folders = _images(images)
        if folders is not None:
            unknown = sorted(set(folders) - set(names))
            if unknown:
                raise ValueError(f"class folders {unknown[:5]} are not in {labels}")
            truth = [names.index(c) for c in folders]
    if not paths:
        raise ValueError("no images to classify")
    table = dict(GENERAL_TEMPLATES)
    if templates is not None:
        table.update(json.loads(Path(templates).read_text(encoding="utf-8")))
    if lang not in table:
        raise ValueError(f"no prompt templates for {lang!r}; give --templates FILE.json ({{\"{lang}\": [\"... {{}} ...\"]}}); "
                         f"built in: {sorted(table)}")
    aligned = AlignedModel.from_pretrained(model, device=device)
    weights = zero_shot_classifier(lambda texts, lang: aligned.embed_text(texts, lang=lang, batch_size=batch_size),
                                   {lang: names}, {lang: table[lang]})[lang]  # [C, D]
    embeds = torch.nn.functional.normalize(aligned.embed_image(paths, batch_size=batch_size).float(), dim=-1)  # [N, D]
    scores = embeds @ weights.T  # [N, C]
    top = scores.topk(min(top_k, len(names)), dim=1)
    preds = [{"image": p, "top": [{"label": names[j], "score": round(float(s), 4)} for s, j in zip(sv.tolist(), iv.tolist())]}
             for p, sv, iv in zip(paths, top.values, top.indices)]
    result: dict[str, Any] = {"lang": lang, "num_classes": len(names), "templates": table[lang], "predictions": preds}
    if truth is not None:
        t = torch.as_tensor(truth)
        result["top1"] = float((top.indices[:, 0] == t).double().mean())
        result[f"top{min(top_k, len(names))}"] = float((top.indices == t[:, None]).any(1).double().mean())
    for p in preds[:20]:
        print(f"{p['image']}: " + ", ".join(f"{x['label']} ({x['score']:.3f})" for x in p["top"][:3]))
    if len(preds) > 20:
        print(f"... {len(preds) - 20} more")
    if truth is not None:
        print(f"[{lang}] top-1 accuracy {100 * result['top1']:.2f}% over {len(paths)} images, {len(names)} classes")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1, ensure_ascii=False))
        print(f"wrote {output}")
    return result
