"""The offline trimodal multilingual emoji dataset: ``concepts`` (what and how named), ``render`` (pictures),
``build`` (splits, speech, manifests; :func:`build_emoji_dataset`)."""

from mmalign.datasets.emoji.build import (
    DEFAULT_SPEECH_LANGUAGES,
    GENERATOR_VERSION,
    OWNER_MARKER,
    SPLITS,
    DatasetInfo,
    build_emoji_dataset,
)
from mmalign.datasets.emoji.concepts import EmojiConcept, clean_name, concept_id, emoji_concepts
from mmalign.datasets.emoji.render import FONT_ENV, FONT_SIZE, EmojiRenderer, find_emoji_font
from mmalign.datasets.espeak import SAMPLE_RATE, find_espeak, synthesize, wav_problem

__all__ = [
    "DEFAULT_SPEECH_LANGUAGES", "FONT_ENV", "FONT_SIZE", "GENERATOR_VERSION", "OWNER_MARKER", "SAMPLE_RATE", "SPLITS",
    "DatasetInfo", "EmojiConcept", "EmojiRenderer", "build_emoji_dataset", "clean_name", "concept_id",
    "emoji_concepts", "find_emoji_font", "find_espeak", "synthesize", "wav_problem",
]
