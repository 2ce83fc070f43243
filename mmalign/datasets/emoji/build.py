"""A real, fully offline, trimodal multilingual dataset built from emoji.

Every emoji is one *concept*: its picture (rendered from the Noto Color Emoji font), its name in 14
languages (from the ``emoji`` package's CLDR annotations) and that name spoken by espeak-ng. Nothing is
downloaded: the font comes from Debian (``fonts-noto-color-emoji``), the names from PyPI, the voices from
the ``espeak-ng`` package.

Layout written under ``root``::

    images/<concept>.png          RGB, image_size x image_size, emoji on white
    audio/<concept>_<lang>.wav    22050 Hz mono PCM16, espeak-ng saying the name in <lang>
    train.jsonl val.jsonl test.jsonl   one row per (concept, lang); splits are disjoint by concept
    info.json                     counts, skipped items with reasons, arguments, provenance
    .complete                     written last; a folder without it is never trusted as finished

Usage::

    from mmalign.datasets.emoji import build_emoji_dataset
    info = build_emoji_dataset("data/emoji", max_concepts=400, speech_languages=("en", "de", "fr"))
    info.manifests["train"]  # Path to train.jsonl
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from mmalign.data.langs import EMOJI_LANGUAGES, ESPEAK_VOICES
from mmalign.datasets.emoji.concepts import EmojiConcept, emoji_concepts, import_emoji_package
from mmalign.datasets.emoji.render import EmojiRenderer, find_emoji_font, valid_image
from mmalign.datasets.espeak import SAMPLE_RATE, check_voices, find_espeak, synthesize, wav_problem
from mmalign.datasets.files import atomic_save_png, atomic_write_text, dumps_json, prune


GENERATOR_VERSION = "1"
SPLITS = ("train", "val", "test")
DEFAULT_SPEECH_LANGUAGES: tuple[str, ...] = ("en", "de", "es", "fr", "it", "pt", "ru")
# Written first into every folder we build: we only ever write into (and prune) folders that carry it.
OWNER_MARKER = ".mmalign-emoji"


@dataclass
class DatasetInfo:
    """What :func:`build_emoji_dataset` wrote (or found already written).

    Attributes:
        root: Dataset folder.
        manifests: Split name -> path of its JSONL manifest.
        num_concepts: Split name -> number of concepts.
        num_rows: Split name -> number of manifest rows (concepts x languages).
        num_audio: Split name -> rows that carry an ``audio`` field.
        languages: Text languages, in row order.
        speech_languages: Languages that have audio (empty when ``speech=False``).
        skipped: Reason -> number of emoji or audio files left out (nothing is dropped silently).
        cached: True when the call found a finished dataset and wrote nothing.
    """

    root: Path
    manifests: dict[str, Path]
    num_concepts: dict[str, int]
    num_rows: dict[str, int]
    num_audio: dict[str, int]
    languages: list[str]
    speech_languages: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    cached: bool = False

    @property
    def info_path(self) -> Path:
        return self.root / "info.json"

    @classmethod
    def fromdumps_json(cls, root: str | Path, cached: bool = True) -> "DatasetInfo":
        """Read ``root/info.json`` as written by :func:`build_emoji_dataset`."""
        root = Path(root)
        info = json.loads((root / "info.json").read_text(encoding="utf-8"))
        return cls(
            root=root,
            manifests={s: root / f"{s}.jsonl" for s in SPLITS},
            num_concepts=info["num_concepts"],
            num_rows=info["num_rows"],
            num_audio=info["num_audio"],
            languages=info["args"]["languages"],
            speech_languages=info["args"]["speech_languages"],
            skipped=info["skipped"],
            cached=cached,
        )


# --------------------------------------------------------------------------- tools



def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    def size(fraction: float) -> int:
        return 0 if fraction == 0 else max(1, round(n * fraction))

    n_test, n_val = size(test_fraction), size(val_fraction)
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{n} concepts are too few for val_fraction={val_fraction} and test_fraction={test_fraction}: "
            "no training concept would be left."
        )
    return n_val, n_test


def _validate_args(
    languages: Sequence[str], speech_languages: Sequence[str], val_fraction: float, test_fraction: float,
    image_size: int, max_concepts: int | None, speech_max_concepts: int | None,
) -> None:
    for lang in languages:
        if lang not in EMOJI_LANGUAGES:
            raise ValueError(f"Language {lang!r} has no emoji names; choose from {list(EMOJI_LANGUAGES)}.")
    for lang in speech_languages:
        if lang not in languages:
            raise ValueError(f"Speech language {lang!r} is not among the text languages {list(languages)}.")
        if lang not in ESPEAK_VOICES:
            raise ValueError(f"No espeak-ng voice is known for speech language {lang!r}.")
    if len(set(languages)) != len(languages) or not languages:
        raise ValueError(f"languages must be a non-empty list without repeats, got {list(languages)}.")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"Bad split fractions val={val_fraction}, test={test_fraction}: need 0 <= each, sum < 1.")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}.")
    for name, value in (("max_concepts", max_concepts), ("speech_max_concepts", speech_max_concepts)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive or None, got {value}.")


def _rows(concept: EmojiConcept, languages: Sequence[str], audio_langs: set[str]) -> Iterator[dict[str, str]]:
    for lang in languages:
        row = {
            "id": f"{concept.concept}-{lang}",
            "concept": concept.concept,
            "lang": lang,
            "text": concept.names[lang],
            "text_en": concept.names["en"],
            "image": f"images/{concept.concept}.png",
        }
        if lang in audio_langs:
            row["audio"] = f"audio/{concept.concept}_{lang}.wav"
        yield row


def build_emoji_dataset(
    root: str | Path,
    languages: Sequence[str] = EMOJI_LANGUAGES,
    speech_languages: Sequence[str] = DEFAULT_SPEECH_LANGUAGES,
    max_concepts: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    image_size: int = 96,
    seed: int = 0,
    speech: bool = True,
    speech_max_concepts: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    font_path: str | Path | None = None,
    workers: int = 2,
) -> DatasetInfo:
    """Build (or find cached) the emoji image / multilingual text / speech dataset under ``root``.

    Concepts are shuffled with ``seed``; with ``max_concepts`` the first ones that the font can draw
    are kept. Test and val concepts never appear in train. The same arguments always give
    byte-identical manifests; a finished folder with the same arguments is returned as is.

    Args:
        root: Output folder (created).
        languages: Text languages (ISO 639-1, from :data:`EMOJI_LANGUAGES`); one manifest row per
            concept and language. Only emoji named in all of them (and English) are kept.
        speech_languages: Languages spoken by espeak-ng; must be among ``languages``.
        max_concepts: Keep at most this many concepts (None: all that render, about 1.4k).
        val_fraction: Share of concepts in ``val.jsonl``.
        test_fraction: Share of concepts in ``test.jsonl``.
        image_size: Side of the square PNGs.
        seed: Shuffles concepts before subsetting and splitting.
        speech: False builds images and text only (espeak-ng not needed).
        speech_max_concepts: Speak only the first this-many selected concepts (in shuffled order,
            so across all splits); rows of the others have no ``audio`` field.
        progress: Show tqdm bars.
        overwrite: Allow rebuilding a finished folder made with other arguments.
        font_path: NotoColorEmoji.ttf (default: ``$MMALIGN_EMOJI_FONT`` or the Debian path).
        workers: Parallel espeak-ng processes.

    Returns:
        The :class:`DatasetInfo` of the folder.

    Raises:
        FileNotFoundError: The emoji font, or espeak-ng when ``speech`` is on, is missing.
        FileExistsError: ``root`` holds a finished dataset built with other arguments and
            ``overwrite`` is False.
        ValueError: Bad arguments (unknown language, fractions, too few concepts).
    """
    root = Path(root)
    languages = list(languages)
    speech_languages = list(speech_languages) if speech else []
    _validate_args(languages, speech_languages, val_fraction, test_fraction, image_size, max_concepts,
                   speech_max_concepts)
    emoji_pkg = import_emoji_package()
    args = {
        "languages": languages,
        "speech_languages": speech_languages,
        "max_concepts": max_concepts,
        "speech_max_concepts": speech_max_concepts if speech_languages else None,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "image_size": image_size,
        "seed": seed,
    }
    fingerprint = {"generator_version": GENERATOR_VERSION, "emoji_version": emoji_pkg.__version__, "args": args}

    cached = _cached_info(root, fingerprint, overwrite)
    if cached is not None:
        return cached

    font = find_emoji_font(font_path)
    espeak = find_espeak() if speech_languages else None
    if espeak is not None:
        check_voices(espeak, speech_languages)

    _claim_folder(root)
    (root / "images").mkdir(exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    (root / ".complete").unlink(missing_ok=True)  # from here on the folder is unfinished

    candidates, skipped = emoji_concepts(languages)
    random.Random(seed).shuffle(candidates)

    # Images: walk the shuffled candidates until enough render.
    renderer = EmojiRenderer(font, image_size)
    selected: list[EmojiConcept] = []
    target = len(candidates) if max_concepts is None else min(max_concepts, len(candidates))
    bar = tqdm(total=target, desc="render emoji", unit="img", disable=not progress)
    for concept in candidates:
        if len(selected) >= target:
            break
        path = root / "images" / f"{concept.concept}.png"
        if not valid_image(path, image_size):  # files are written atomically: a valid one is final
            image, reason = renderer.render(concept.emoji)
            if image is None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            atomic_save_png(image, path)
        selected.append(concept)
        bar.update(1)
    bar.close()

    n_val, n_test = _split_sizes(len(selected), val_fraction, test_fraction)
    split_of = {}
    for i, concept in enumerate(selected):
        split_of[concept.concept] = "test" if i < n_test else "val" if i < n_test + n_val else "train"

    # Speech.
    spoken = selected if speech_max_concepts is None else selected[:speech_max_concepts]
    audio_ok = _synthesize_all(root, spoken, speech_languages, espeak, workers, progress, skipped)

    # Manifests, sorted by concept id for stable, readable files.
    info: dict[str, Any] = {
        "num_concepts": {}, "num_rows": {}, "num_audio": {}, "rows_per_lang": {}, "audio_per_lang": {},
    }
    for split in SPLITS:
        concepts = sorted((c for c in selected if split_of[c.concept] == split), key=lambda c: c.concept)
        rows = [
            row for c in concepts
            for row in _rows(c, languages, {lang for lang in speech_languages if (c.concept, lang) in audio_ok})
        ]
        atomic_write_text(root / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        info["num_concepts"][split] = len(concepts)
        info["num_rows"][split] = len(rows)
        info["num_audio"][split] = sum("audio" in r for r in rows)
        info["rows_per_lang"][split] = {lang: sum(r["lang"] == lang for r in rows) for lang in languages}
        info["audio_per_lang"][split] = {
            lang: sum(r["lang"] == lang and "audio" in r for r in rows) for lang in speech_languages
        }

    prune(root / "images", {f"{c.concept}.png" for c in selected})
    prune(root / "audio", {f"{concept}_{lang}.wav" for concept, lang in audio_ok})

    info.update(
        fingerprint,
        skipped=dict(sorted(skipped.items())),
        num_candidates=len(candidates),
        emoji={c.concept: c.emoji for c in sorted(selected, key=lambda c: c.concept)},
        provenance={
            "font": font.name,
            "espeak_voices": {lang: ESPEAK_VOICES[lang] for lang in speech_languages},
            "sample_rate": SAMPLE_RATE,
        },
    )
    atomic_write_text(root / "info.json", dumps_json(info))
    atomic_write_text(root / ".complete", GENERATOR_VERSION + "\n")
    return DatasetInfo.fromdumps_json(root, cached=False)


def _claim_folder(root: Path) -> None:
    """Mark ``root`` as ours; refuse a non-empty folder something else made (we prune in it)."""
    marker = root / OWNER_MARKER
    if root.is_dir() and not marker.is_file() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and was not made by build_emoji_dataset; choose a new or empty folder."
        )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, GENERATOR_VERSION + "\n")


def _cached_info(root: Path, fingerprint: dict[str, Any], overwrite: bool) -> DatasetInfo | None:
    """The finished dataset in ``root`` if it matches ``fingerprint``; raise if it differs."""
    if not (root / ".complete").is_file():
        return None  # nothing, or an interrupted build: resume it
    try:
        old = json.loads((root / "info.json").read_text(encoding="utf-8"))
        old_fingerprint = {k: old[k] for k in fingerprint}
    except (OSError, ValueError, KeyError):
        old_fingerprint = None
    if old_fingerprint == fingerprint:
        return DatasetInfo.fromdumps_json(root, cached=True)
    if overwrite:
        return None
    differences = (
        ["info.json unreadable"] if old_fingerprint is None else
        [f"{k}: {old_fingerprint['args'].get(k)!r} -> {v!r}" for k, v in fingerprint["args"].items()
         if old_fingerprint["args"].get(k) != v]
        + [f"{k}: {old_fingerprint[k]!r} -> {fingerprint[k]!r}" for k in fingerprint
           if k != "args" and old_fingerprint[k] != fingerprint[k]]
    )
    raise FileExistsError(
        f"{root} already holds an emoji dataset built with other settings ({'; '.join(differences)}); "
        "pass overwrite=True to rebuild it there, or choose another folder."
    )


def _synthesize_all(
    root: Path, concepts: Sequence[EmojiConcept], languages: Sequence[str], espeak: str | None,
    workers: int, progress: bool, skipped: dict[str, int],
) -> set[tuple[str, str]]:
    """Speak every (concept, language); returns the pairs that have a valid wav."""
    jobs = [(c, lang) for c in concepts for lang in languages]
    if not jobs:
        return set()
    assert espeak is not None

    def run(job: tuple[EmojiConcept, str]) -> str | None:
        concept, lang = job
        path = root / "audio" / f"{concept.concept}_{lang}.wav"
        if path.is_file() and wav_problem(path) is None:
            return None  # resumed: written atomically and still valid
        return synthesize(concept.names[lang], ESPEAK_VOICES[lang], path, espeak)

    done: set[tuple[str, str]] = set()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(run, jobs)  # keeps job order: deterministic bookkeeping
        for (concept, lang), problem in tqdm(
            zip(jobs, results), total=len(jobs), desc="espeak-ng", unit="wav", disable=not progress
        ):
            if problem is None:
                done.add((concept.concept, lang))
            else:
                key = f"speech_failed_{lang}"
                skipped[key] = skipped.get(key, 0) + 1
                tqdm.write(f"espeak-ng failed for {concept.concept!r} ({lang}): {problem}")
    return done
