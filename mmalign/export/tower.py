"""An exported tower as a frozen tower of a new training: the teacher (or contrastive target) that grows a space.

    from mmalign import ExportTower
    teacher = ExportTower("runs/quickstart/export", tower="text", field="text_en")   # frozen: encoder + projector

In a recipe (``configs/extend.yaml``)::

    towers:
      text:                                  # the space's existing text tower, frozen
        class_path: mmalign.ExportTower
        init_args: {path: runs/quickstart/export, tower: text, field: text_en}
      text_e5:                               # the new tower, trained into that space
        class_path: mmalign.Tower
        init_args: {field: text, encoder: {class_path: encoders.MultilingualE5Small}, projector: ...}

The export is loaded through the one safe loader (:meth:`mmalign.export.model.AlignedModel.from_pretrained`:
class allowlist, paths confined, shapes checked on ``meta``, sha256 verified, NaN/Inf refused) and wrapped as
an :class:`ExportEncoder`: ``preprocess`` is the exported encoder's, ``forward`` runs that encoder and the
exported projector, and the pooled output is the tower's embedding in the shared space (``[B, embed_dim]``).
The :class:`ExportTower` has no projector of its own, so the space's size is implied (``embed_dim`` may be
left unset) and nothing of it trains.

Cached training: the feature cache treats the wrapper like any encoder. Its ``cache_key`` hashes its
:meth:`ExportEncoder.spec`, which holds the export's weights sha256, the tower's name and its recorded encoder
``cache_key``, so ``mmalign cache`` stores the exported tower's *embeddings* once, and a different export (other
weights, another tower) never reads them.

Exporting a module that holds ExportTowers (``ExportOnFitEnd``, ``mmalign export``, ``mmalign extend``) writes
ONE export: every tower of the source export(s), copied unchanged (config entries verbatim, tensors
bit-identical), plus the newly trained towers, with the provenance of both trainings (:mod:`mmalign.extend`).
An :class:`ExportEncoder` therefore never appears in a written export, and it is deliberately NOT an
:class:`~encoders.base.Encoder` subclass: a config.json naming it (a path to another folder) is refused by the
loader's class check, so an export can never make a reader open files outside its own folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from encoders.base import Encoder, EncoderOutput
from encoders.frozen import FrozenModule
from encoders.utils import RecordsInitArgs
from mmalign.export.format import ClassList, ExportError, field, read_config
from mmalign.training.towers import Tower


#: ``tiny:<name>`` exports (like the encoders' ``tiny:`` twins): built on first use from tiny random encoders.
TINY_EXPORTS = ("space",)


def resolve_export_path(path: str | os.PathLike) -> Path:
    """The export folder ``path`` names; ``tiny:space`` is a deterministic tiny trimodal space (tiny random text,
    image and speech encoders with seeded projectors, 16-d), built once under ``encoders.tiny.tiny_root()`` for
    tests and the tiny recipe overlays, as ``tiny:<model>`` encoder twins are."""
    from encoders.registry import TINY_PREFIX

    text = str(path)
    if not text.startswith(TINY_PREFIX):
        return Path(path)
    name = text[len(TINY_PREFIX):]
    if name not in TINY_EXPORTS:
        raise ExportError(f"no tiny export {text!r}; tiny exports: {', '.join(TINY_PREFIX + n for n in TINY_EXPORTS)}")
    from encoders.tiny import build_once, tiny_root

    return build_once(tiny_root() / f"export-{name}", _build_tiny_space)


def _build_tiny_space(directory: Path) -> None:
    """Write the ``tiny:space`` export into ``directory`` (image and speech towers bound to a text tower)."""
    import functools

    from encoders import TimmImageEncoder
    from encoders.hf_text import HFTextEncoder
    from encoders.whisper import WhisperSpeechEncoder
    from mmalign.export.writer import export_module
    from mmalign.training.losses import ClipLoss
    from mmalign.training.module import AlignmentModule
    from mmalign.training.towers import Objective
    from projectors import MLP, Linear

    with torch.random.fork_rng():
        torch.manual_seed(0)
        towers = {
            "text": Tower(HFTextEncoder("tiny:bert-text", pooling="mean"), "text", Linear, normalize=True),
            "image": Tower(TimmImageEncoder("tiny:timm-vit"), "image", functools.partial(MLP, num_blocks=1), normalize=True),
            "speech": Tower(WhisperSpeechEncoder("tiny:whisper"), "audio", Linear, normalize=True),
        }
        objectives = [Objective(ClipLoss(), ["image", "text"]), Objective(ClipLoss(), ["speech", "text"])]
        module = AlignmentModule(towers, objectives, embed_dim=16)
    out = directory.parent / f"{directory.name}-export"
    export_module(module, out, languages=["en"], recipe={"note": "tiny:space, random tiny encoders, untrained"})
    for item in out.iterdir():
        item.rename(directory / item.name)
    out.rmdir()


class ExportEncoder(RecordsInitArgs, FrozenModule):
    """One tower of an export (frozen encoder + trained projector), with the encoder contract.

    Follows :class:`~encoders.base.Encoder`'s contract (``modality``, ``output_dim``, ``spec``/``cache_key``,
    ``preprocess``, ``forward -> EncoderOutput``, frozen) without subclassing it; see the module docstring.

    Args:
        path: Export directory (``config.json`` + ``model.safetensors``).
        tower: Name of the tower to load. Default: the export's only tower (an error when it has several).
        trusted_classes: Encoder/projector classes from outside mmalign's packages that the export may name.
        encoder_overrides: ``{init_arg: value}`` replacing the tower's recorded encoder arguments (a local copy of
            the same checkpoint); the rebuilt encoder must still have the recorded ``cache_key`` unless
            ``strict=False``.
        strict: Refuse an encoder whose ``cache_key`` differs from the recorded one.

    Raises:
        ExportError: ``path`` is not a readable, verified embedding export, or has no such tower.
    """

    has_tokens = False
    token_dim = None
    # the Encoder contract's shared pieces, reused as they are (they only read this object's attributes)
    cache_key = Encoder.cache_key
    device = Encoder.device
    forward = Encoder.forward

    def __init__(
        self,
        path: str | os.PathLike,
        tower: str | None = None,
        trusted_classes: ClassList | None = None,
        encoder_overrides: Mapping[str, Any] | None = None,
        strict: bool = True,
    ) -> None:
        super().__init__()
        from mmalign.export.model import AlignedModel

        root = resolve_export_path(path)
        config = read_config(root)
        towers = field(config, "towers", dict, "config")
        if tower is None:
            if len(towers) != 1:
                raise ExportError(f"{root} has towers {sorted(towers)}: name the one to load (tower=...)")
            tower = next(iter(towers))
        if tower not in towers:
            raise ExportError(f"{root} has no tower {tower!r}; towers: {sorted(towers)}")
        model = AlignedModel.from_pretrained(
            root, device="cpu", towers=[tower], trusted_classes=trusted_classes, strict=strict,
            encoder_overrides={tower: dict(encoder_overrides)} if encoder_overrides else None)
        self.root, self.tower_name = root, tower
        self.config = model.config
        self.entry: dict[str, Any] = dict(towers[tower])  # the tower's config.json entry, verbatim
        self.tower: Tower = model.towers[tower]
        inner = self.tower.encoder
        self.modality = inner.modality
        self.output_dim = int(self.tower.out_dim)
        self.field = self.tower.field
        # what the collator and the cache read off an encoder (speech decoding, forward batch sizes)
        for name in ("sampling_rate", "min_audio_samples", "cache_batch_size", "cache_item_bytes", "reads_language"):
            if getattr(inner, name, None) is not None:
                setattr(self, name, getattr(inner, name))
        self.freeze()

    @property
    def weights_sha256(self) -> str:
        """sha256 of the export's ``model.safetensors`` (verified when it was loaded)."""
        return str(self.config["weights"]["sha256"])

    def spec(self) -> dict[str, Any]:
        """What determines this tower's outputs: the export's weights (sha256), the tower, its encoder's identity."""
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "export_sha256": self.weights_sha256,
            "tower": self.tower_name,
            "encoder_cache_key": self.entry["encoder"].get("cache_key"),
            "projector": self.entry["projector"].get("class_path"),
            "normalize": bool(self.entry.get("normalize", False)),
            **({"center": True} if self.entry.get("center") else {}),  # absent when not centred: old keys unchanged
            "embed_dim": self.output_dim,
        }

    def preprocess(self, items: Sequence[Any], sampling_rate: int | None = None,
                   languages: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The exported encoder's preprocessing (``sampling_rate`` is passed on for speech only, ``languages``, one code
        per item, to an encoder that reads them: ``reads_language``)."""
        kwargs: dict[str, Any] = {} if sampling_rate is None else {"sampling_rate": sampling_rate}
        if languages is not None and getattr(self.tower.encoder, "reads_language", False):
            kwargs["languages"] = languages
        return self.tower.encoder.preprocess(items, **kwargs)

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        """The exported tower's embedding (encoder, projector, normalisation) as the pooled output ``[B, D]``."""
        param = next(iter(self.tower.projector.parameters()), None)
        feats = self.tower.encoder(inputs)
        if param is not None:
            feats = feats.to(device=param.device, dtype=param.dtype)
        return EncoderOutput(pooled=self.tower.project(feats).float())

    def extra_repr(self) -> str:
        return f"path={str(self.root)!r}, tower={self.tower_name!r}, dim={self.output_dim}"


