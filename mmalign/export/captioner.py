"""Prefix-LM exports (``mmalign.prefix_captioner``: image captioners, speech prefix models): the same format
rules as embedding exports.

Written by :func:`mmalign.export.export_module` (``PrefixCaptioningModule.save_pretrained``, ``ExportOnFitEnd``,
``mmalign export --ckpt``); read by :func:`load_captioner` (``PrefixCaptioningModule.from_pretrained``,
``mmalign.load``). Layout of ``config.json`` (``format_version`` 2)::

    {"format": "mmalign.prefix_captioner", "format_version": 2,
     "module_class": "mmalign.captioning.module.PrefixCaptioningModule" | "mmalign.captioning.speech.SpeechPrefixModule",
     "image_encoder" | "speech_encoder": {"class_path", "init_args", "spec", "cache_key", "output_dim"},
     "projector": {"class_path", "init_args", "num_parameters"},
     "lm": {"class_path", "init_args", "hidden_size", "kind"},
     "module": {prompt, prompts, image_field, caption_field, max_caption_tokens, ...},
     "languages": [...] | null, "trainable_parameters": int,
     "weights": {"file", "sha256", "num_bytes", "num_parameters", "tensors"},
     "provenance": {...}}

The encoder entry is named by the module class's ``encoder_arg``. ``module_class`` (absent in exports written
before speech prefixes: the image captioner) must be a project subclass of the class asked to load it, so
``PrefixCaptioningModule.from_pretrained`` / ``mmalign.load`` rebuild either kind.

``module`` holds the constructor arguments of the module itself, named explicitly (never Lightning's saved
hyper-parameters, which carry jsonargparse's ``_class_path``/``_instantiator`` keys); the optimizer and
scheduler are training-time only and never recorded.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from mmalign.export.format import (
    CAPTIONER_FORMAT, FORMAT_VERSION, ClassList, ExportError, class_path, field, json_strict, read_config,
)
from mmalign.export.rebuild import build_encoder, check_projector, instantiate, refuse_local_paths
from mmalign.export.weights import check_tensors, load_tensors, open_weights, verify_checksum

#: Constructor arguments of the module that are objects (rebuilt from their own entries) or training-only;
#: the encoder's argument (``cls.encoder_arg``) is left out too.
_NOT_RECORDED = ("self", "lm", "projector", "optimizer", "scheduler", "export_dir")


def module_arguments(cls: type) -> list[str]:
    """The plain constructor arguments of a captioner class that an export records."""
    skip = (*_NOT_RECORDED, getattr(cls, "encoder_arg", "image_encoder"))
    return [p for p in inspect.signature(cls.__init__).parameters if p not in skip]


def captioner_config(module: Any, *, languages: list[str] | None = None, **provenance_args: Any) -> dict[str, Any]:
    """The ``config.json`` of a captioner export (without ``weights``, added when writing).

    Args:
        module: A :class:`~mmalign.captioning.PrefixCaptioningModule`.
        languages: Languages seen in training.
        provenance_args: ``recipe``, ``metrics``, ``checkpoint``, ``epoch``, ``global_step``.
    """
    from mmalign.export.writer import encoder_config, provenance

    proj = module.projector.config()
    hparams = dict(module.hparams)
    key = module.encoder_arg
    return {
        "format": CAPTIONER_FORMAT,
        "format_version": FORMAT_VERSION,
        "module_class": class_path(module),
        key: encoder_config(module.encoder, key, where=key),
        "projector": {
            "class_path": proj["class_path"],
            "init_args": json_strict(proj["init_args"], "projector.init_args"),
            "num_parameters": sum(p.numel() for p in module.projector.parameters()),
        },
        "lm": {
            "class_path": class_path(module.lm),
            "init_args": json_strict(module.lm.init_args(), "lm.init_args"),
            "hidden_size": int(module.lm.hidden_size),
            "kind": module.lm.kind,
        },
        "module": {k: json_strict(hparams[k], f"module.{k}") for k in module_arguments(type(module)) if k in hparams},
        "languages": sorted(languages) if languages is not None else None,
        "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
        "provenance": provenance(**provenance_args),
    }


def load_captioner(cls: type, path: str | os.PathLike, map_location: str | torch.device = "cpu", strict: bool = True,
                   trusted_classes: ClassList | None = None, encoder_overrides: dict[str, Any] | None = None,
                   lm_overrides: dict[str, Any] | None = None) -> Any:
    """Rebuild a captioner export (see :meth:`PrefixCaptioningModule.from_pretrained`).

    Order: strict config.json; the module class (``module_class``, a project subclass of ``cls``); every
    class checked (encoder, projector, LM); the projector built on
    ``meta`` and compared with the weights header; size + sha256; then the encoder and LM are built, the
    LoRA tensors compared with the rebuilt LM, and the weights loaded strictly (NaN/Inf refused).

    Raises:
        ExportError: Naming the entry (``image_encoder``/``speech_encoder``, ``projector``, ``lm``,
            ``module.<arg>``) and the problem.
    """
    from mmalign.captioning.lm import FrozenLM
    from mmalign.export.format import resolve_class

    root = Path(path)
    config = read_config(root)
    if config["format"] != CAPTIONER_FORMAT:
        raise ExportError(f"{root} is an embedding export ({config['format']}): load it with mmalign.load or "
                          "mmalign.AlignedModel.from_pretrained")
    cls = _module_class(config, cls, root, trusted_classes)
    module_args = field(config, "module", dict, "config")
    allowed = module_arguments(cls)
    unknown = sorted(set(module_args) - set(allowed))
    if unknown:
        raise ExportError(f"config.json: module.{unknown[0]} is not an argument of {cls.__qualname__} "
                          f"(unknown: {unknown}; known: {allowed})")
    lm_cfg = field(config, "lm", dict, "config")
    lm_cls = resolve_class(field(lm_cfg, "class_path", str, "lm"), FrozenLM, "lm", trusted_classes)
    lm_recorded = field(lm_cfg, "init_args", dict, "lm")
    refuse_local_paths({k: v for k, v in lm_recorded.items() if k not in (lm_overrides or {})}, "lm", "lm",
                       f"To load a local language model you trust, pass its path yourself: {cls.__name__}"
                       ".from_pretrained(..., lm_overrides={<argument>: <path>}).")
    key = cls.encoder_arg
    enc_cfg = field(config, key, dict, "config")
    weights = open_weights(root, config)
    proj_cls, proj_args, problems = check_projector(field(config, "projector", dict, "config"), weights, "projector.",
                                                    "projector", "projector", label="projector", trusted=trusted_classes)
    problems += [f"unexpected tensor {k}" for k in weights.header if not k.startswith(("projector.", "lm."))]
    if problems:
        raise ExportError(f"{weights.path} does not match the captioner described by config.json:\n  "
                          + "\n  ".join(problems))
    verify_checksum(weights)

    encoder = build_encoder(enc_cfg, key, key, override=encoder_overrides, strict=strict, trusted=trusted_classes,
                            label=key, hint=f"To load a local model you trust, pass its path yourself: {cls.__name__}"
                            ".from_pretrained(..., encoder_overrides={<argument>: <path>}); a path other than the "
                            "recorded one is another cache_key, so it also needs strict=False.")
    lm = instantiate(lm_cls, {**lm_recorded, **(lm_overrides or {})}, f"lm {lm_cfg['class_path']}")
    projector = instantiate(proj_cls, proj_args, "projector")

    def factory(in_dim: int, out_dim: int) -> Any:
        if (in_dim, out_dim) != (projector.in_dim, projector.out_dim):
            raise ExportError(f"projector: recorded ({projector.in_dim} -> {projector.out_dim}) but the rebuilt "
                              f"{key} and LM need ({in_dim} -> {out_dim})")
        return projector

    module = cls(**{key: encoder}, lm=lm, projector=factory, **module_args)
    lm_state = {k: v for k, v in module.state_dict().items() if k.startswith("lm.")}
    problems = check_tensors(weights, lm_state, "lm.", "lm (LoRA)")
    if problems:
        raise ExportError(f"{weights.path} does not match the rebuilt LM:\n  " + "\n  ".join(problems))
    module.load_state_dict(load_tensors(weights, map_location), strict=True)
    return module.to(map_location).eval()


def _module_class(config: dict[str, Any], cls: type, root: Path, trusted: ClassList | None) -> type:
    """The module class an export names (``module_class``), checked to be a project subclass of ``cls``.

    Exports without the entry were written by image captioners (:class:`PrefixCaptioningModule`).
    """
    from mmalign.captioning.module import PrefixCaptioningModule
    from mmalign.export.format import resolve_class

    recorded = config.get("module_class", class_path(PrefixCaptioningModule))
    target = resolve_class(recorded, PrefixCaptioningModule, "module_class", trusted)  # allowlist checked first
    if not issubclass(target, cls):
        raise ExportError(f"{root} holds a {recorded} export, not a {class_path(cls)}: load it with "
                          f"{target.__name__}.from_pretrained or mmalign.load")
    return target

