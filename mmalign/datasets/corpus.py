"""An English text corpus for text-only pivot recipes (uCLIP): words, names, phrases and sentences, offline.

uCLIP trains its student on English text alone, against memory banks of millions of English texts; the
emoji names (about 1k English training names) are far too few to generalise beyond emoji. This generator
writes a plain-text corpus (one text per line, read by :class:`~mmalign.data.sources.text.TextCorpusSource`)
from registry packages only:

* ``wordfreq``: the most frequent English words (PyPI ``wordfreq``, data CC BY-SA 4.0);
* ``wordnet``: WordNet 3.0 (Debian ``wordnet-base``, files under ``/usr/share/wordnet``): lemma names
  (words, multi-word phrases, proper names), definitions (phrases) and usage examples (sentences);
* a ``.jsonl`` manifest: the English ``text`` of its rows (e.g. ``data/emoji/train.jsonl``'s names);
* a ``.txt`` file: one text per line (any other corpus).

No evaluation text is ever trained on: every ``text``/``text_en`` of the ``exclude`` manifests (held-out
val/test concepts, every language) and of the held-out CLDR domains (:mod:`mmalign.datasets.domains`,
built under ``<root>/domains`` and never a training source) is left out, and each exclusion is counted per
held-out set in ``info.json`` (texts compared case- and Unicode-insensitively). Layout under ``root``::

    train.txt       one text per line, deduplicated (case-insensitive), in hash order (every prefix a uniform sample)
    domains/        the held-out evaluation domains (<domain>.jsonl, info.json)
    info.json       texts per source and kind, exclusions per held-out set, arguments, versions
    .complete       written last; a folder without it is never trusted as finished

The same arguments and inputs always give a byte-identical ``train.txt``; a finished folder with the same
fingerprint is returned as is. Capped sources keep a hash-ordered (deterministic, topic-mixed) subset.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from mmalign.datasets.domains import DOMAINS, USEM_LANGUAGES, build_domains
from mmalign.datasets.files import atomic_write_text, dumps_json, finished_info, matches
from mmalign.datasets.words import normalize
from mmalign.data.manifest import read_manifest

GENERATOR_VERSION = "1"
OWNER_MARKER = ".mmalign-corpus"
DEFAULT_WORDNET = "/usr/share/wordnet"
DEFAULT_SOURCES = ("wordfreq", "wordnet")
#: Default caps per source kind (about 110k texts in all: every word, a hash-ordered share of WordNet).
DEFAULT_CAPS = {"wordnet:lemma": 45000, "wordnet:definition": 25000, "wordnet:example": 10000}
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_WORD = re.compile(r"^[a-z][a-z'\-]*$")


@dataclass
class CorpusInfo:
    """What :func:`build_corpus` wrote (or found written).

    Attributes:
        root: Corpus folder.
        path: ``train.txt``.
        num_texts: Lines of ``train.txt``.
        per_source: ``"<source>:<kind>"`` -> texts kept.
        excluded: Held-out set -> candidate texts left out because they name one of its concepts.
        domains: Held-out domain -> manifest path.
        cached: True when a finished corpus was found and nothing written.
    """

    root: Path
    path: Path
    num_texts: int
    per_source: dict[str, int]
    excluded: dict[str, int]
    domains: dict[str, Path] = field(default_factory=dict)
    cached: bool = False

    @classmethod
    def from_folder(cls, root: Path, cached: bool = True) -> "CorpusInfo":
        info = json.loads((root / "info.json").read_text(encoding="utf-8"))
        return cls(root, root / "train.txt", info["num_texts"], info["per_source"], info["excluded"],
                   {d: root / p for d, p in info["domain_manifests"].items()}, cached)


def clean(text: str) -> str:
    """One line: whitespace collapsed (a text never spans lines)."""
    return " ".join(str(text).split())


# -- sources: each yields (kind, text) in a deterministic order -------------------------------------
def wordfreq_texts(n: int) -> Iterator[tuple[str, str]]:
    """The ``n`` most frequent English words (lower case letters, apostrophes, hyphens)."""
    try:
        import wordfreq
    except ImportError as e:
        raise ImportError("the corpus source `wordfreq` needs the `wordfreq` package: `pip install wordfreq`") from e
    count = 0
    for word in wordfreq.top_n_list("en", 12 * n + 1000, wordlist="best"):
        if _WORD.match(word):
            yield "word", word
            count += 1
            if count == n:
                return


def parse_wordnet_line(line: str) -> tuple[list[str], list[str], list[str]]:
    """``(lemmas, definitions, examples)`` of one ``data.<pos>`` line of WordNet 3.0 (``[]`` for the licence header)."""
    if not line or line.startswith(" "):
        return [], [], []
    head, _, gloss = line.partition(" | ")
    parts = head.split()
    try:
        n_words = int(parts[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", parts[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
    except (IndexError, ValueError) as e:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}") from e
    definitions, examples = [], []
    for piece in gloss.strip().split("; "):
        piece = piece.strip().rstrip(";").strip()
        if piece.startswith('"'):
            examples.append(piece.strip('"').strip())
        elif piece:
            definitions.append(piece)
    return lemmas, definitions, examples


def wordnet_texts(folder: str | Path) -> Iterator[tuple[str, str]]:
    """Lemma names (``lemma``), definitions (``definition``) and examples (``example``) of WordNet's data files."""
    folder = Path(folder)
    missing = [f for f in _WORDNET_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"WordNet data files {missing} not found in {folder}: install Debian's `wordnet-base` "
                                "(apt-get install wordnet-base) or pass wordnet_dir")
    for name in _WORDNET_FILES:
        with open(folder / name, encoding="utf-8") as f:
            for line in f:
                lemmas, definitions, examples = parse_wordnet_line(line.rstrip("\n"))
                yield from (("lemma", t) for t in lemmas)
                yield from (("definition", t) for t in definitions)
                yield from (("example", t) for t in examples)


