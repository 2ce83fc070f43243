"""Language code tables shared by the offline data generators, and :func:`check_language` (the check of a
``lang`` argument given to the Python API, with "did you mean 'en'?" for ``"english"``).

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


#: Native names of the emoji languages, so ``lang="Deutsch"`` gets a hint too.
ENDONYMS: dict[str, str] = {
    "english": "en", "español": "es", "espanol": "es", "日本語": "ja", "한국어": "ko", "português": "pt",
    "portugues": "pt", "italiano": "it", "français": "fr", "francais": "fr", "deutsch": "de", "فارسی": "fa",
    "bahasa indonesia": "id", "中文": "zh", "русский": "ru", "türkçe": "tr", "turkce": "tr", "العربية": "ar",
}


def _english_names() -> dict[str, str]:
    """``{lowercase name: code}``: English names of the ISO 639-1 codes (CLDR's through babel, if installed)
    and :data:`ENDONYMS`."""
    from mmalign.data.policy import ISO_639_1

    names = {name.lower(): code for code, name in LANGUAGE_NAMES.items()} | ENDONYMS
    try:
        from babel import Locale

        names.update({name.lower(): code for code, name in Locale("en").languages.items() if code in ISO_639_1})
    except ImportError:  # babel is an optional dependency (the offline extra)
        pass
    return names


def suggest_language(code: str) -> str | None:
    """The ISO 639-1 code meant by a misspelt ``code`` or a language name (``"english"`` -> ``"en"``), or None."""
    import difflib

    from mmalign.data.policy import ISO_639_1

    low = code.strip().lower().replace("_", "-")
    names = _english_names()
    if low in names:
        return names[low]
    if low.split("-")[0] in ISO_639_1:
        return low  # only the case or separator was wrong ("EN")
    if len(low) == 3 and low.isalpha():  # an ISO 639-2/3 code ("eng", "deu", "ger")
        try:
            from babel import Locale

            primary = Locale.parse(low).language
            return primary if primary in ISO_639_1 else None
        except Exception:  # noqa: BLE001 - babel missing or an unknown code: no hint
            return None
    close = difflib.get_close_matches(low, list(names), n=1, cutoff=0.75)
    return names[close[0]] if close else None


def unknown_language_detail(code: object) -> str:
    """The reason a manifest row's language is refused, with "did you mean ...?" when one is likely."""
    hint = suggest_language(code) if isinstance(code, str) and code.strip() else None
    return f"{code!r} is not an ISO 639-1 code or 'und'" + (f"; did you mean {hint!r}?" if hint else "")


def check_language(code: object, what: str = "lang") -> str:
    """``code`` if it is an ISO 639-1 code or ``und`` (BCP-47 subtags allowed, as in manifests), else a
    ``ValueError`` naming ``what`` with "did you mean ...?" (``lang='english'`` -> ``'en'``)."""
    from mmalign.data.policy import is_known_language

    if is_known_language(code):
        return code  # type: ignore[return-value]
    hint = suggest_language(code) if isinstance(code, str) and code.strip() else None
    hint = f"; did you mean {hint!r}?" if hint else ""
    raise ValueError(f"{what}: {code!r} is not an ISO 639-1 language code (two lowercase letters such as 'en', "
                     f"'de', 'pt-BR') or 'und'{hint}")
