"""Exported projector checkpoints: a directory with ``config.json`` + ``model.safetensors``.

The export holds the *trainable* part of an :class:`~mmalign.training.module.AlignmentModule` only (projectors
and learned temperatures, usually a few MB) and a JSON description of everything needed to rebuild
the frozen encoders (``class_path`` + ``init_args``) and check that the rebuilt ones are the ones
the projectors were trained on (``cache_key``, ``output_dim``). Nothing in the export path pickles:
Lightning checkpoints are read with ``torch.load(weights_only=True)``, weights are written with
safetensors, and the config is plain JSON. :class:`mmalign.export.model.AlignedModel` loads it.

    mmalign export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --output exports/lit
    mmalign export --ckpt last.ckpt --config runs/x/config.yaml --output exports/lit --onnx true   # a complete recipe file

Visual-prefix captioners (:class:`~mmalign.captioning.PrefixCaptioningModule`) are written by the same
:func:`export_module` in their own layout (:mod:`mmalign.export.captioner`); both share the ``weights`` and
``provenance`` entries and the reading rules of :mod:`mmalign.export.format`.

Layout of an embedding export's ``config.json`` (``format_version`` 2; version 1 had the same keys; version 3, written
only when a tower centres its outputs, adds ``"center": true`` to those towers and their ``towers.<name>.embedding_mean``
tensor, so a reader that predates centring refuses the export instead of embedding without it)::

    {"format": "mmalign.aligned_model", "format_version": 2, "embed_dim": 32,
     "towers": {name: {"field", "modality", "normalize", ["center",] "output_dim",
                       "encoder": {"class_path", "init_args", "spec", "cache_key", "output_dim"},
                       "projector": {"class_path", "init_args", "num_parameters"}}},
     "objectives": [{"towers", "weight", "loss": {"class_path", "logit_scale", "logit_bias"}}],
     "languages": [...] | null,
     "weights": {"file", "sha256", "num_bytes", "num_parameters", "tensors": {key: {"shape", "dtype"}}},
     "onnx": {tower: {"file", "inputs", "output"}} | absent,
     "provenance": {"mmalign_version", "torch_version", "created", "checkpoint", "epoch",
                    "global_step", "metrics", "recipe"}}
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mmalign.export.format import (
    CONFIG_NAME, FORMAT, MEAN_KEY, ONNX_DIR, ExportError, atomic_directory, check_output_dir, class_path,
    format_version, json_loose, json_strict, write_json,
)
from mmalign.export.weights import write_weights


# -- what an export holds ----------------------------------------------------------------------

def encoder_config(encoder: nn.Module, tower: str, where: str | None = None) -> dict[str, Any]:
    """``class_path``, ``init_args``, ``spec``, ``cache_key`` and ``output_dim`` of a frozen encoder.

    Args:
        encoder: The frozen encoder.
        tower: Its tower's name (for messages).
        where: Its config.json key, for messages (default ``towers.<tower>.encoder``).
    """
    return {
        "class_path": class_path(encoder),
        "init_args": json_strict(encoder.init_args(), f"{where or f'towers.{tower}.encoder'}.init_args"),
        "spec": json_loose(encoder.spec()),
        "cache_key": encoder.cache_key,
        "output_dim": int(encoder.output_dim),
    }


def tower_config(name: str, tower: nn.Module) -> dict[str, Any]:
    """Everything that rebuilds one tower except its weights."""
    if tower.projector is None:
        raise ExportError(f"tower {name!r} has no projector yet: build the module before exporting")
    proj = tower.projector.config()
    return {
        "field": tower.field,
        "modality": str(tower.encoder.modality),
        "normalize": bool(tower.normalize),
        **({"center": True} if getattr(tower, "center", False) else {}),  # absent: not centred (format_version 2)
        "output_dim": int(tower.out_dim),
        "encoder": encoder_config(tower.encoder, name),
        "projector": {
            "class_path": proj["class_path"],
            "init_args": json_strict(proj["init_args"], f"towers.{name}.projector.init_args"),
            "num_parameters": sum(p.numel() for p in tower.projector.parameters()),
        },
    }


def objective_config(objective: nn.Module) -> dict[str, Any]:
    """Towers, weight, loss class and the learned temperature (and bias) values of an objective."""
    loss = objective.loss
    scale = getattr(loss, "logit_scale", None)
    bias = getattr(loss, "logit_bias", None)
    return {
        "towers": list(objective.towers),
        "weight": float(objective.weight),
        "loss": {
            "class_path": class_path(loss),
            "logit_scale": float(scale().detach()) if callable(scale) else None,  # exp(log_scale), clamped
            "logit_bias": float(bias.detach()) if isinstance(bias, Tensor) else None,
            "false_negatives": getattr(loss, "false_negatives", None),  # training-time only, recorded for provenance
        },
    }


def export_state(module: nn.Module) -> dict[str, Tensor]:
    """The tensors an export stores: projector weights/buffers and objective parameters (temperatures);
    for a captioner its (trainable-only) state dict: projector and LoRA weights.

    Keys are the module's own state-dict keys (``towers.<name>.projector.*``, ``objectives.<i>.*``),
    so a Lightning checkpoint's ``state_dict`` maps onto them one to one. Frozen encoders are never
    included (their ``state_dict`` is empty by contract).
    """
    if not hasattr(module, "towers"):  # a captioner: its state dict holds the trainable tensors only
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    state: dict[str, Tensor] = {}
    for name, tower in module.towers.items():
        for key, value in tower.projector.state_dict().items():
            state[f"towers.{name}.projector.{key}"] = value
        if getattr(tower, "center", False):
            state[f"towers.{name}.{MEAN_KEY}"] = tower.embedding_mean.float()
    for i, objective in enumerate(module.objectives):
        skip = {f"loss.{k}" for k in getattr(objective.loss, "training_buffers", ())}  # a ClipLoss queue: training state
        for key, value in objective.state_dict().items():
            if key not in skip:
                state[f"objectives.{i}.{key}"] = value
    # safetensors refuses shared or non-contiguous storage: store independent copies on CPU.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def build_export_config(
    module: nn.Module,
    *,
    languages: list[str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of an embedding export (without the ``weights`` entry, added when writing)."""
    missing = [a for a in ("towers", "objectives", "embed_dim") if not hasattr(module, a)]
    if missing:
        raise ExportError(f"{class_path(module)} has no {missing}: exports cover AlignmentModule-style recipes")

    towers = {name: tower_config(name, tower) for name, tower in module.towers.items()}
    return {
        "format": FORMAT,
        "format_version": format_version(towers),
        "embed_dim": int(module.embed_dim),
        "towers": towers,
        "objectives": [objective_config(o) for o in module.objectives],
        "languages": sorted(languages) if languages is not None else None,
        "provenance": provenance(recipe=recipe, metrics=metrics, checkpoint=checkpoint, epoch=epoch,
                                 global_step=global_step),
    }


