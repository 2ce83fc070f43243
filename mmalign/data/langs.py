"""Language code tables shared by the offline data generators.

Codes are ISO 639-1 (the manifest ``lang`` field). ``ESPEAK_VOICES`` maps each code to the espeak-ng
voice that speaks it; quality varies (espeak-ng is a formant synthesiser), see ``SPEECH_NOTES``.
"""

from __future__ import annotations

# The 14 languages the ``emoji`` package names every emoji in (``emoji.LANGUAGES``), in its order.
EMOJI_LANGUAGES: tuple[str, ...] = (
    "en", "es", "ja", "ko", "pt", "it", "fr", "de", "fa", "id", "zh", "ru", "tr", "ar",
)

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "es": "Spanish",
    "ja": "Japanese",
    "ko": "Korean",
    "pt": "Portuguese",
    "it": "Italian",
    "fr": "French",
    "de": "German",
    "fa": "Persian",
    "id": "Indonesian",
    "zh": "Chinese",
    "ru": "Russian",
    "tr": "Turkish",
    "ar": "Arabic",
}

# espeak-ng 1.51 voice names (`espeak-ng --voices`).
ESPEAK_VOICES: dict[str, str] = {
    "en": "en-us",
    "es": "es",
    "ja": "ja",
    "ko": "ko",
    "pt": "pt",
    "it": "it",
    "fr": "fr-fr",
    "de": "de",
    "fa": "fa",
    "id": "id",
    "zh": "cmn",
    "ru": "ru",
    "tr": "tr",
    "ar": "ar",
}

# Why a voice is left out of the default speech languages.
SPEECH_NOTES: dict[str, str] = {
    "ja": "espeak-ng reads only kana; kanji are spoken as the English words 'Chinese letter'",
    "ar": "unvocalised Arabic script: vowels are guessed",
    "fa": "unvocalised Persian script: vowels are guessed",
}


def language_name(code: str) -> str:
    """English name of an ISO 639-1 ``code`` (the code itself when unknown)."""
    return LANGUAGE_NAMES.get(code, code)
