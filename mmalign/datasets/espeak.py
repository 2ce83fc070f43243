"""Speech from espeak-ng for the offline generators: find the binary, check voices, synthesize and validate WAVs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

from mmalign.data.langs import ESPEAK_VOICES


SAMPLE_RATE = 22050  # espeak-ng's native rate; we check every file has it
_INSTALL_ESPEAK = "install it with `apt-get install espeak-ng`"


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


def wav_problem(path: Path, sample_rate: int = SAMPLE_RATE) -> str | None:
    """Why ``path`` is not a usable wav (None when it is: ``sample_rate`` Hz (espeak-ng's 22050 by default), mono,
    at least 50 ms, not silent)."""
    expected = sample_rate
    import soundfile as sf

    try:
        audio, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (OSError, RuntimeError, sf.LibsndfileError) as err:
        return f"unreadable ({err})"
    if sample_rate != expected:
        return f"sample rate {sample_rate} != {expected}"
    if audio.shape[1] != 1:
        return f"{audio.shape[1]} channels, expected mono"
    if audio.shape[0] < expected // 20:
        return f"only {audio.shape[0]} samples"
    if float(np.abs(audio).max()) < 1e-3:
        return "silent"
    return None


def publish_wav(tmp: Path, path: Path, sample_rate: int = SAMPLE_RATE) -> str | None:
    """Move the finished clip ``tmp`` to ``path`` if :func:`wav_problem` finds nothing wrong; else why not (the
    target is then left untouched; the caller removes ``tmp``)."""
    problem = wav_problem(tmp, sample_rate=sample_rate)
    if problem is not None:
        return problem
    os.replace(tmp, path)
    return None


def synthesize(text: str, voice: str, path: Path, espeak: str) -> str | None:
    """Speak ``text`` with espeak-ng into ``path`` atomically (the voice's own rate and pitch).

    Returns:
        None on success, else why it failed (the target is then left untouched).
    """
    return synthesize_styled(text, voice, path, espeak)


def check_voices(espeak: str, languages: Sequence[str]) -> None:
    listing = subprocess.run([espeak, "--voices"], capture_output=True, text=True).stdout
    available = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    for lang in languages:
        voice = ESPEAK_VOICES[lang]
        if voice not in available:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} for language {lang!r}; see `espeak-ng --voices`.")


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- robustness data (issue 17.3)
#: espeak-ng voice variants (``-v <voice>+<variant>``) that sound like different speakers, not effects.
VOICE_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                                   "klatt", "klatt2", "klatt4", "grandpa", "grandma", "adam", "linda", "steph")
#: Ranges of the speaking rate (``-s``, words per minute; espeak-ng's default is 175) and pitch (``-p`` 0-99, 50).
ESPEAK_SPEED = (130, 210)
ESPEAK_PITCH = (25, 75)

#: Sentence templates per language over a concept name: sentence-length utterances built offline.
SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("I can see the {}.", "Here is a picture of a {}.", "Please show me the {} again.",
           "My friend told me about the {} yesterday.", "Is that a {} over there?"),
    "de": ("Ich sehe hier: {}.", "Das Bild zeigt {}.", "Bitte zeig mir noch einmal {}.",
           "Mein Freund hat mir gestern von {} erzählt.", "Ist das dort drüben {}?"),
    "es": ("Puedo ver {}.", "Aquí hay una imagen de {}.", "Por favor, muéstrame otra vez {}.",
           "Mi amigo me habló ayer de {}.", "¿Es eso de allí {}?"),
    "fr": ("Je vois {}.", "Voici une image de {}.", "Montre-moi encore {}, s'il te plaît.",
           "Mon ami m'a parlé hier de {}.", "Est-ce que c'est {} là-bas ?"),
    "it": ("Vedo {}.", "Ecco un'immagine di {}.", "Per favore, mostrami ancora {}.",
           "Il mio amico mi ha parlato ieri di {}.", "Quello laggiù è {}?"),
    "pt": ("Eu vejo {}.", "Aqui está uma imagem de {}.", "Por favor, mostra-me outra vez {}.",
           "O meu amigo falou-me ontem de {}.", "Aquilo ali é {}?"),
    "ru": ("Я вижу {}.", "Вот картинка: {}.", "Пожалуйста, покажи мне ещё раз {}.",
           "Мой друг вчера рассказал мне про {}.", "Это там {}?"),
}


def synthesize_styled(text: str, voice: str, path: Path, espeak: str, speed: int | None = None,
                      pitch: int | None = None) -> str | None:
    """Speak ``text`` into ``path`` atomically, with a speaking rate (``-s``) and pitch (``-p``) when given;
    ``voice`` may carry ``+variant``. Text goes through stdin so a name can never be parsed as an option.

    Returns:
        None on success, else why it failed (the target is then left untouched).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cmd = [espeak, "-v", voice, "-w", str(tmp)]
    cmd += ["-s", str(int(speed))] if speed is not None else []
    cmd += ["-p", str(int(pitch))] if pitch is not None else []
    try:
        proc = subprocess.run([*cmd, "--stdin"], input=text.encode("utf-8"), capture_output=True, timeout=120)
        if proc.returncode != 0:
            return f"espeak-ng exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-200:]}"
        return publish_wav(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def synthesize_augmented(text: str, voice: str, path: Path, espeak: str, speed: int | None, pitch: int | None,
                         aug, seed: int) -> str | None:
    """:func:`synthesize_styled`, then ``aug`` (a :class:`mmalign.data.augment.SpeechAugment`, seeded by ``seed``)
    applied to the waveform; ``path`` is written atomically (PCM16 at espeak-ng's rate).

    Returns:
        None on success, else why it failed (the target is then left untouched).
    """
    import soundfile as sf

    from mmalign.data.augment import apply_augment

    dry = path.with_name(f".{path.name}.{os.getpid()}.dry.wav")
    try:
        problem = synthesize_styled(text, voice, dry, espeak, speed, pitch)
        if problem is not None:
            return problem
        wave, rate = sf.read(str(dry), dtype="float32")
        wet = apply_augment(wave, rate, aug, seed=seed)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            sf.write(str(tmp), wet, rate, subtype="PCM_16", format="WAV")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return None
    finally:
        dry.unlink(missing_ok=True)


def sample_style(rng: np.random.Generator, lang: str) -> dict:
    """A random espeak-ng speaker for ``lang`` (voice variant, rate, pitch) and a random waveform augmentation:
    ``{"voice", "speed", "pitch", "aug", "tag"}``, the tag naming all of them (for file names and cache keys)."""
    from mmalign.data.augment import sample_augment

    variant = str(rng.choice(VOICE_VARIANTS))
    speed = int(rng.integers(ESPEAK_SPEED[0], ESPEAK_SPEED[1] + 1))
    pitch = int(rng.integers(ESPEAK_PITCH[0], ESPEAK_PITCH[1] + 1))
    aug = sample_augment(rng)
    return {"voice": f"{ESPEAK_VOICES[lang]}+{variant}", "speed": speed, "pitch": pitch, "aug": aug,
            "tag": f"{variant}_s{speed}_p{pitch}_{aug.name}"}


def _robust_jobs(rows: Sequence[dict], variants: int, sentences: int, seed: int,
                 engines: Sequence[str] | None = None) -> list[dict]:
    """The augmented clips to make: per row ``variants`` styled names, per row ``sentences`` styled sentences.
    With ``engines`` each clip's speaker is drawn by :func:`mmalign.datasets.tts.sample_engine_style`."""
    from mmalign.data.augment import sample_augment, seed_for

    jobs = []
    for row in rows:
        rng = np.random.default_rng(seed_for(seed, row["id"]))
        templates = SENTENCE_TEMPLATES.get(row["lang"], ())
        kinds = ["name"] * variants + (["sentence"] * sentences if templates else [])
        for k, kind in enumerate(kinds):
            if engines is not None:
                from mmalign.datasets.tts import sample_engine_style

                st = sample_engine_style(rng, row["lang"], engines)
                text = row["text"] if kind == "name" else templates[int(rng.integers(len(templates)))].format(row["text"])
                jobs.append({"row": row, "kind": kind, "text": text, "style": st, "tag": f"{kind[0]}{k}_{st['tag']}"})
                continue
            variant = str(rng.choice(VOICE_VARIANTS))
            speed = int(rng.integers(ESPEAK_SPEED[0], ESPEAK_SPEED[1] + 1))
            pitch = int(rng.integers(ESPEAK_PITCH[0], ESPEAK_PITCH[1] + 1))
            aug = sample_augment(rng)
            text = row["text"] if kind == "name" else templates[int(rng.integers(len(templates)))].format(row["text"])
            voice = f"{ESPEAK_VOICES[row['lang']]}+{variant}"
            tag = f"{kind[0]}{k}_{variant}_s{speed}_p{pitch}_{aug.name}"
            jobs.append({"row": row, "kind": kind, "text": text, "voice": voice, "speed": speed, "pitch": pitch,
                         "aug": aug, "tag": tag})
    return jobs


def build_robust_speech(
    root: str | Path,
    rows: Sequence[dict],
    variants: int = 1,
    sentences: int = 1,
    seed: int = 0,
    exclude_concepts: Sequence[str] = (),
    workers: int = 1,
    progress: bool = True,
    engines: Sequence[str] | None = None,
) -> dict:
    """Write augmented espeak-ng speech for ``rows`` (training rows with ``id/concept/lang/text``) under ``root``.

    For every row: ``variants`` clips of its name and ``sentences`` clips of a sentence template around it
    (:data:`SENTENCE_TEMPLATES`), each spoken by a random voice variant (:data:`VOICE_VARIANTS`) at a random
    espeak-ng rate and pitch, then augmented by a random :func:`mmalign.data.augment.sample_augment`
    (speed, pitch, reverberation, noise) before any encoder sees it. Each clip is its own file
    ``audio/<row id>~<tag>.wav`` whose tag names the voice, rate, pitch and augmentation, so the feature cache
    holds it as a distinct row; the manifest ``train.jsonl`` has rows ``<id>~<tag>`` with the row's concept and
    language, the spoken ``text`` (the sentence for sentence clips) and an ``augment`` record. Deterministic by
    ``seed``; existing clips are kept (re-runs only make what is missing).

    Args:
        exclude_concepts: Held-out concepts; rows of these are refused (counted in ``info.json``), so test
            concepts never leak into training speech.
        engines: None (default): espeak-ng voice variants as above, 22050 Hz. A list of
            :data:`mmalign.datasets.tts.ENGINES` (``["espeak-ng", "flite", "festival"]``): each clip's speaker is
            drawn among the installed voices of those engines for the row's language (engines weighted equally,
            :func:`mmalign.datasets.tts.sample_engine_style`), at a random rate, written at 16 kHz; a language
            none of them speaks falls back to espeak-ng's variants, counted in ``info.json`` (``engines``). The
            tag (file name, row id) then names engine, voice, rate, pitch and augmentation.

    Returns:
        The ``info.json`` record.
    """
    import json

    from tqdm.auto import tqdm

    from mmalign.data.augment import seed_for

    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    excluded = set(exclude_concepts)
    kept = [r for r in rows if r["concept"] not in excluded and r.get("lang") in SENTENCE_TEMPLATES]
    espeak = find_espeak()
    engines = list(engines) if engines is not None else None
    jobs = _robust_jobs(kept, variants, sentences, seed, engines)

    def make(job: dict) -> str | None:
        name = f"{job['row']['id']}~{job['tag']}.wav"
        path = root / "audio" / name
        if path.is_file():
            return None
        if engines is not None:
            from mmalign.datasets.tts import speak

            st = job["style"]
            return speak(job["text"], st["voice"], path, st["rate"], st["pitch"], st["aug"], seed=seed_for(seed, name))
        return synthesize_augmented(job["text"], job["voice"], path, espeak, job["speed"], job["pitch"], job["aug"],
                                    seed=seed_for(seed, name))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(tqdm(pool.map(make, jobs), total=len(jobs), desc="robust speech", unit="wav",
                             disable=not progress))
    out_rows, skipped = [], {}
    for job, problem in zip(jobs, problems):
        row = job["row"]
        if problem is not None:
            skipped[f"{row['id']}~{job['tag']}"] = problem
            continue
        out_rows.append({
            "id": f"{row['id']}~{job['tag']}", "concept": row["concept"], "lang": row["lang"], "text": job["text"],
            "text_en": row.get("text_en", row["text"]), "kind": job["kind"],
            "audio": f"audio/{row['id']}~{job['tag']}.wav",
            "augment": _augment_record(job),
        })
    tmp = root / f".train.jsonl.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    os.replace(tmp, root / "train.jsonl")
    info = {"args": {"variants": variants, "sentences": sentences, "seed": seed}, "source_rows": len(rows),
            "excluded_rows": len(rows) - len(kept), "clips": len(out_rows), "skipped": skipped}
    if engines is not None:  # only then: info of folders built before the option stays as it was
        info["args"]["engines"] = engines
        info["engines"] = engine_counts(jobs, problems)
    (root / "info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return info


def _augment_record(job: dict) -> dict:
    if "style" in job:
        from mmalign.datasets.tts import style_record

        return style_record(job["style"])
    return {"voice": job["voice"], "espeak_speed": job["speed"], "espeak_pitch": job["pitch"], **job["aug"].to_dict()}


def engine_counts(jobs: Sequence[dict], problems: Sequence[str | None]) -> dict:
    """Clips written per engine, per voice and per language, and those that fell back to espeak-ng because no
    requested engine speaks their language (``espeak_fallback``: language -> clips)."""
    clips: dict[str, int] = {}
    voices: dict[str, int] = {}
    per_lang: dict[str, dict[str, int]] = {}
    fallback: dict[str, int] = {}
    for job, problem in zip(jobs, problems):
        if problem is not None:
            continue
        st, lang = job["style"], job["row"]["lang"]
        clips[st["voice"].engine] = clips.get(st["voice"].engine, 0) + 1
        voices[st["voice"].key] = voices.get(st["voice"].key, 0) + 1
        per_lang.setdefault(lang, {}).setdefault(st["voice"].engine, 0)
        per_lang[lang][st["voice"].engine] += 1
        if st["fallback"]:
            fallback[lang] = fallback.get(lang, 0) + 1
    return {"clips": dict(sorted(clips.items())), "voices": dict(sorted(voices.items())),
            "per_language": dict(sorted(per_lang.items())), "espeak_fallback": dict(sorted(fallback.items()))}