class ExportTower(Tower):
    """A tower of an existing export, frozen, usable as the teacher or target of a new tower's objective.

    Args:
        path: Export directory.
        tower: The export's tower to use (default: its only tower).
        field: The sample field it reads in this training (default: the field it was trained on). A teacher of
            parallel text reads ``text_en`` while the student reads ``text``, say; the written export keeps the
            tower's original field.
        trusted_classes: Classes outside mmalign's packages the export may name (see :class:`ExportEncoder`).
        encoder_overrides: Replacements of the tower's recorded encoder arguments (see :class:`ExportEncoder`).
        strict: Refuse a rebuilt encoder whose ``cache_key`` differs from the recorded one.
    """

    def __init__(
        self,
        path: str,
        tower: str | None = None,
        field: str | None = None,
        trusted_classes: list[str] | None = None,
        encoder_overrides: dict[str, Any] | None = None,
        strict: bool = True,
    ) -> None:
        encoder = ExportEncoder(path, tower, trusted_classes=trusted_classes, encoder_overrides=encoder_overrides,
                                strict=strict)
        super().__init__(encoder, field or encoder.field, projector=None, normalize=False)  # type: ignore[arg-type]
        self.path = str(path)
        self.build(None)  # no projector of its own: usable alone, and a module implies the space's size from it

    @property
    def source(self) -> ExportEncoder:
        """The wrapped export tower (its config entry, weights sha256, loaded model)."""
        return self.encoder  # type: ignore[return-value]

    def exported_tensors(self) -> dict[str, Tensor]:
        """The tower's tensors as stored in its export (``{key inside the projector: tensor}``), read back from the
        verified file so a re-export copies the exact stored values."""
        from mmalign.export.weights import load_tensors, open_weights

        weights = open_weights(self.source.root, self.source.config)
        prefix = f"towers.{self.source.tower_name}.projector."
        return {k[len(prefix):]: v for k, v in load_tensors(weights).items() if k.startswith(prefix)}


def export_towers(module: torch.nn.Module) -> dict[str, ExportTower]:
    """``{name: tower}`` of the module's towers that come from an export."""
    towers = getattr(module, "towers", None) or {}
    return {name: t for name, t in towers.items() if isinstance(t, ExportTower)}
