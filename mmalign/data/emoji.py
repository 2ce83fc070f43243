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

    from mmalign.data.emoji import build_emoji_dataset
    info = build_emoji_dataset("data/emoji", max_concepts=400, speech_languages=("en", "de", "fr"))
    info.manifests["train"]  # Path to train.jsonl
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from mmalign.data.langs import EMOJI_LANGUAGES, ESPEAK_VOICES

GENERATOR_VERSION = "1"
SPLITS = ("train", "val", "test")
DEFAULT_SPEECH_LANGUAGES: tuple[str, ...] = ("en", "de", "es", "fr", "it", "pt", "ru")
SAMPLE_RATE = 22050  # espeak-ng's native rate; we check every file has it
# NotoColorEmoji.ttf is a CBDT bitmap font with a single strike: 109 px is the only size it draws at.
FONT_SIZE = 109
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)
FONT_ENV = "MMALIGN_EMOJI_FONT"
# Written first into every folder we build: we only ever write into (and prune) folders that carry it.
OWNER_MARKER = ".mmalign-emoji"
_INSTALL_FONT = "install it with `apt-get install fonts-noto-color-emoji`"
_INSTALL_ESPEAK = "install it with `apt-get install espeak-ng`"

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
    def from_json(cls, root: str | Path, cached: bool = True) -> "DatasetInfo":
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


def find_emoji_font(font_path: str | Path | None = None) -> Path:
    """Locate NotoColorEmoji.ttf: ``font_path``, then ``$MMALIGN_EMOJI_FONT``, then Debian's paths.

    Raises:
        FileNotFoundError: The font is not there, with the apt command that installs it.
    """
    explicit = font_path or os.environ.get(FONT_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"Emoji font {path} does not exist; {_INSTALL_FONT}.")
        return path
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "The Noto Color Emoji font (NotoColorEmoji.ttf) was not found in "
        f"{', '.join(FONT_CANDIDATES)}; {_INSTALL_FONT} (or set ${FONT_ENV} to its path)."
    )


def find_espeak() -> str:
    """Path of the ``espeak-ng`` executable.

    Raises:
        FileNotFoundError: espeak-ng is not on PATH, with the apt command that installs it.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            f"espeak-ng is not on PATH but is needed to synthesise speech; {_INSTALL_ESPEAK} "
            "(or pass speech=False to build images and text only)."
        )
    return exe


def _import_emoji_package() -> Any:
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
    emoji_pkg = _import_emoji_package()
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


class EmojiRenderer:
    """Draws emoji with a CBDT colour font; tells apart glyphs the font lacks.

    Args:
        font_path: NotoColorEmoji.ttf.
        image_size: Output side in pixels.
    """

    def __init__(self, font_path: str | Path, image_size: int) -> None:
        self.font = ImageFont.truetype(str(font_path), FONT_SIZE)
        self.image_size = image_size
        # A glyph cell is ~136 x 128 at 109 px; the canvas is 3 cells wide so that a sequence the font
        # cannot ligate shows up as several glyphs side by side instead of being cropped.
        self.cell = (136, 128)

    def render(self, emoji_str: str) -> tuple[Image.Image | None, str | None]:
        """Render ``emoji_str``.

        Returns:
            (RGB image on white, None), or (None, reason) when the font lacks it
            (``"not_in_font"``: blank or .notdef glyph; ``"multi_glyph"``: drawn as several glyphs).
        """
        width, height = self.cell
        canvas = Image.new("RGBA", (3 * width, height), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), emoji_str, font=self.font, embedded_color=True)
        alpha = np.asarray(canvas.getchannel("A"))  # [H, 3W]
        # Missing glyphs draw nothing in Noto Color Emoji (its .notdef is empty); a near-empty
        # drawing is treated the same.
        if (alpha > 32).sum() < 0.01 * width * height:
            return None, "not_in_font"
        box = canvas.getbbox()
        if box is None:
            return None, "not_in_font"
        if box[2] - box[0] > 1.5 * width:
            return None, "multi_glyph"
        glyph = canvas.crop((0, 0, width, height))
        background = Image.new("RGBA", glyph.size, (255, 255, 255, 255))
        square = Image.alpha_composite(background, glyph).convert("RGB")
        square = _pad_to_square(square)
        return square.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS), None


def _pad_to_square(image: Image.Image) -> Image.Image:
    side = max(image.size)
    out = Image.new("RGB", (side, side), (255, 255, 255))
    out.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return out


def _valid_image(path: Path, image_size: int) -> bool:
    try:
        with Image.open(path) as image:
            return image.size == (image_size, image_size) and image.mode == "RGB"
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- speech


def wav_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable espeak-ng wav (None when it is: 22050 Hz, mono, not silent)."""
    import soundfile as sf

    try:
        audio, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (OSError, RuntimeError, sf.LibsndfileError) as err:
        return f"unreadable ({err})"
    if sample_rate != SAMPLE_RATE:
        return f"sample rate {sample_rate} != {SAMPLE_RATE}"
    if audio.shape[1] != 1:
        return f"{audio.shape[1]} channels, expected mono"
    if audio.shape[0] < SAMPLE_RATE // 20:
        return f"only {audio.shape[0]} samples"
    if float(np.abs(audio).max()) < 1e-3:
        return "silent"
    return None


