"""Spoken everyday words: extra training vocabulary for speech -> text teacher-student recipes.

A SONAR-style student learns to map the *sound* of a phrase to the teacher's embedding of its *text*; it
needs no translations, only many different things said. The emoji dataset (:mod:`mmalign.datasets.emoji`)
has about 1k training names per language, and held-out R@1 still climbs steeply with every doubling of
them (docs/results.md). This generator adds the most frequent words of each language (``wordfreq``'s
frequency lists), spoken by espeak-ng, as a train-only manifest to list beside the emoji one::

    train: [data/emoji/train.jsonl, data/words/train.jsonl]

Words equal to a held-out name (``exclude``: the val/test manifests, any language) are left out and
counted, so no evaluation concept is ever heard in training. Everything is offline: the word lists ship
inside the ``wordfreq`` wheel (data CC BY-SA 4.0), the voices with ``espeak-ng``.

Layout written under ``root``::

    audio/<lang>/<word digest>.wav  22050 Hz mono PCM16, espeak-ng saying the word
    train.jsonl                     rows interleaved by frequency rank: en, de, es of rank 1, then rank 2...
    info.json                       counts, skips with reasons, arguments, provenance
    .complete                       written last; a folder without it is never trusted as finished

Rows are ordered by rank, so the manifest of ``words_per_language=N`` is a prefix of the one for a larger
``N``: a feature cache of the smaller set stays valid when the set grows (only new shards are encoded).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from mmalign.datasets.espeak import check_voices, find_espeak, sample_style, synthesize, synthesize_augmented, wav_problem
from mmalign.datasets.files import atomic_write_text, dumps_json, prune
from mmalign.data.langs import ESPEAK_VOICES
from mmalign.data.manifest import read_manifest

GENERATOR_VERSION = "1"
OWNER_MARKER = ".mmalign-words"
_INSTALL_WORDFREQ = "install it with `pip install wordfreq` (or `pip install -e .[offline]`)"


@dataclass
class WordsInfo:
    """What :func:`build_words_dataset` wrote (or found already written).

    Attributes:
        root: Dataset folder.
        manifest: Path of ``train.jsonl``.
        num_rows: Rows (spoken words) in the manifest.
        rows_per_lang: Language -> rows.
        skipped: Reason -> number of words left out (``held_out_name``, ``speech_failed_<lang>``).
        cached: True when the call found a finished dataset and wrote nothing.
    """

    root: Path
    manifest: Path
    num_rows: int
    rows_per_lang: dict[str, int]
    skipped: dict[str, int] = field(default_factory=dict)
    cached: bool = False

    @classmethod
    def fromdumps_json(cls, root: str | Path, cached: bool = True) -> "WordsInfo":
        root = Path(root)
        info = json.loads((root / "info.json").read_text(encoding="utf-8"))
        return cls(root, root / "train.jsonl", info["num_rows"], info["rows_per_lang"], info["skipped"], cached)


def normalize(text: str) -> str:
    """Case- and Unicode-insensitive form used to compare words with held-out names."""
    return unicodedata.normalize("NFC", text).casefold().strip()


def held_out_names(manifests: Sequence[str | Path]) -> set[str]:
    """Normalised ``text`` of every row of ``manifests`` (all languages)."""
    names: set[str] = set()
    for path in manifests:
        names.update(normalize(r["text"]) for r in read_manifest(path) if isinstance(r.get("text"), str))
    return names


def _import_wordfreq() -> Any:
    try:
        import wordfreq
    except ImportError as e:
        raise ImportError(f"the words generator needs the `wordfreq` package: {_INSTALL_WORDFREQ}") from e
    return wordfreq


def select_words(
    lang: str, n: int, skip_top: int, min_length: int, exclude: set[str], skipped: dict[str, int], wordlist: str = "best"
) -> list[str]:
    """The ``n`` most frequent words of ``lang`` after the ``skip_top`` first (mostly function words).

    Kept: alphabetic, at least ``min_length`` characters, not a held-out name (``exclude``, normalised);
    each exclusion is counted in ``skipped["held_out_name"]``.
    """
    wordfreq = _import_wordfreq()
    if lang not in wordfreq.available_languages(wordlist):
        raise ValueError(f"wordfreq has no {wordlist!r} word list for language {lang!r}")
    words: list[str] = []
    seen: set[str] = set()
    pool = wordfreq.top_n_list(lang, skip_top + 50 * n + 1000, wordlist=wordlist)
    for word in pool[skip_top:]:
        key = normalize(word)
        if len(key) < min_length or not key.isalpha() or key in seen:
            continue
        seen.add(key)
        if key in exclude:
            skipped["held_out_name"] = skipped.get("held_out_name", 0) + 1
            continue
        words.append(key)
        if len(words) == n:
            return words
    raise ValueError(f"wordfreq's {lang!r} list has only {len(words)} usable words after skipping; asked for {n}")


def _audio_path(lang: str, word: str, tag: str | None = None) -> str:
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).hexdigest()
    return f"audio/{lang}/{digest}.wav" if tag is None else f"audio/{lang}/{digest}~{tag}.wav"


def word_style(seed: int, lang: str, word: str, engines: Sequence[str] | None = None) -> dict:
    """The speaker and augmentation of one styled word clip (:func:`mmalign.datasets.espeak.sample_style`, or
    with ``engines`` :func:`mmalign.datasets.tts.sample_engine_style`), a function of ``(seed, lang, word)``
    (and ``engines``) only: a larger word list keeps every smaller list's clips."""
    import numpy as np

    from mmalign.data.augment import seed_for

    rng = np.random.default_rng(seed_for(seed, "words", lang, word))
    if engines is not None:
        from mmalign.datasets.tts import sample_engine_style

        return sample_engine_style(rng, lang, engines)
    return sample_style(rng, lang)


