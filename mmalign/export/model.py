"""Use an exported model: rebuild the frozen encoders and trained projectors, embed anything.

    from mmalign import AlignedModel
    model = AlignedModel.from_pretrained("exports/lit")
    texts = model.embed_text(["a red apple", "ein roter Apfel"], lang=["en", "de"])   # [2, D]
    images = model.embed_image(["apple.png", "dog.jpg"])                             # [2, D]
    model.similarity(texts, images)                                                   # [2, 2] cosine

Command line: ``mmalign embed --model exports/lit --input captions.txt --output emb.npy``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import Encoder, EncoderOutput
from encoders.utils import torch_dtype as _as_dtype  # the one dtype parser
from mmalign.export.format import (
    CAPTIONER_FORMAT, CENTERED_FORMAT_VERSION, MEAN_KEY, ClassList, ExportError, confine, field, read_config,
)
from mmalign.export.rebuild import build_encoder, check_projector, instantiate
from mmalign.export.weights import check_listed, check_tensors, load_tensors, open_weights, verify_checksum
from mmalign.training.towers import Tower

#: Modality a manifest field holds, for picking a tower by field name when no tower reads it directly.
_FIELD_MODALITY = {"image": "image", "audio": "speech", "speech": "speech"}
#: The field a modality is read from in the data contract (``text_en`` etc. are specialisations).
_GENERIC_FIELD = {"image": "image", "speech": "audio", "text": "text"}


def _items_list(items: Any, modality: str) -> list[Any]:
    """A list of items; a lone string/path, one waveform or one image array is refused (a common slip)."""
    if isinstance(items, (str, os.PathLike)):
        raise TypeError(f"expected a sequence of {modality} items, got a single {type(items).__name__}; wrap it in a list")
    if isinstance(items, (np.ndarray, Tensor)):
        single = {"speech": (1,), "image": (2, 3)}.get(modality, (0,))
        if items.ndim in single:
            raise TypeError(f"expected a sequence of {modality} items, got one {items.ndim}-D array; wrap it in a list")
    return list(items)


class _ModalityShortcuts:
    """``embed_text`` / ``embed_image`` / ``embed_speech``: :meth:`embed` with the tower picked by modality."""

    def embed(self, items: Sequence[Any], tower: str | None = None, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def embed_text(self, texts: Sequence[str], lang: str | Sequence[str] | None = None, tower: str | None = None, **kwargs: Any) -> Tensor:
        """Embed strings with the text tower: ``[N, D]`` (see :meth:`embed` for the keyword arguments)."""
        return self.embed(texts, tower, modality="text", lang=lang, **kwargs)

    def embed_image(self, images: Sequence[Any], tower: str | None = None, **kwargs: Any) -> Tensor:
        """Embed images (paths, PIL images or uint8 arrays) with the image tower: ``[N, D]``."""
        return self.embed(images, tower, modality="image", **kwargs)

    def embed_speech(self, waveforms: Sequence[Any], sampling_rate: int | None = None, tower: str | None = None, **kwargs: Any) -> Tensor:
        """Embed speech (audio paths or 1-D waveforms at ``sampling_rate``) with the speech tower: ``[N, D]``."""
        return self.embed(waveforms, tower, modality="speech", sampling_rate=sampling_rate, **kwargs)


class AlignedModel(_ModalityShortcuts, nn.Module):
    """Frozen encoders + trained projectors loaded from an export directory (see :mod:`mmalign.export`).

    Build it with :meth:`from_pretrained`. Every ``embed_*`` method returns CPU ``float32`` tensors
    ``[N, D]`` in the shared space (L2-normalised if the tower normalised in training).

    Attributes:
        towers: ``{name: Tower}`` (frozen encoder + projector).
        config: The export's ``config.json``.
        logit_scales: ``{"a|b": scale}`` learned temperatures of the training objectives.
    """

    def __init__(self, towers: Mapping[str, Tower], config: Mapping[str, Any], logit_scales: Mapping[str, float]) -> None:
        super().__init__()
        self.towers = nn.ModuleDict(dict(towers))
        self.config = dict(config)
        self.logit_scales = dict(logit_scales)
        self._dtype: torch.dtype | None = None
        self._warned_langs: set[str] = set()
        self._extra_tensors: dict[str, Tensor] = {}  # objective tensors (temperatures), kept for save_pretrained
        self.source: str | None = None  # the directory or "owner/name@<commit>" it was loaded from

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        towers: Sequence[str] | None = None,
        encoder_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        strict: bool = True,
        trusted_classes: ClassList | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> "AlignedModel":
        """Rebuild an exported model (a directory or a hub repo) and check it is the one that was trained.

        The export is treated as untrusted (see :mod:`mmalign.export.format`): only the project's own
        encoder and projector classes are imported, paths stay inside ``path``, projector sizes are checked
        against the weights header before anything is allocated, and the weights' sha256 must match.

        Args:
            path: Export directory (``config.json`` + ``model.safetensors``), or a Hugging Face Hub model repo
                id ``"owner/name"`` (read from the local HF cache when offline or cached, else downloaded;
                only the export's files). An existing local directory always wins over a repo of that name;
                see :mod:`mmalign.export.hub`.
            device: Where to run (default: ``cuda`` if available, else ``cpu``).
            dtype: Projector dtype (e.g. ``"bfloat16"`` on GPU); encoder features are cast to it. Encoders
                keep the dtype recorded in their ``init_args`` (it is part of their identity); change it
                with ``encoder_overrides`` and ``strict=False``.
            towers: Load only these towers (skips building the other encoders). Default: all.
            encoder_overrides: ``{tower: {init_arg: value}}`` replacing recorded encoder arguments, e.g. a
                local path to the same checkpoint.
            strict: Refuse encoders whose ``cache_key`` differs from the recorded one (a warning if
                False). A different ``output_dim`` is always refused: the projector cannot take it.
            trusted_classes: Encoder/projector classes from outside mmalign's packages to accept
                (``"mypkg.encoders.MyEncoder"`` or the class); they must still subclass ``Encoder``/``Projector``.
            revision: Hub repos: branch, tag or commit (default ``main``).
            cache_dir: Hub repos: the HF cache (default: ``HF_HUB_CACHE``, ``$HF_HOME/hub``, ~/.cache).
            local_files_only: Hub repos: never download (default: when ``HF_HUB_OFFLINE=1``).
            token: Hub repos: access token for private repos (default: the saved login).

        Raises:
            ExportError: No such directory (nor repo), the directory is not an export or is unsafe (a refused
                class, a path leaving it, a malformed config.json), an encoder differs from the recorded one,
                or the weights file does not match the rebuilt projectors (keys, shapes, dtypes, checksum,
                NaN/Inf values).
        """
        from mmalign.export.hub import resolve_export

        with resolve_export(path, revision, cache_dir, local_files_only, token) as (root, source):
            model = cls._from_directory(root, towers, encoder_overrides, strict, trusted_classes)
        model.source = source
        return model.to_device(device, dtype)

    @classmethod
    def _from_directory(
        cls, root: Path, towers: Sequence[str] | None, encoder_overrides: Mapping[str, Mapping[str, Any]] | None,
        strict: bool, trusted_classes: ClassList | None,
    ) -> "AlignedModel":
        """:meth:`from_pretrained` on a plain local export folder (the safe loader proper)."""
        config = read_config(root)
        if config["format"] == CAPTIONER_FORMAT:
            raise ExportError(f"{root} is a visual-prefix captioner export: load it with mmalign.load({str(root)!r}) or "
                              "mmalign.captioning.PrefixCaptioningModule.from_pretrained, then call "
                              ".generate(images, lang=...)")
        recorded = field(config, "towers", dict, "config")
        names = list(recorded) if towers is None else list(towers)
        for name in names:
            if name not in recorded:
                raise ExportError(f"{root} has no tower {name!r}; towers: {sorted(recorded)}")
        overrides = dict(encoder_overrides or {})
        for name in overrides:
            if name not in names:
                raise ExportError(f"encoder_overrides names tower {name!r}, which is not loaded ({names})")
        _check_paths(root, config)
        weights = open_weights(root, config)
        # 1. sizes: every projector against the header, on the meta device (nothing allocated, no encoder built)
        projectors, problems = {}, []
        for name in names:
            cfg = field(recorded, name, dict, "towers")
            cls_, init_args, found = check_projector(field(cfg, "projector", dict, f"towers.{name}"), weights,
                                                     f"towers.{name}.projector.", f"towers.{name}.projector",
                                                     f"tower {name!r}", trusted=trusted_classes)
            projectors[name] = (cls_, init_args)
            problems += found
            problems += _mean_problems(cfg, weights, name, config.get("format_version"))
        problems += _other_tensor_problems(weights, names)
        if problems:
            raise ExportError(f"{weights.path} does not match the model described by config.json:\n  "
                              + "\n  ".join(problems))
        # 2. integrity, 3. the encoders (the expensive part), 4. the weights
        verify_checksum(weights)
        built = {}
        for name in names:
            cfg = recorded[name]
            encoder = build_encoder(field(cfg, "encoder", dict, f"towers.{name}"), f"towers.{name}.encoder",
                                    f"tower {name!r}", overrides.get(name), strict, trusted_classes)
            projector = instantiate(*projectors[name], f"tower {name!r} projector")
            if projector.in_dim != encoder.output_dim:
                raise ExportError(f"tower {name!r}: projector in_dim {projector.in_dim} != encoder output_dim "
                                  f"{encoder.output_dim}")
            center = _centers(cfg, name)
            if center and projector.out_dim != cfg["output_dim"]:
                raise ExportError(f"tower {name!r}: projector out_dim {projector.out_dim} != recorded output_dim "
                                  f"{cfg['output_dim']} (the size of its {MEAN_KEY})")
            tower = Tower(encoder, field(cfg, "field", str, f"towers.{name}"), projector=lambda i, o, p=projector: p,
                          normalize=field(cfg, "normalize", bool, f"towers.{name}"), center=center)
            tower.build(projector.out_dim)
            built[name] = tower
        tensors = load_tensors(weights)
        model = cls(built, config, _logit_scales(config))
        for name, tower in built.items():
            prefix = f"towers.{name}.projector."
            tower.projector.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            if tower.center:
                tower.embedding_mean.copy_(tensors[f"towers.{name}.{MEAN_KEY}"].float())
        model._extra_tensors = {k: v for k, v in tensors.items() if not k.startswith("towers.")}  # objectives
        return model.eval()

    # -- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, model_card: bool = True) -> Path:
        """Write this model as an export directory (``config.json`` + ``model.safetensors`` + a ``README.md``
        model card), atomically, with the export writer; it loads back with :meth:`from_pretrained`.

        The current projector weights are written (cast to their recorded dtypes); ONNX graphs are not.

        Raises:
            ExportError: The model was loaded with a subset of its towers, or ``path`` is a non-export folder.
        """
        from mmalign.export.hub import save_aligned

        return save_aligned(self, path, card=model_card)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
        """:meth:`save_pretrained` into a temporary folder and upload it to the hub model repo ``repo_id``
        (created if missing; ``HfApi.create_repo`` + ``upload_folder``). Returns the ``CommitInfo``."""
        import tempfile

        from mmalign.export.hub import push_folder, save_aligned

        with tempfile.TemporaryDirectory(prefix="mmalign-push-") as tmp:
            folder = save_aligned(self, Path(tmp) / "export", repo_id=repo_id)
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision, create_pr=create_pr)

    def to_device(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> "AlignedModel":
        """Move encoders to ``device`` and projectors to ``device``/``dtype`` (``None``: best device, keep dtype)."""
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _as_dtype(dtype)
        for tower in self.towers.values():
            tower.encoder.to(device)
            tower.projector.to(device=device, dtype=dtype)
        self._dtype = dtype
        return self

    # -- properties ------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def languages(self) -> list[str] | None:
        """Languages seen in training (``None`` if not recorded)."""
        return self.config.get("languages")

    @property
    def logit_scale(self) -> float | None:
        """The first objective's learned temperature (``1 / tau``), if it has one."""
        return next(iter(self.logit_scales.values()), None)

    def describe(self) -> str:
        """One line per tower: name, modality, field, encoder class and dims."""
        lines = []
        for name, tower in self.towers.items():
            enc = self.config["towers"][name]["encoder"]
            lines.append(
                f"{name}: {tower.encoder.modality} from field {tower.field!r}, {enc['class_path']} "
                f"({enc['output_dim']}-d) -> {type(tower.projector).__name__} -> {tower.out_dim}-d"
            )
        return "\n".join(lines)

    # -- choosing a tower ------------------------------------------------------------------------
    def select_tower(self, modality: str | None = None, field: str | None = None, tower: str | None = None) -> str:
        """Name of the tower to use: ``tower`` if given, else the only one with ``modality``/``field``.

        Raises:
            ValueError: The tower is unknown or of another modality, or no / several towers match.
        """
        listing = ", ".join(f"{n} ({t.encoder.modality}, field {t.field!r})" for n, t in self.towers.items())
        if tower is not None:
            if tower not in self.towers:
                raise ValueError(f"no tower {tower!r}; towers: {listing}")
            got = str(self.towers[tower].encoder.modality)
            if modality is not None and got != modality:
                raise ValueError(f"tower {tower!r} embeds {got}, not {modality}; towers: {listing}")
            return tower
        names = [n for n, t in self.towers.items() if modality is None or str(t.encoder.modality) == modality]
        if field is not None:
            by_field = [n for n in names if self.towers[n].field == field]
            if not by_field and modality is None and field in _FIELD_MODALITY:
                by_field = [n for n in names if str(self.towers[n].encoder.modality) == _FIELD_MODALITY[field]]
            names = by_field
        if field is None and len(names) > 1:
            # several towers of one modality (e.g. a multilingual student on ``text`` and an English anchor on
            # ``text_en``): the tower reading the modality's generic field is the default
            generic = [n for n in names if self.towers[n].field == _GENERIC_FIELD.get(str(self.towers[n].encoder.modality))]
            names = generic if len(generic) == 1 else names
        what = " ".join(x for x in (modality, f"field {field!r}" if field else None) if x) or "any"
        if not names:
            raise ValueError(f"this model has no tower for {what}; towers: {listing}")
        if len(names) > 1:
            raise ValueError(f"several towers match {what}: {names}; pass tower=... (towers: {listing})")
        return names[0]

    # -- embedding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_features(self, features: EncoderOutput, tower: str) -> Tensor:
        """Project precomputed encoder outputs of ``tower`` (e.g. from the feature cache): ``[B, D]``."""
        t = self.towers[self.select_tower(tower=tower)]
        param = next(iter(t.projector.parameters()), None)
        device = param.device if param is not None else t.encoder.device
        features = features.to(device=device, dtype=self._dtype or (param.dtype if param is not None else None))
        return t.project(features).float().cpu()

    def embed(
        self,
        items: Sequence[Any],
        tower: str | None = None,
        *,
        modality: str | None = None,
        field: str | None = None,
        lang: str | Sequence[str] | None = None,
        batch_size: int = 32,
        progress: bool | None = None,
        sampling_rate: int | None = None,
    ) -> Tensor:
        """Embed raw items (strings, image paths/arrays, waveforms/audio paths) with one tower.

        Args:
            items: Raw items of the tower's modality (what its encoder's ``preprocess`` takes).
            tower: Tower name; default: the only tower matching ``modality``/``field``.
            modality: ``"text"``, ``"image"`` or ``"speech"`` (used to pick the tower).
            field: Manifest field (``"text"``, ``"text_en"``...; used to pick the tower).
            lang: ISO 639-1 code of all items, or one per item. An invalid code (``"english"``) is a
                ``ValueError`` with "did you mean 'en'?"; a language the tower's encoder does not cover (an
                encoder with ``check_languages``, e.g. USE-m's 16) is a ``ValueError`` from the encoder; one it
                covers but training did not see is a warning (zero-shot transfer). The projectors of this
                format do not condition on it; an encoder that reads each item's language (``reads_language``:
                a cascade with ``language="row"``) is told it (``None``: it detects).
            batch_size: Items per encoder call.
            progress: Show a tqdm bar (default: when there are more than 10 batches).
            sampling_rate: Sampling rate of waveform items (speech towers).

        Returns:
            ``[N, D]`` float32 CPU tensor, rows in the order of ``items``.
        """
        name = self.select_tower(modality=modality, field=field, tower=tower)
        return self._embed_items(items, name, self.embed_features, lang, batch_size, progress, sampling_rate)

    def _embed_items(
        self, items: Sequence[Any], name: str, project: Any, lang: str | Sequence[str] | None, batch_size: int,
        progress: bool | None, sampling_rate: int | None,
    ) -> Tensor:
        """Preprocess + encode ``items`` with tower ``name``'s encoder, batch by batch; ``project(features, name)``."""
        t = self.towers[name]
        items = _items_list(items, str(t.encoder.modality))
        self._check_langs(lang, len(items), name)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kwargs: dict[str, Any] = {}
        if sampling_rate is not None:
            if "sampling_rate" not in inspect.signature(t.encoder.preprocess).parameters:
                raise TypeError(f"tower {name!r} ({type(t.encoder).__name__}) takes no sampling_rate")
            kwargs["sampling_rate"] = sampling_rate
        langs = None
        if getattr(t.encoder, "reads_language", False):  # e.g. a cascade with language="row": told each item's language
            langs = [None] * len(items) if lang is None else [lang] * len(items) if isinstance(lang, str) else list(lang)
        if not items:
            return torch.zeros(0, t.out_dim)
        from tqdm.auto import tqdm

        starts = range(0, len(items), batch_size)
        show = progress if progress is not None else len(starts) > 10
        out = []
        with tqdm(total=len(items), desc=f"embed {name}", unit="item", disable=not show) as bar:
            for start in starts:
                batch = items[start : start + batch_size]
                if langs is not None:
                    kwargs["languages"] = langs[start : start + batch_size]
                inputs = self._preprocess(t.encoder, batch, start, name, kwargs)
                with torch.inference_mode():
                    out.append(project(t.encoder(inputs), name))
                bar.update(len(batch))
        return torch.cat(out)  # [N, D]

    @staticmethod
    def similarity(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
        """Cosine similarity matrix ``[N_a, N_b]`` between two sets of embeddings (1-D inputs count as one row)."""
        a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
        a, b = a.unsqueeze(0) if a.ndim == 1 else a, b.unsqueeze(0) if b.ndim == 1 else b
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"embeddings of different sizes: {tuple(a.shape)} vs {tuple(b.shape)}")
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _preprocess(encoder: Encoder, batch: list[Any], start: int, name: str, kwargs: dict[str, Any]) -> dict[str, Tensor]:
        try:
            return encoder.preprocess(batch, **kwargs)
        except Exception:  # noqa: BLE001 - find and name the offending item
            for i, item in enumerate(batch):
                one = {k: [v[i]] if k == "languages" else v for k, v in kwargs.items()}
                try:
                    encoder.preprocess([item], **one)
                except Exception as item_err:  # noqa: BLE001
                    msg = f"tower {name!r}: item {start + i} ({item!r:.60}) could not be preprocessed: {item_err}"
                    try:
                        exc = type(item_err)(msg)
                    except Exception:  # noqa: BLE001 - exception types with other constructors
                        exc = ValueError(msg)
                    raise exc from item_err
            raise

    def language_problem(self, lang: str, tower: str | None = None, modality: str = "text") -> str | None:
        """Why ``tower`` (default: the only ``modality`` tower) cannot embed items in ``lang``: an invalid code or a
        language its encoder does not cover; ``None`` when it can (a covered language training did not see is
        fine: zero-shot transfer, warned about once). Benchmarks use it to skip, and count, what a model does not
        cover instead of stopping at the first such language."""
        name = self.select_tower(modality=modality, tower=tower)
        try:
            self._check_langs(lang, 1, name)
        except ValueError as err:
            return str(err)
        return None

    def _check_langs(self, lang: str | Sequence[str] | None, n: int, name: str) -> None:
        """Codes must be ISO 639-1 (as in manifests); tower ``name``'s encoder must cover them (an error from
        the encoder); languages it covers but training did not see get a zero-shot warning."""
        if lang is None:
            return
        from mmalign.data.langs import check_language

        langs = [lang] * n if isinstance(lang, str) else list(lang)
        if len(langs) != n:
            raise ValueError(f"lang has {len(langs)} entries for {n} items")
        for code in dict.fromkeys(langs):  # each distinct code once, in order
            check_language(code, "lang" if isinstance(lang, str) else f"lang[{langs.index(code)}]")
        encoder = self.towers[name].encoder
        check = getattr(encoder, "check_languages", None)  # encoders that declare the languages they cover
        if check is not None:
            try:
                check([None if c == "und" else c for c in langs], n)  # undetermined: nothing to check
            except ValueError as err:
                raise ValueError(f"tower {name!r}: {err}") from err
        seen = self.languages
        if seen is None or str(encoder.modality) != "text":
            return
        unseen = sorted(set(langs) - set(seen) - {"und"} - self._warned_langs)
        if unseen:
            self._warned_langs.update(unseen)
            warnings.warn(f"language(s) {unseen} were not seen in training (seen: {seen}): their embeddings are "
                          "zero-shot transfer (the point of pivot recipes; check docs/results.md for how well it holds)",
                          stacklevel=4)


def _check_paths(root: Path, config: Mapping[str, Any]) -> None:
    """Every file config.json names (ONNX graphs; the weights are opened by ``open_weights``) stays in ``root``."""
    onnx = config.get("onnx") or {}
    if not isinstance(onnx, dict):
        raise ExportError("config.json: onnx must be an object")
    for name, entry in onnx.items():
        confine(root, field(entry, "file", str, f"onnx.{name}"), f"onnx.{name}.file")


def _centers(cfg: Mapping[str, Any], name: str) -> bool:
    """A tower entry's ``center`` flag (absent: False; anything but a bool is refused)."""
    center = cfg.get("center", False)
    if not isinstance(center, bool):
        raise ExportError(f"config.json: towers.{name}.center must be true or false, got {center!r}")
    return center


def _mean_problems(cfg: Mapping[str, Any], weights: Any, name: str, version: Any) -> list[str]:
    """A centred tower's ``embedding_mean``: present, ``[output_dim]`` (the recorded size, nothing larger is
    read), floating point, in a format_version 3 export; an uncentred tower has none."""
    key = f"towers.{name}.{MEAN_KEY}"
    if not _centers(cfg, name):
        return [f"tower {name!r} does not centre (no center: true) but the weights hold {key}"] if key in weights.header else []
    if version != CENTERED_FORMAT_VERSION:
        return [f"tower {name!r} centres its outputs, which needs format_version {CENTERED_FORMAT_VERSION}, not {version!r}"]
    dim = field(cfg, "output_dim", int, f"towers.{name}")
    return check_tensors(weights, {key: torch.empty(dim, device="meta")}, key, f"tower {name!r}")


def _other_tensor_problems(weights: Any, loaded: Sequence[str]) -> list[str]:
    """Tensors outside the loaded towers: objective tensors listed in config.json, nothing unlisted; under a loaded
    tower only its projector's tensors and its mean (checked by :func:`_mean_problems`), listed or not."""
    listed = weights.info.get("tensors") or {}
    if not isinstance(listed, dict):
        return ["config.json: weights.tensors must be an object"]
    prefixes = tuple(f"towers.{n}.projector." for n in loaded)
    owned = tuple(f"towers.{n}." for n in loaded)
    means = {f"towers.{n}.{MEAN_KEY}" for n in loaded}
    problems = check_listed(weights, [k for k in listed if not k.startswith("towers.")])
    problems += [f"unexpected tensor {k}" for k in weights.header if not k.startswith("towers.") and k not in listed]
    problems += [f"unexpected tensor {k}" for k in weights.header
                 if k.startswith("towers.") and not k.startswith(prefixes) and k not in means
                 and (k not in listed or k.startswith(owned))]
    return problems


def _logit_scales(config: Mapping[str, Any]) -> dict[str, float]:
    """``{"a|b": scale}`` of the objectives that learned a temperature."""
    out = {}
    for i, o in enumerate(field(config, "objectives", list, "config") if "objectives" in config else []):
        loss = field(o, "loss", dict, f"objectives[{i}]")
        scale = loss.get("logit_scale")
        if scale is None:
            continue
        towers = field(o, "towers", list, f"objectives[{i}]")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not all(isinstance(t, str) for t in towers):
            raise ExportError(f"config.json: objectives[{i}] has a malformed towers list or logit_scale")
        out["|".join(towers)] = float(scale)
    return out
