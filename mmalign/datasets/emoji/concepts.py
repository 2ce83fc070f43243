"""Emoji concepts: which emoji become concepts (single emoji, no skin tones or flags) and their names per language."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence




_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)  # subdivision flags (England, Scotland, Wales)
_KEYCAP = "\u20e3"
_VS16 = "\ufe0f"  # emoji presentation selector; not a separate concept



@dataclass(frozen=True)
class EmojiConcept:
    """One emoji and its cleaned names.

    Attributes:
        concept: Filename-safe id (ASCII slug of the English name), e.g. ``"fork_and_knife"``.
        emoji: The emoji string (one code point, maybe followed by U+FE0F).
        names: Language code -> name, e.g. ``{"en": "fork and knife", "de": "messer und gabel"}``.
    """

    concept: str
    emoji: str
    names: dict[str, str]


def import_emoji_package() -> Any:
    try:
        import emoji as emoji_pkg  # absolute import: the PyPI package, not this module
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The `emoji` package is needed for the emoji names; `pip install emoji` "
            "(it is in mmalign's `offline` extra)."
        ) from err
    return emoji_pkg


# --------------------------------------------------------------------------- concepts


def clean_name(name: str) -> str:
    """``":fork_and_knife:"`` -> ``"fork and knife"``."""
    return " ".join(name.strip(":").replace("_", " ").split())


def concept_id(english_name: str) -> str:
    """Filename-safe ASCII slug of an English name: ``"piñata"`` -> ``"pinata"``."""
    ascii_name = unicodedata.normalize("NFKD", english_name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")


def _sequence_reason(emoji_str: str) -> str | None:
    """Why ``emoji_str`` is not one concept of its own, or None when it is a single code point."""
    points = [ord(c) for c in emoji_str.replace(_VS16, "")]
    if len(points) == 1:
        return None
    if any(p in _SKIN_TONES for p in points):
        return "skin_tone_variant"
    if any(p in _REGIONAL_INDICATORS or p in _TAGS for p in points):
        return "flag"
    if _KEYCAP in emoji_str:
        return "keycap"
    return "multi_codepoint_sequence"


def emoji_concepts(languages: Sequence[str]) -> tuple[list[EmojiConcept], dict[str, int]]:
    """All candidate concepts named in every language of ``languages`` (English always included).

    Keeps fully-qualified emoji made of one code point (plus an optional U+FE0F), so concepts are
    distinct pictures: skin-tone variants, flags, keycaps and ZWJ sequences are counted and left out.

    Args:
        languages: ISO 639-1 codes, each one of :data:`EMOJI_LANGUAGES`.

    Returns:
        The concepts sorted by code point (deterministic), and reason -> count of emoji left out.
    """
    emoji_pkg = import_emoji_package()
    needed = list(dict.fromkeys(["en", *languages]))
    emoji_pkg.config.load_language(needed)  # names other than English load lazily
    fully_qualified = emoji_pkg.STATUS["fully_qualified"]

    concepts: list[EmojiConcept] = []
    skipped: dict[str, int] = {}
    seen_ids: set[str] = set()

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for emoji_str in sorted(emoji_pkg.EMOJI_DATA, key=lambda e: [ord(c) for c in e]):
        data = emoji_pkg.EMOJI_DATA[emoji_str]
        if data.get("status") != fully_qualified:
            skip("not_fully_qualified")  # component / unqualified spellings of kept emoji
            continue
        reason = _sequence_reason(emoji_str)
        if reason is not None:
            skip(reason)
            continue
        missing = [lang for lang in needed if not data.get(lang)]
        if missing:
            skip(f"missing_name_{missing[0]}")
            continue
        names = {lang: clean_name(data[lang]) for lang in needed}
        cid = concept_id(names["en"])
        if not cid or cid in seen_ids:
            skip("duplicate_or_empty_id")
            continue
        seen_ids.add(cid)
        concepts.append(EmojiConcept(concept=cid, emoji=emoji_str, names=names))
    return concepts, skipped


# --------------------------------------------------------------------------- images
