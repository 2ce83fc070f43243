"""Zero-shot classification with per-language prompt templates (Babel-ImageNet style).

A class's weight vector is the mean of its L2-normalised prompt embeddings ("a photo of a {}."
filled with the class name), renormalised (Radford et al., 2021, "Learning Transferable Visual
Models From Natural Language Supervision"; per-language prompts and class names as in Geigle et
al., 2024, "Babel-ImageNet: Massively Multilingual Evaluation of Vision-and-Language
Representations"). Images are classified by cosine similarity to the class weights.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .retrieval import retrieval_ranks

__all__ = [
    "DEFAULT_TEMPLATES", "EMOJI_TEMPLATES", "GENERAL_TEMPLATES", "NAME_TEMPLATES", "TEMPLATE_SETS", "zero_shot_accuracy",
    "zero_shot_classifier",
]

#: General image prompts (the default) for the 14 languages of the packaged data (``{}`` = the class name): a
#: photo, a picture, an image, the bare name, as in CLIP's and Babel-ImageNet's prompt sets. Built to avoid
#: grammatical agreement with the class name (no gendered article before it, no case ending on it) so any noun
#: phrase fits.
GENERAL_TEMPLATES: dict[str, list[str]] = {
    "en": ["a photo of a {}.", "a picture of {}.", "an image showing {}.", "{}."],
    "es": ["una foto de {}.", "una imagen de {}.", "una imagen que muestra {}.", "{}."],
    "pt": ["uma foto de {}.", "uma imagem de {}.", "uma imagem que mostra {}.", "{}."],
    "it": ["una foto di {}.", "un'immagine di {}.", "un'immagine che mostra {}.", "{}."],
    "fr": ["une photo de {}.", "une image de {}.", "une image représentant {}.", "{}."],
    "de": ["ein Foto von {}.", "ein Bild von {}.", "ein Bild, das {} zeigt.", "{}."],
    "ja": ["{}の写真。", "{}の画像。", "{}を写した画像。", "{}。"],
    "ko": ["{}의 사진.", "{}의 이미지.", "{}을(를) 보여 주는 이미지.", "{}."],
    "zh": ["{}的照片。", "{}的图片。", "显示{}的图像。", "{}。"],
    "ru": ["фотография: {}.", "изображение: {}.", "на изображении: {}.", "{}."],
    "tr": ["bir {} fotoğrafı.", "bir {} resmi.", "{} gösteren bir görüntü.", "{}."],
    "ar": ["صورة {}.", "صورة تُظهر {}.", "صورة فيها {}.", "{}."],
    "fa": ["عکسی از {}.", "تصویری از {}.", "تصویری که {} را نشان می‌دهد.", "{}."],
    "id": ["foto {}.", "sebuah gambar {}.", "gambar yang menunjukkan {}.", "{}."],
}

#: Emoji-specific prompts (an emoji, an icon), used only when asked for (``mmalign eval --templates emoji``, or a
#: dataset whose ``info.json`` names ``"prompt_templates": "emoji"``).
EMOJI_TEMPLATES: dict[str, list[str]] = {
    "en": ["a photo of a {}.", "a picture of {}.", "an emoji of {}.", "an icon showing {}."],
    "es": ["una foto de {}.", "una imagen de {}.", "un emoji de {}.", "un icono que muestra {}."],
    "pt": ["uma foto de {}.", "uma imagem de {}.", "um emoji de {}.", "um ícone que mostra {}."],
    "it": ["una foto di {}.", "un'immagine di {}.", "un'emoji di {}.", "un'icona che mostra {}."],
    "fr": ["une photo de {}.", "une image de {}.", "un emoji de {}.", "une icône représentant {}."],
    "de": ["ein Foto von {}.", "ein Bild von {}.", "ein Emoji von {}.", "ein Symbol, das {} zeigt."],
    "ja": ["{}の写真。", "{}の画像。", "{}の絵文字。", "{}を表すアイコン。"],
    "ko": ["{}의 사진.", "{}의 이미지.", "{} 이모지.", "{} 아이콘."],
    "zh": ["{}的照片。", "{}的图片。", "{}的表情符号。", "表示{}的图标。"],
    "ru": ["фотография: {}.", "изображение: {}.", "эмодзи: {}.", "значок: {}."],
    "tr": ["bir {} fotoğrafı.", "bir {} resmi.", "{} emojisi.", "{} simgesi."],
    "ar": ["صورة {}.", "صورة تُظهر {}.", "رمز تعبيري: {}.", "أيقونة {}."],
    "fa": ["عکسی از {}.", "تصویری از {}.", "ایموجی {}.", "نمادی از {}."],
    "id": ["foto {}.", "sebuah gambar {}.", "emoji {}.", "ikon {}."],
}

#: The bare class name in every language: the prompt set for towers that are not pictures (speech: a spoken name
#: is classified against the written names themselves).
NAME_TEMPLATES: dict[str, list[str]] = {lang: ["{}"] for lang in GENERAL_TEMPLATES}

#: Prompt sets by name (``mmalign eval --templates NAME``).
TEMPLATE_SETS: dict[str, dict[str, list[str]]] = {"general": GENERAL_TEMPLATES, "emoji": EMOJI_TEMPLATES, "name": NAME_TEMPLATES}

#: The default prompt set: general image prompts (not emoji-specific).
DEFAULT_TEMPLATES: dict[str, list[str]] = GENERAL_TEMPLATES


def _takes_lang(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "lang" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def zero_shot_classifier(
    text_encode_fn: Callable[..., Tensor],
    classnames: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]] | None = None,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-language class weight matrices from prompt templates.

    Args:
        text_encode_fn: Maps a list of strings to ``[B, D]`` embeddings in the shared space. If it
            accepts a ``lang`` keyword (e.g. ``AlignedModel.embed_text``), it is called as
            ``fn(texts, lang=lang)``, else ``fn(texts)``.
        classnames: ``{lang: [C class names]}``; every language should list the classes in the
            same order so the same label indexes them all.
        templates: ``{lang: [templates with "{}"]}``; languages missing here fall back to
            :data:`DEFAULT_TEMPLATES`. ``None``: the defaults for all.
        batch_size: Prompts encoded per call (``None``: all prompts of a language at once).

    Returns:
        ``{lang: [C, D]}`` L2-normalised class weights (CPU, float32).

    Raises:
        ValueError: No templates for a language, a template without ``{}``, or no class names.
    """
    templates = dict(templates or {})
    pass_lang = _takes_lang(text_encode_fn)
    out: dict[str, Tensor] = {}
    for lang, names in classnames.items():
        names = list(names)
        if not names:
            raise ValueError(f"classnames[{lang!r}] is empty")
        temps = list(templates.get(lang) or DEFAULT_TEMPLATES.get(lang) or [])
        if not temps:
            raise ValueError(f"no prompt templates for language {lang!r} (defaults cover {sorted(DEFAULT_TEMPLATES)})")
        for t in temps:
            if "{}" not in t:
                raise ValueError(f"template {t!r} for language {lang!r} has no '{{}}' placeholder")
        prompts = [t.replace("{}", name) for name in names for t in temps]  # class-major order
        step = batch_size or len(prompts)
        chunks = []
        for start in range(0, len(prompts), step):
            batch = prompts[start : start + step]
            emb = text_encode_fn(batch, lang=lang) if pass_lang else text_encode_fn(batch)
            chunks.append(torch.as_tensor(emb).float().cpu())
        emb = F.normalize(torch.cat(chunks), dim=-1)  # [C * T, D]
        if len(emb) != len(prompts):
            raise ValueError(f"text_encode_fn returned {len(emb)} rows for {len(prompts)} prompts ({lang!r})")
        weights = emb.view(len(names), len(temps), -1).mean(dim=1)  # [C, D]
        out[lang] = F.normalize(weights, dim=-1)
    return out


