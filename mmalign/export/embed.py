"""``mmalign embed``: embed a file of texts, image paths or audio paths with an export (or an ensemble).

* **What is embedded** is inferred from the input: a ``.txt`` list whose lines all end in an image (audio)
  extension is a list of images (audio clips), any other list is texts (with a warning when lines look like
  file paths); a manifest or table with one media/text field uses it, and ``--field`` picks one otherwise.
* **Repeated inputs are encoded once** (a test manifest lists each image once per language: 3,850 rows,
  275 images), then the embeddings are scattered back to the rows, in the input's order.
* The output is written atomically (a temporary file beside it, then ``os.replace``): a kill or a full
  disk never leaves a broken ``.npy`` under the output's name, and an existing output stays as it was.
"""

from __future__ import annotations

import codecs
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmalign.export.ensemble import AlignedEnsemble
from mmalign.export.model import _FIELD_MODALITY, AlignedModel

#: File extensions read as images / audio clips (what Pillow and soundfile/librosa open).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
#: Fields a manifest row may hold an item to embed in, in the order they are tried.
ITEM_FIELDS = ("text", "image", "audio")


@dataclass
class EmbedInput:
    """What :func:`read_items` found: the items, their languages (``None``: not given) and the field."""

    items: list[Any]
    langs: list[str] | None
    field: str