def synthesize(text: str, voice: str, path: Path, espeak: str) -> str | None:
    """Speak ``text`` with espeak-ng into ``path`` atomically.

    Returns:
        None on success, else why it failed (the target is then left untouched).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Text goes through stdin so a name can never be parsed as an option.
        proc = subprocess.run(
            [espeak, "-v", voice, "-w", str(tmp), "--stdin"],
            input=text.encode("utf-8"),
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0:
            return f"espeak-ng exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}"
        problem = wav_problem(tmp)
        if problem is not None:
            return problem
        os.replace(tmp, path)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _check_voices(espeak: str, languages: Sequence[str]) -> None:
    listing = subprocess.run([espeak, "--voices"], capture_output=True, text=True).stdout
    available = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    for lang in languages:
        voice = ESPEAK_VOICES[lang]
        if voice not in available:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} for language {lang!r}; see `espeak-ng --voices`.")


# --------------------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


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


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove files of ours in ``folder`` that the new manifests do not point at (and stale temps)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and path.name not in keep and path.suffix in {".png", ".wav", ".tmp"}:
            path.unlink()


# --------------------------------------------------------------------------- builder


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
    emoji_pkg = _import_emoji_package()
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
        _check_voices(espeak, speech_languages)

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
        if not _valid_image(path, image_size):  # files are written atomically: a valid one is final
            image, reason = renderer.render(concept.emoji)
            if image is None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            _atomic_save_png(image, path)
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
        _atomic_write_text(root / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        info["num_concepts"][split] = len(concepts)
        info["num_rows"][split] = len(rows)
        info["num_audio"][split] = sum("audio" in r for r in rows)
        info["rows_per_lang"][split] = {lang: sum(r["lang"] == lang for r in rows) for lang in languages}
        info["audio_per_lang"][split] = {
            lang: sum(r["lang"] == lang and "audio" in r for r in rows) for lang in speech_languages
        }

    _prune(root / "images", {f"{c.concept}.png" for c in selected})
    _prune(root / "audio", {f"{concept}_{lang}.wav" for concept, lang in audio_ok})

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
    _atomic_write_text(root / "info.json", _json(info))
    _atomic_write_text(root / ".complete", GENERATOR_VERSION + "\n")
    return DatasetInfo.from_json(root, cached=False)


def _claim_folder(root: Path) -> None:
    """Mark ``root`` as ours; refuse a non-empty folder something else made (we prune in it)."""
    marker = root / OWNER_MARKER
    if root.is_dir() and not marker.is_file() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and was not made by build_emoji_dataset; choose a new or empty folder."
        )
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(marker, GENERATOR_VERSION + "\n")


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
        return DatasetInfo.from_json(root, cached=True)
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