def zero_shot_accuracy(
    image_embeds: Tensor,
    labels: Sequence[int] | Tensor,
    class_weights: Tensor | Mapping[str, Tensor],
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
) -> dict:
    """Top-k accuracy of zero-shot classification.

    Ties are pessimistic (a class tied with the true class ranks above it), as in
    :func:`mmalign.evaluation.retrieval.retrieval_ranks`, of which this is the special case
    "gallery = one weight vector per class".

    Args:
        image_embeds: ``[N, D]`` image (or speech) embeddings.
        labels: ``N`` class indices in ``[0, C)``.
        class_weights: ``[C, D]`` weights, or ``{lang: [C, D]}`` from :func:`zero_shot_classifier`.
        ks: Top-k cut-offs.
        chunk_size: Images scored at once.

    Returns:
        ``{"top1": ..., "top5": ...}`` (fractions), or ``{lang: {...}}`` for a dict of weights.
    """
    if isinstance(class_weights, Mapping):
        return {lang: zero_shot_accuracy(image_embeds, labels, w, ks, chunk_size) for lang, w in class_weights.items()}
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    num_classes = len(class_weights)
    if len(labels) != len(image_embeds):
        raise ValueError(f"labels has {len(labels)} entries but image_embeds has {len(image_embeds)} rows")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"labels out of range [0, {num_classes}) at rows {bad}")
    ranks = retrieval_ranks(
        image_embeds, class_weights, labels, torch.arange(num_classes), chunk_size=chunk_size, normalize=True
    )
    return {f"top{k}": (ranks <= k).double().mean().item() for k in ks}
