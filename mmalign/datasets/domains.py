"""Held-out evaluation domains: CLDR names paired across languages (babel), never a training source.

A text-only pivot (uCLIP) trained on emoji names and tested on other emoji names measures in-domain transfer
only. These sets measure it out of domain: the names of territories, languages and currencies that the
Unicode CLDR gives in every locale (shipped inside the ``babel`` wheel), one concept per code, one row per
language. The corpus generator (:mod:`mmalign.datasets.corpus`) reads no CLDR data and leaves out (and counts)
every string of these sets, so no evaluation name is ever trained on.

Layout written under ``root``::

    <domain>.jsonl   rows {"id": "<domain>-<code>-<lang>", "concept": "<domain>:<code>", "lang", "text", "text_en"}
    info.json        counts per domain and language, concepts dropped with reasons, babel/CLDR versions
    .complete        written last; a folder without it is never trusted as finished

A concept is kept only when every requested language names it (so every language's gallery is the same
concepts) and its English name is unique within the domain (an ambiguous English name has no single
right answer). Rows are ordered by code, then language, so the same babel version gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mmalign.datasets.files import atomic_write_text, dumps_json, finished_info, matches

GENERATOR_VERSION = "1"
#: The CLDR tables each domain reads (``babel.Locale`` attributes).
DOMAINS = ("territories", "languages", "currencies")
#: Languages of Universal Sentence Encoder Multilingual (the offline pivot's student) that CLDR names.
USEM_LANGUAGES = ("en", "ar", "de", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "ru", "th", "tr", "zh")
#: ISO 639-1 code -> babel locale, where they differ.
LOCALES = {"zh": "zh_Hans"}

#: ``(domain, lang) -> {code: name}``; the default reads babel, tests pass a fake.
NameTable = Callable[[str, str], Mapping[str, str]]


def babel_names(domain: str, lang: str) -> Mapping[str, str]:
    """CLDR names of ``domain`` in ``lang`` from babel (``Locale(lang).territories`` ...)."""
    try:
        from babel import Locale
    except ImportError as e:
        raise ImportError("the held-out domains need the `babel` package: `pip install babel`") from e
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {list(DOMAINS)}")
    return dict(getattr(Locale.parse(LOCALES.get(lang, lang)), domain))


def _versions() -> dict[str, str]:
    try:
        import babel
        from babel.core import get_cldr_version

        return {"babel": babel.__version__, "cldr": str(get_cldr_version())}
    except (ImportError, AttributeError):
        return {"babel": "unknown"}


@dataclass
class DomainsInfo:
    """What :func:`build_domains` wrote: manifest per domain, concepts per domain, drops by reason."""

    root: Path
    manifests: dict[str, Path]
    concepts: dict[str, int]
    dropped: dict[str, int] = field(default_factory=dict)
    cached: bool = False


def domain_rows(domain: str, languages: Sequence[str], names: NameTable, dropped: dict[str, int]) -> list[dict[str, Any]]:
    """Rows of one domain: concepts named in every language with a unique English name (drops counted)."""
    tables = {lang: names(domain, lang) for lang in languages}
    english = tables["en"]
    by_name: dict[str, list[str]] = {}
    for code, name in english.items():
        by_name.setdefault(name.strip().casefold(), []).append(code)
    rows = []
    for code in sorted(english):
        name_en = english[code].strip()
        if len(by_name[name_en.casefold()]) > 1:
            dropped[f"{domain}:ambiguous_english_name"] = dropped.get(f"{domain}:ambiguous_english_name", 0) + 1
            continue
        missing = [lang for lang in languages if not str(tables[lang].get(code, "")).strip()]
        if missing:
            dropped[f"{domain}:unnamed_in_some_language"] = dropped.get(f"{domain}:unnamed_in_some_language", 0) + 1
            continue
        for lang in languages:
            rows.append({"id": f"{domain}-{code}-{lang}", "concept": f"{domain}:{code}", "lang": lang,
                         "text": " ".join(str(tables[lang][code]).split()), "text_en": name_en})
    return rows


def build_domains(
    root: str | Path,
    domains: Sequence[str] = DOMAINS,
    languages: Sequence[str] = USEM_LANGUAGES,
    overwrite: bool = False,
    names: NameTable | None = None,
) -> DomainsInfo:
    """Build (or find cached) the held-out CLDR domains: one multilingual parallel manifest per domain.

    Args:
        root: Output folder (created).
        domains: CLDR tables to write (:data:`DOMAINS`).
        languages: ISO 639-1 codes; must include ``en`` (the pivot's teacher side).
        overwrite: Allow rebuilding a finished folder made with other arguments.
        names: ``(domain, lang) -> {code: name}``; default :func:`babel_names`.

    Raises:
        ValueError: No ``en`` among the languages, repeats, or an unknown domain.
        FileExistsError: ``root`` holds domains built with other settings (and not ``overwrite``).
    """
    root = Path(root)
    languages, domains = list(languages), list(domains)
    if "en" not in languages or len(set(languages)) != len(languages):
        raise ValueError(f"languages must include 'en' and have no repeats, got {languages}")
    unknown = sorted(set(domains) - set(DOMAINS)) if names is None else []
    if not domains or unknown or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be a non-empty list without repeats from {list(DOMAINS)}, got {domains}")
    fingerprint = {"generator_version": GENERATOR_VERSION, "domains": domains, "languages": languages,
                   "versions": _versions() if names is None else {"names": "custom"}}
    manifests = {d: root / f"{d}.jsonl" for d in domains}
    done, old = finished_info(root)
    if done:
        if matches(old, fingerprint):
            return DomainsInfo(root, manifests, old["concepts"], old["dropped"], cached=True)
        if not overwrite:
            raise FileExistsError(f"{root} holds held-out domains built with other settings; pass overwrite=True or choose another folder")
    names = names or babel_names
    root.mkdir(parents=True, exist_ok=True)
    (root / ".complete").unlink(missing_ok=True)
    dropped: dict[str, int] = {}
    concepts: dict[str, int] = {}
    for domain in domains:
        rows = domain_rows(domain, languages, names, dropped)
        concepts[domain] = len(rows) // len(languages)
        atomic_write_text(manifests[domain], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    info = dict(fingerprint, concepts=concepts, dropped=dict(sorted(dropped.items())),
                provenance="Unicode CLDR names shipped in the babel wheel (Unicode license)")
    atomic_write_text(root / "info.json", dumps_json(info))
    atomic_write_text(root / ".complete", GENERATOR_VERSION + "\n")
    return DomainsInfo(root, manifests, concepts, dict(sorted(dropped.items())), cached=False)