def _read_lines(path: Path, on_error: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of a ``.txt`` list; a line that is not UTF-8 raises naming it, or is skipped."""
    from mmalign.data.manifest import ManifestRowError
    from mmalign.data.policy import BadInputReport

    report = BadInputReport()
    out = []
    for i, data in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n"), 1):
        try:
            out.append((i, data.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            detail = f"byte 0x{data[e.start]:02x} at column {e.start + 1} is not UTF-8; the input must be UTF-8 encoded"
            report.handle(ManifestRowError(path, i, f"<line {i}>", "<line>", "invalid utf-8", detail), on_error)
    if report:
        print(f"[mmalign embed] {path}: " + report.summary("lines skipped"))
    return out


def _media_kind(line: str) -> str | None:
    """``"image"``/``"audio"`` when ``line`` ends in such a file extension, else None."""
    low = line.strip().lower()
    return "image" if low.endswith(IMAGE_EXTENSIONS) else "audio" if low.endswith(AUDIO_EXTENSIONS) else None


def infer_list_field(path: Path, lines: Sequence[str]) -> str:
    """The field of a ``.txt`` list: ``image``/``audio`` when every line names such a file, else ``text``.

    Raises:
        ValueError: The lines mix image and audio files.
    """
    kinds = {_media_kind(line) for line in lines}
    if kinds == {"image"} or kinds == {"audio"}:
        return kinds.pop()  # type: ignore[return-value]
    if kinds == {"image", "audio"}:
        raise ValueError(f"{path}: the lines mix image and audio files; embed one modality per file (or pass --field)")
    return "text"


def _warn_paths_as_text(path: Path, lines: Sequence[str]) -> None:
    """Warn when lines of a list embedded as text look like file paths (a forgotten ``--field image``)."""
    looks = [line for i, line in enumerate(lines) if _media_kind(line)
             or (i < 1000 and len(line) < 1000 and (path.parent / line.strip()).is_file())]  # bounded stat calls
    if looks:
        kinds = sorted({k for k in map(_media_kind, looks) if k})
        hint = f"--field {kinds[0]}" if len(kinds) == 1 else "--field image or --field audio"
        warnings.warn(f"{path}: {len(looks)} of {len(lines)} lines look like file paths (e.g. {looks[0]!r}) and are "
                      f"embedded as TEXT; to embed the files, pass {hint}", UserWarning, stacklevel=3)


def infer_row_field(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    """The field of a manifest/table: the only one of ``text``/``image``/``audio`` its rows hold.

    Raises:
        ValueError: Rows hold several (or none) of them: the message lists them and asks for ``--field``.
    """
    present = [f for f in ITEM_FIELDS if any(r.get(f) not in (None, "") for r in rows)]
    if len(present) == 1:
        return present[0]
    fields = sorted({k for r in rows[:100] for k in r if k not in ("id", "concept", "lang")})
    what = f"holds {', '.join(present)}" if present else "holds none of text, image, audio"
    raise ValueError(f"{path} {what}: pass --field to say which to embed (its fields: {', '.join(fields)})")


def read_items(path: Path, field: str | None = None, on_error: str = "error") -> EmbedInput:
    """Items (and languages, for manifests) from a ``.txt`` (one item per line) or any data source.

    Args:
        path: ``.txt`` list, ``.jsonl``/``.csv`` manifest, or any source of :mod:`mmalign.data.sources`.
        field: Field to embed; ``None``: inferred (see the module docstring).
        on_error: ``"error"`` or ``"skip"`` for undecodable lines and bad rows.
    """
    from mmalign.data.policy import ON_ERROR, check_choice

    check_choice("on_error", on_error, ON_ERROR)
    if path.suffix != ".txt" and not (path.is_dir() or "{" in str(path) or str(path).endswith(".yaml")):
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix != ".txt":  # a manifest or any source of mmalign.data.sources (Parquet, HF folder, shards...)
        from mmalign.data.sources import open_source

        source = open_source(str(path), on_error=on_error)
        rows = list(source)
        if source.report:
            print(f"[mmalign embed] {path}: " + source.report.summary("rows skipped"))
        if not rows:
            raise ValueError(f"{path}: no rows to embed")
        field = field or infer_row_field(path, rows)
        missing = [r["id"] for r in rows if r.get(field) in (None, "")]
        if missing:
            raise ValueError(f"{path}: {len(missing)} row(s) have no field {field!r}, e.g. id={missing[0]!r}")
        langs = [r.get("lang", "und") for r in rows]
        return EmbedInput([r[field] for r in rows], None if set(langs) == {"und"} else langs, field)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    numbered = _read_lines(path, on_error)
    while numbered and not numbered[-1][1].strip():
        numbered.pop()
    for i, line in numbered:
        if not line.strip():
            raise ValueError(f"{path}:{i} is empty (one item per line; remove blank lines)")
    lines = [line for _, line in numbered]
    field = field or infer_list_field(path, lines)
    if field in _FIELD_MODALITY:  # paths, relative to the list's folder like in manifests
        lines = [str((path.parent / line.strip()).resolve()) for line in lines]
    else:
        _warn_paths_as_text(path, lines)
    return EmbedInput(lines, None, field)


def _read_input(path: Path, field: str | None, on_error: str = "error") -> tuple[list[Any], list[str] | None]:
    """``(items, langs)`` of :func:`read_items` (the field given or inferred)."""
    got = read_items(path, field, on_error)
    return got.items, got.langs


def _item_key(item: Any) -> Any:
    """A hashable identity of an item's content (``None``: compare by position only)."""
    if isinstance(item, str):
        return item
    if isinstance(item, (bytes, bytearray)):
        return hashlib.sha1(item).digest()
    tobytes = getattr(item, "tobytes", None)  # PIL images, NumPy arrays
    if tobytes is not None:
        shape = getattr(item, "shape", None) or (getattr(item, "mode", None), getattr(item, "size", None))
        return (str(getattr(item, "dtype", "")), str(shape), hashlib.sha1(tobytes()).digest())
    if hasattr(item, "numpy"):  # tensors
        return _item_key(item.detach().cpu().numpy())
    return None


def deduplicate(items: Sequence[Any], langs: Sequence[str] | None = None) -> tuple[list[Any], list[str] | None, np.ndarray]:
    """The distinct items (first occurrence, in order), their languages, and ``inverse`` [N] with
    ``items[i] == unique[inverse[i]]``: embed ``unique`` once, then ``embeddings[inverse]``.

    Items are equal when their content is (strings, bytes, arrays, PIL images) and so is their language.
    """
    index: dict[Any, int] = {}
    keep: list[int] = []
    inverse = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        key = _item_key(item)
        key = (i,) if key is None else (key, None if langs is None else langs[i])
        j = index.setdefault(key, len(keep))
        if j == len(keep):
            keep.append(i)
        inverse[i] = j
    return [items[i] for i in keep], None if langs is None else [langs[i] for i in keep], inverse


def embed(
    model: str | list[str],
    input: str,
    output: str,
    field: str | None = None,
    tower: str | None = None,
    lang: str | None = None,
    normalize: bool = False,
    batch_size: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    on_error: str = "error",
    encoder_overrides: dict[str, dict[str, Any]] | None = None,
    strict: bool = True,
) -> None:
    """Embed a file of items with an exported model and save the ``[N, D]`` float32 matrix as ``.npy``.

    Args:
        model: Export directory (``mmalign export`` output) or hub repo id (``owner/name``, see
            docs/export.md), or a list of them (seeds of one recipe, e.g. ``--model '[exports/s0,
            exports/s1]'``): embedded as one :class:`AlignedEnsemble`.
        input: ``.txt`` (one item per line: texts, or image/audio paths relative to the file), a
            ``.jsonl``/``.csv`` manifest or any data source (Parquet/Arrow, HF folder, ``.yaml`` source spec,
            audio folder, WebDataset shards; docs/data.md): rows keep their order.
        output: ``.npy`` file to write.
        field: What to embed: a manifest column (``text``, ``text_en``, ``image``, ``audio``...), or for a
            ``.txt`` list ``text``/``image``/``audio``. Default: inferred: a list of image (audio) files by
            their extensions, else texts (a warning when lines look like paths); the only one of
            text/image/audio a manifest holds (several: an error asking for ``--field``). It also picks
            the tower (the one reading this field, else the one of its modality).
        tower: Tower name, overriding the choice by ``field``.
        lang: ISO 639-1 code of every text of a ``.txt`` list (manifests give theirs per row).
        normalize: L2-normalise every output row (exports whose towers normalise already are unchanged).
        batch_size: Items per encoder call.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda if available).
        dtype: Projector dtype (default: as exported).
        progress: Show a progress bar (items embedded so far).
        on_error: ``"error"`` (default): a line or row that is not UTF-8 (or a bad manifest row) stops the
            run naming the file and line; ``"skip"``: it is left out and counted (the output then has
            fewer rows than the input has lines; the skipped line numbers are printed).
        encoder_overrides: ``{tower: {init_arg: value}}`` replacing recorded encoder arguments, as
            :meth:`AlignedModel.from_pretrained` takes them (every member of an ensemble gets them), e.g.
            ``--encoder_overrides '{text: {model_name_or_path: /models/xlm-roberta-base}}'``: the way to load an
            export whose recorded encoder names a local path (refused otherwise, docs/security.md), or to run
            a local copy of its hub model. A tower the export does not have is an error.
        strict: Refuse an encoder whose ``cache_key`` differs from the recorded one (``false``: a warning). A
            different local path usually changes it: pass ``--strict false`` with such overrides.

    Raises:
        DiskFullError: The disk filled up while writing ``output`` (an ``OSError``; the message names the
            path and says the disk is full; the previous output, if any, is unchanged).
    """
    from mmalign.cache.format import atomic_save_npy

    got = read_items(Path(input), field, on_error)  # before loading encoders: bad input fails fast
    out = Path(output)
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")  # as np.save names it
    if out.is_dir():
        raise IsADirectoryError(f"--output {out} is a directory; give a .npy file name")
    out.parent.mkdir(parents=True, exist_ok=True)  # an unwritable place fails before the encoders run
    langs = got.langs
    if lang is not None:
        if langs is not None:
            raise ValueError(f"{input} gives a language per row; --lang is for .txt lists")
        langs = [lang] * len(got.items)
    paths = [model] if isinstance(model, str) else list(model)
    load = {"device": device, "dtype": dtype, "encoder_overrides": encoder_overrides, "strict": strict}
    aligned: Any = AlignedModel.from_pretrained(paths[0], **load) if len(paths) == 1 else \
        AlignedEnsemble.from_pretrained(paths, **load)
    name = aligned.select_tower(field=None if tower else got.field, tower=tower)
    is_text = str(aligned.towers[name].encoder.modality) == "text"
    unique, unique_langs, inverse = deduplicate(got.items, langs if is_text else None)
    if len(unique) < len(got.items):
        print(f"[mmalign embed] {len(got.items)} items, {len(unique)} distinct: each is embedded once")
    emb = aligned.embed(unique, name, lang=unique_langs, batch_size=batch_size, progress=progress)
    emb = emb[torch.from_numpy(inverse)] if len(unique) < len(got.items) else emb  # [N, D], in the input's order
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    atomic_save_npy(out, emb.numpy())  # temp + rename: never half an .npy under the output's name
    what = f"tower {name!r}" + (f", ensemble of {len(paths)}" if len(paths) > 1 else "")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings ({what}{', normalised' if normalize else ''}) to {out}")