def manifest_texts(path: str | Path) -> Iterator[tuple[str, str]]:
    """English ``text`` of a manifest's ``lang: en`` rows."""
    for row in read_manifest(path):
        if row.get("lang") == "en" and isinstance(row.get("text"), str):
            yield "name", row["text"]


def file_texts(path: str | Path) -> Iterator[tuple[str, str]]:
    """Lines of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield "line", line


def source_texts(spec: str, wordfreq_words: int, wordnet_dir: str | Path) -> Iterator[tuple[str, str]]:
    if spec == "wordfreq":
        return wordfreq_texts(wordfreq_words)
    if spec == "wordnet":
        return wordnet_texts(wordnet_dir)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"corpus source {spec!r} is neither 'wordfreq', 'wordnet' nor an existing file")
    if path.suffix in (".jsonl", ".csv", ".ndjson"):
        return manifest_texts(path)
    return file_texts(path)


def source_label(spec: str) -> str:
    return spec if spec in ("wordfreq", "wordnet") else Path(spec).name


def held_out_sets(manifests: Sequence[str | Path]) -> dict[str, set[str]]:
    """Held-out set label -> normalised ``text`` and ``text_en`` of every row (every language)."""
    out: dict[str, set[str]] = {}
    for path in manifests:
        names = out.setdefault(Path(path).name, set())
        for row in read_manifest(path):
            for key in ("text", "text_en"):
                if isinstance(row.get(key), str):
                    names.add(normalize(clean(row[key])))
    return out


def _rank(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def _digest(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode(), digest_size=12).hexdigest()


def _source_fingerprint(spec: str, wordnet_dir: str | Path) -> Any:
    if spec == "wordfreq":
        import wordfreq

        return {"wordfreq": getattr(wordfreq, "__version__", "unknown")}
    files = [Path(wordnet_dir) / f for f in _WORDNET_FILES] if spec == "wordnet" else [Path(spec)]
    return {str(f.name): hashlib.blake2b(f.read_bytes(), digest_size=12).hexdigest() for f in files if f.is_file()}


def build_corpus(
    root: str | Path,
    sources: Sequence[str] = DEFAULT_SOURCES,
    exclude: Sequence[str | Path] = (),
    domains: Sequence[str] = DOMAINS,
    domain_languages: Sequence[str] = USEM_LANGUAGES,
    wordfreq_words: int = 30000,
    wordnet_dir: str | Path = DEFAULT_WORDNET,
    max_per_kind: dict[str, int] | None = DEFAULT_CAPS,
    max_chars: int = 200,
    progress: bool = True,
    overwrite: bool = False,
) -> CorpusInfo:
    """Build (or find cached) the English training corpus, held-out texts excluded and counted.

    Args:
        root: Output folder (created).
        sources: In order: ``wordfreq``, ``wordnet``, or paths of ``.jsonl`` manifests / ``.txt`` files.
        exclude: Manifests of held-out concepts (e.g. ``data/emoji/val.jsonl``, ``data/emoji/test.jsonl``):
            their texts in every language are left out and counted.
        domains: Held-out CLDR evaluation domains built under ``<root>/domains`` and excluded too (``[]``: none).
        domain_languages: Languages of the held-out domains (must include ``en``).
        wordfreq_words: English words taken from wordfreq (before exclusion and deduplication).
        wordnet_dir: Folder of WordNet 3.0's ``data.*`` files.
        max_per_kind: Cap per ``"<source>:<kind>"`` (e.g. ``{"wordnet:definition": 40000}``), applied after
            exclusion and deduplication to a hash-ordered subset (deterministic); default :data:`DEFAULT_CAPS`
            (``{}``: none).
        max_chars: Longer texts are left out (counted as ``too_long``).
        progress: Show a tqdm bar.
        overwrite: Allow rebuilding a finished folder made with other arguments.

    Raises:
        FileNotFoundError: A source or ``exclude`` manifest is missing.
        FileExistsError: ``root`` holds a corpus built with other settings (and not ``overwrite``), or is a
            non-empty folder this generator did not make.
        ValueError: Bad arguments, or no text left.
    """
    root = Path(root)
    sources = [str(s) for s in sources]
    if not sources or len(set(sources)) != len(sources):
        raise ValueError(f"sources must be a non-empty list without repeats, got {sources}")
    if wordfreq_words < 1 or max_chars < 1:
        raise ValueError(f"need wordfreq_words >= 1 and max_chars >= 1, got {wordfreq_words}, {max_chars}")
    caps = dict(max_per_kind or {})
    for path in exclude:
        if not Path(path).is_file():
            raise FileNotFoundError(f"held-out manifest not found: {path}")
    if root.is_dir() and not (root / OWNER_MARKER).is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and was not made by build_corpus; choose a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / OWNER_MARKER, GENERATOR_VERSION + "\n")
    domain_info = build_domains(root / "domains", domains, domain_languages, overwrite=overwrite) if domains else None
    domain_manifests = list(domain_info.manifests.values()) if domain_info else []
    held = held_out_sets(list(exclude) + domain_manifests)
    fingerprint = {
        "generator_version": GENERATOR_VERSION,
        "args": {"sources": [source_label(s) for s in sources], "domains": list(domains), "wordfreq_words": wordfreq_words,
                 "max_per_kind": dict(sorted(caps.items())), "max_chars": max_chars},
        "inputs": _digest([_source_fingerprint(s, wordnet_dir) for s in sources]),
        "held_out": _digest({k: sorted(v) for k, v in sorted(held.items())}),
    }
    done, old = finished_info(root)
    if done:
        if matches(old, fingerprint):
            return CorpusInfo.from_folder(root)
        if not overwrite:
            raise FileExistsError(f"{root} already holds a corpus built with other settings or held-out sets; "
                                  "pass overwrite=True to rebuild it there, or choose another folder")
    (root / ".complete").unlink(missing_ok=True)

    excluded = {label: 0 for label in held}
    names_seen = {label: set() for label in held}
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    kept: dict[str, list[str]] = {}
    bar = tqdm(desc="corpus texts", unit="text", disable=not progress)
    for spec in sources:
        label = source_label(spec)
        for kind, raw in source_texts(spec, wordfreq_words, wordnet_dir):
            bar.update()
            text = clean(raw)
            key = normalize(text)
            if not key:
                continue
            if len(text) > max_chars:
                skipped["too_long"] = skipped.get("too_long", 0) + 1
                continue
            hits = [h for h, names in held.items() if key in names]
            if hits:  # a held-out concept's name: never trained on, counted once per held-out set it names
                for h in hits:
                    excluded[h] += 1
                    names_seen[h].add(key)
                continue
            if key in seen:
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
                continue
            seen.add(key)
            kept.setdefault(f"{label}:{kind}", []).append(text)
    bar.close()
    lines: list[str] = []
    per_source: dict[str, int] = {}
    for group, texts in kept.items():
        if group in caps and len(texts) > caps[group]:
            skipped[f"capped_{group}"] = len(texts) - caps[group]
            texts = sorted(texts, key=_rank)[: caps[group]]
        per_source[group] = len(texts)
        lines.extend(texts)
    # hash order: every prefix of the file is a uniform, source-mixed sample (a smaller feature cache is a prefix)
    lines.sort(key=_rank)
    if not lines:
        raise ValueError(f"no corpus text left from sources {sources} after exclusions ({excluded}) and skips ({skipped})")
    atomic_write_text(root / "train.txt", "".join(t + "\n" for t in lines))
    info = dict(fingerprint, num_texts=len(lines), per_source=per_source, excluded=excluded,
                held_out_names={h: len(v) for h, v in held.items()},
                held_out_names_found={h: len(v) for h, v in names_seen.items()},
                skipped=dict(sorted(skipped.items())), exclude=[str(p) for p in exclude],
                domain_manifests={d: f"domains/{p.name}" for d, p in (domain_info.manifests.items() if domain_info else [])},
                provenance={"wordfreq": "wordfreq 'best' English list (data CC BY-SA 4.0)",
                            "wordnet": "WordNet 3.0, Princeton University (WordNet licence), Debian wordnet-base"})
    atomic_write_text(root / "info.json", dumps_json(info))
    atomic_write_text(root / ".complete", GENERATOR_VERSION + "\n")
    return CorpusInfo.from_folder(root, cached=False)