def provenance(
    *,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
) -> dict[str, Any]:
    """config.json's ``provenance``: versions, date, checkpoint, epoch/step, metrics and the recipe.

    Descriptive only: nothing here is ever imported or instantiated when an export is loaded.
    """
    import mmalign

    return {
        "mmalign_version": getattr(mmalign, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "epoch": epoch,
        "global_step": global_step,
        "metrics": json_loose(dict(metrics)) if metrics else None,
        "recipe": json_loose(dict(recipe)) if recipe else None,
    }


# -- writing -----------------------------------------------------------------------------------

def export_module(
    module: nn.Module,
    output: str | os.PathLike,
    *,
    languages: list[str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
    onnx: bool = False,
) -> Path:
    """Write a trained module's trainable part as an export directory (both export kinds).

    An :class:`~mmalign.training.module.AlignmentModule` gives an embedding export (projectors and
    temperatures), a :class:`~mmalign.captioning.PrefixCaptioningModule` a captioner export (projector
    and LoRA weights). The directory is assembled next to ``output`` and moved into place, so a reader
    never sees half an export. An existing export at ``output`` is replaced; any other non-empty
    directory is refused. Tensors holding NaN/Inf are refused (a diverged run is not exported).

    Args:
        module: A built module (towers with projectors, or a captioner).
        output: Target directory.
        languages: Languages seen in training (recorded; ``AlignedModel`` warns on others).
        recipe: The recipe config (the YAML as a dict) that trained the module.
        metrics: Final metrics to record (e.g. ``trainer.callback_metrics``).
        checkpoint: Path of the Lightning checkpoint the weights came from.
        epoch: Training epoch of the weights.
        global_step: Optimizer step of the weights.
        onnx: Also write ``onnx/<tower>.onnx`` for every tower's projector (needs ``onnx`` and
            ``onnxscript``; see :func:`export_onnx`).

    Returns:
        The export directory.
    """
    output = check_output_dir(output)
    meta = dict(languages=languages, recipe=recipe, metrics=metrics, checkpoint=checkpoint, epoch=epoch,
                global_step=global_step)
    state = None
    if hasattr(module, "towers"):
        from mmalign.export.tower import export_towers

        if export_towers(module):  # a grown space: the source exports' towers copied unchanged + the new ones
            from mmalign.extend import extended_export

            if onnx:
                raise ExportError("ONNX export of an extended space is not supported: export the new towers' "
                                  "projectors from a module without ExportTowers")
            config, state = extended_export(module, **meta)
        else:
            config = build_export_config(module, **meta)
    else:
        from mmalign.captioning.module import PrefixCaptioningModule
        from mmalign.export.captioner import captioner_config

        if not isinstance(module, PrefixCaptioningModule):
            raise ExportError(f"{class_path(module)} is neither an AlignmentModule-style module (towers + objectives) "
                              "nor a PrefixCaptioningModule: there is no export format for it")
        if onnx:
            raise ExportError("ONNX export covers embedding towers' projectors; a captioner's prefix feeds an LM")
        config = captioner_config(module, **meta)
    state = export_state(module) if state is None else state
    with atomic_directory(output) as tmp:
        config["weights"] = write_weights(state, tmp, f"the weights of {class_path(module)}")
        if onnx:
            config["onnx"] = export_onnx(module, tmp / ONNX_DIR)
        write_json(tmp / CONFIG_NAME, config)
    return output


class _ProjectorGraph(nn.Module):
    """One tower's projector (+ L2 normalisation) as a tensor-in, tensor-out graph for ONNX."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.projector = tower.projector
        self.normalize = tower.normalize
        self.uses_tokens = bool(getattr(tower.projector, "uses_tokens", False))
        self.center = bool(getattr(tower, "center", False))
        if self.center:  # a constant of the graph
            self.register_buffer("embedding_mean", tower.embedding_mean.detach().float().clone())

    def forward(self, pooled: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        from encoders.base import EncoderOutput

        out = self.projector(EncoderOutput(pooled=pooled, tokens=tokens, mask=mask))  # [B, D]
        if self.normalize:
            out = nn.functional.normalize(out, dim=-1)
        if self.center:
            out = out - self.embedding_mean.to(out.dtype)
            out = nn.functional.normalize(out, dim=-1) if self.normalize else out
        return out


def export_onnx(module: nn.Module, directory: str | os.PathLike) -> dict[str, Any]:
    """Write each tower's projector as ``<directory>/<tower>.onnx`` (batch and token axes dynamic).

    Inputs are the encoder outputs: ``pooled [B, D_enc]`` and, for token projectors, ``tokens
    [B, T, D_tok]`` and ``mask [B, T]`` (bool); inputs a projector never reads are dropped by the
    exporter, so config.json lists each graph's actual inputs. The output ``embeds [B, D]`` is normalised
    if the tower normalises. Needs ``pip install onnx onnxscript`` (torch's exporter).

    Returns:
        ``{tower: {"file", "inputs", "output"}}`` for config.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    for name, tower in module.towers.items():
        graph = _ProjectorGraph(tower).eval().to("cpu")
        param = next(iter(graph.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        enc = tower.encoder
        batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
        pooled = torch.zeros(2, enc.output_dim, dtype=dtype)
        args: tuple[Tensor, ...] = (pooled,)
        names = ["pooled"]
        dynamic: tuple[dict[int, Any], ...] = ({0: batch},)
        if graph.uses_tokens:
            token_dim = int(getattr(enc, "token_dim", enc.output_dim))
            args = (pooled, torch.zeros(2, 3, token_dim, dtype=dtype), torch.ones(2, 3, dtype=torch.bool))
            names += ["tokens", "mask"]
            dynamic += ({0: batch, 1: tokens}, {0: batch, 1: tokens})
        path = directory / f"{name}.onnx"
        try:
            torch.onnx.export(graph, args, str(path), input_names=names, output_names=["embeds"],
                              dynamic_shapes=dynamic, dynamo=True, verbose=False)
        except ImportError as err:
            raise ExportError(f"ONNX export needs `pip install onnx onnxscript` ({err})") from err
        import onnx

        # The exporter drops inputs the graph never reads (``pooled`` for token-pooling projectors).
        inputs = [i.name for i in onnx.load(str(path)).graph.input]
        info[name] = {"file": f"{ONNX_DIR}/{path.name}", "inputs": inputs, "output": "embeds"}
    return info