def build_words_dataset(
    root: str | Path,
    languages: Sequence[str] = ("en", "de", "es"),
    words_per_language: int = 2000,
    exclude: Sequence[str | Path] = (),
    skip_top: int = 200,
    min_length: int = 3,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 2,
    styled: bool = False,
    seed: int = 0,
    engines: Sequence[str] | None = None,
) -> WordsInfo:
    """Build (or find cached) a train-only manifest of frequent words spoken by espeak-ng.

    The same arguments (and held-out names) always give a byte-identical manifest; a finished folder
    with the same fingerprint is returned as is, an interrupted one is resumed (wavs are atomic).

    Args:
        root: Output folder (created).
        languages: ISO 639-1 codes with an espeak-ng voice and a wordfreq list.
        words_per_language: Words spoken per language.
        exclude: Manifests whose names must never be trained on (the held-out val/test splits).
        skip_top: Leave out this many most frequent words first (articles, pronouns, auxiliaries).
        min_length: Shortest word kept, in characters.
        progress: Show a tqdm bar.
        overwrite: Allow rebuilding a finished folder made with other arguments.
        workers: Parallel espeak-ng processes.
        styled: Speak every word with a random espeak-ng voice variant, rate and pitch, then a random speed/pitch
            perturbation, reverberation and noise (:func:`mmalign.datasets.espeak.sample_style`, drawn from
            ``seed``, the language and the word), BEFORE any encoder: robustness data for real voices
            (issue 17.3). The file name and the row's ``augment`` record name the style, so the feature cache
            keys each clip by its augmentation. False: the language's default voice, unaugmented.
        seed: Seed of the styles (``styled`` only).
        engines: With ``styled``: draw each word's speaker among the installed voices of these engines
            (:data:`mmalign.datasets.tts.ENGINES`, e.g. ``[espeak-ng, flite, festival]``; engines weighted
            equally, then a random rate and the same augmentations), written at 16 kHz; a language none of them
            speaks falls back to espeak-ng's variants, counted in ``info.json`` (``engines.espeak_fallback``).
            None (default): espeak-ng variants only, as before (folders built without it keep their fingerprint).

    Rows: ``{"id": "word-<lang>-<word>", "concept": "word:<word>", "lang", "text", "audio"}``. A word
    spelled alike in two languages shares its concept, so false-negative masking treats the pair as one.

    Raises:
        ImportError: ``wordfreq`` is not installed.
        FileNotFoundError: espeak-ng, or an ``exclude`` manifest, is missing.
        FileExistsError: ``root`` holds a finished dataset built with other arguments (and not
            ``overwrite``), or a non-empty folder this generator did not make.
        ValueError: Bad arguments (unknown language, too few words).
    """
    root = Path(root)
    languages = list(languages)
    if not languages or len(set(languages)) != len(languages):
        raise ValueError(f"languages must be a non-empty list without repeats, got {languages}")
    for lang in languages:
        if lang not in ESPEAK_VOICES:
            raise ValueError(f"no espeak-ng voice is known for language {lang!r}; choose from {sorted(ESPEAK_VOICES)}")
    if words_per_language < 1 or skip_top < 0 or min_length < 1:
        raise ValueError(f"need words_per_language >= 1, skip_top >= 0, min_length >= 1; got "
                         f"{words_per_language}, {skip_top}, {min_length}")
    wordfreq = _import_wordfreq()
    names = held_out_names(exclude)
    args = {"languages": languages, "words_per_language": words_per_language, "skip_top": skip_top,
            "min_length": min_length}
    if engines is not None and not styled:
        raise ValueError("engines chooses the speakers of styled words; pass styled=True with it")
    if styled:  # only then, so fingerprints of unstyled folders built before the option stay valid
        args.update(styled=True, seed=int(seed))
    if engines is not None:
        engines = list(engines)
        args.update(engines=engines)
    fingerprint = {
        "generator_version": GENERATOR_VERSION, "wordfreq_version": getattr(wordfreq, "__version__", "unknown"),
        "args": args, "held_out_names": hashlib.blake2b("\n".join(sorted(names)).encode(), digest_size=16).hexdigest(),
    }
    if (root / ".complete").is_file():
        try:
            old = json.loads((root / "info.json").read_text(encoding="utf-8"))
            same = {k: old.get(k) for k in fingerprint} == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return WordsInfo.fromdumps_json(root, cached=True)
        if not overwrite:
            raise FileExistsError(f"{root} already holds a words dataset built with other settings or held-out "
                                  "names; pass overwrite=True to rebuild it there, or choose another folder.")
    if root.is_dir() and not (root / OWNER_MARKER).is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and was not made by build_words_dataset; choose a new or empty folder.")

    espeak = find_espeak()
    check_voices(espeak, languages)
    skipped: dict[str, int] = {}
    words = {lang: select_words(lang, words_per_language, skip_top, min_length, names, skipped) for lang in languages}

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / OWNER_MARKER, GENERATOR_VERSION + "\n")
    (root / ".complete").unlink(missing_ok=True)
    for lang in languages:
        (root / "audio" / lang).mkdir(parents=True, exist_ok=True)

    jobs = [(lang, words[lang][i]) for i in range(words_per_language) for lang in languages]  # rank-interleaved
    styles = {job: word_style(seed, *job, engines=engines) for job in jobs} if styled else {}
    rate = 16_000 if engines is not None else None  # the engine layer writes Whisper's rate

    def audio_of(lang: str, word: str) -> str:
        return _audio_path(lang, word, styles[lang, word]["tag"] if styled else None)

    def run(job: tuple[str, str]) -> str | None:
        lang, word = job
        path = root / audio_of(lang, word)
        if path.is_file() and (wav_problem(path) if rate is None else wav_problem(path, rate)) is None:
            return None  # resumed: written atomically and still valid
        if styled:
            st = styles[job]
            from mmalign.data.augment import seed_for

            if engines is not None:
                from mmalign.datasets.tts import speak

                return speak(word, st["voice"], path, st["rate"], st["pitch"], st["aug"], seed=seed_for(seed, path.name))
            return synthesize_augmented(word, st["voice"], path, espeak, st["speed"], st["pitch"], st["aug"],
                                        seed=seed_for(seed, path.name))
        return synthesize(word, ESPEAK_VOICES[lang], path, espeak)

    rows = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (lang, word), problem in tqdm(zip(jobs, pool.map(run, jobs)), total=len(jobs), desc="espeak-ng words",
                                          unit="wav", disable=not progress):
            if problem is not None:
                skipped[f"speech_failed_{lang}"] = skipped.get(f"speech_failed_{lang}", 0) + 1
                tqdm.write(f"espeak-ng failed for {word!r} ({lang}): {problem}")
                continue
            row = {"id": f"word-{lang}-{word}", "concept": f"word:{word}", "lang": lang, "text": word,
                   "audio": audio_of(lang, word)}
            if styled:
                st = styles[lang, word]
                if engines is not None:
                    from mmalign.datasets.tts import style_record

                    row["augment"] = style_record(st)
                else:
                    row["augment"] = {"voice": st["voice"], "espeak_speed": st["speed"], "espeak_pitch": st["pitch"],
                                      **st["aug"].to_dict()}
            rows.append(row)
    atomic_write_text(root / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for lang in languages:
        prune(root / "audio" / lang, {Path(r["audio"]).name for r in rows if r["lang"] == lang})
    info = dict(fingerprint, num_rows=len(rows), rows_per_lang={lang: sum(r["lang"] == lang for r in rows) for lang in languages},
                skipped=dict(sorted(skipped.items())), exclude=[str(p) for p in exclude],
                provenance={"wordlist": "wordfreq 'best' (data CC BY-SA 4.0)",
                            "espeak_voices": {lang: ESPEAK_VOICES[lang] for lang in languages}})
    if engines is not None:
        from mmalign.datasets.espeak import engine_counts

        kept = {r["audio"] for r in rows}
        done = [{"style": styles[job], "row": {"lang": job[0]}} for job in jobs if audio_of(*job) in kept]
        info["engines"] = engine_counts(done, [None] * len(done))
    atomic_write_text(root / "info.json", dumps_json(info))
    atomic_write_text(root / ".complete", GENERATOR_VERSION + "\n")
    return WordsInfo.fromdumps_json(root, cached=False)
