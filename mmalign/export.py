"""Exported projector checkpoints: a directory with ``config.json`` + ``model.safetensors``.

The export holds the *trainable* part of an :class:`~mmalign.module.AlignmentModule` only (projectors
and learned temperatures, usually a few MB) and a JSON description of everything needed to rebuild
the frozen encoders (``class_path`` + ``init_args``) and check that the rebuilt ones are the ones
the projectors were trained on (``cache_key``, ``output_dim``). Nothing in the export path pickles:
Lightning checkpoints are read with ``torch.load(weights_only=True)``, weights are written with
safetensors, and the config is plain JSON. :class:`mmalign.inference.AlignedModel` loads it.

    mmalign export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --output exports/lit
    mmalign export --ckpt last.ckpt --config configs/tiny/lit_contrastive.yaml --output exports/lit --onnx true

Layout of ``config.json`` (``format_version`` 1)::

    {"format": "mmalign.aligned_model", "format_version": 1, "embed_dim": 32,
     "towers": {name: {"field", "modality", "normalize", "output_dim",
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

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

FORMAT = "mmalign.aligned_model"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_DIR = "onnx"


class ExportError(ValueError):
    """An export cannot be written, or an exported directory is inconsistent; the message says what."""


# -- JSON helpers ------------------------------------------------------------------------------

def class_path(obj: Any) -> str:
    """``module.QualName`` of an object's class (what ``class_path`` in YAML and config.json means)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def json_strict(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON types; raise naming ``where`` if it holds anything else.

    Used for constructor arguments, which must rebuild objects exactly: a silent ``str()`` of an
    object would produce an export that loads into something different.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ExportError(f"{where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ExportError(f"{where} has a non-string key {k!r}")
            out[k] = json_strict(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [json_strict(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ExportError(
        f"{where} is a {type(value).__name__} ({value!r:.80}); exports hold plain JSON values only, "
        "so this object cannot be recorded for rebuilding"
    )


def json_loose(value: Any) -> Any:
    """Plain JSON types for descriptive fields (specs, metrics, recipes): unknown objects become ``str``."""
    def default(o: Any) -> Any:
        if isinstance(o, Tensor) and o.numel() == 1:
            return o.item()
        return str(o)

    return json.loads(json.dumps(value, default=default, sort_keys=True))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- what an export holds ----------------------------------------------------------------------

def encoder_config(encoder: nn.Module, tower: str) -> dict[str, Any]:
    """``class_path``, ``init_args``, ``spec``, ``cache_key`` and ``output_dim`` of a frozen encoder."""
    return {
        "class_path": class_path(encoder),
        "init_args": json_strict(encoder.init_args(), f"towers.{tower}.encoder.init_args"),
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
    """The tensors an export stores: projector weights/buffers and objective parameters (temperatures).

    Keys are the module's own state-dict keys (``towers.<name>.projector.*``, ``objectives.<i>.*``),
    so a Lightning checkpoint's ``state_dict`` maps onto them one to one. Frozen encoders are never
    included (their ``state_dict`` is empty by contract).
    """
    state: dict[str, Tensor] = {}
    for name, tower in module.towers.items():
        for key, value in tower.projector.state_dict().items():
            state[f"towers.{name}.projector.{key}"] = value
    for i, objective in enumerate(module.objectives):
        for key, value in objective.state_dict().items():
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
    """The ``config.json`` of an export (without the ``weights`` entry, added when writing)."""
    import mmalign

    missing = [a for a in ("towers", "objectives", "embed_dim") if not hasattr(module, a)]
    if missing:
        raise ExportError(f"{class_path(module)} has no {missing}: exports cover AlignmentModule-style recipes")

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "embed_dim": int(module.embed_dim),
        "towers": {name: tower_config(name, tower) for name, tower in module.towers.items()},
        "objectives": [objective_config(o) for o in module.objectives],
        "languages": sorted(languages) if languages is not None else None,
        "provenance": {
            "mmalign_version": getattr(mmalign, "__version__", "unknown"),
            "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "epoch": epoch,
            "global_step": global_step,
            "metrics": json_loose(dict(metrics)) if metrics else None,
            "recipe": json_loose(dict(recipe)) if recipe else None,
        },
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
    """Write an :class:`~mmalign.module.AlignmentModule`'s projectors as an export directory.

    The directory is assembled next to ``output`` and moved into place, so a reader never sees half
    an export. An existing export at ``output`` is replaced; any other non-empty directory is refused.

    Args:
        module: A built module (towers with projectors).
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
    from safetensors.torch import save_file

    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / CONFIG_NAME).exists())):
        raise ExportError(f"{output} exists and is not an mmalign export; choose an empty or new directory")
    config = build_export_config(
        module, languages=languages, recipe=recipe, metrics=metrics, checkpoint=checkpoint,
        epoch=epoch, global_step=global_step,
    )
    state = export_state(module)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        weights = tmp / WEIGHTS_NAME
        save_file(state, str(weights), metadata={"format": "pt", "mmalign_format": FORMAT})
        config["weights"] = {
            "file": WEIGHTS_NAME,
            "sha256": sha256_file(weights),
            "num_bytes": weights.stat().st_size,
            "num_parameters": sum(v.numel() for v in state.values()),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
        }
        if onnx:
            config["onnx"] = export_onnx(module, tmp / ONNX_DIR)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        # mkdtemp makes a private (0700) folder; an export is meant to be shared like any model directory.
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


class _ProjectorGraph(nn.Module):
    """One tower's projector (+ L2 normalisation) as a tensor-in, tensor-out graph for ONNX."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.projector = tower.projector
        self.normalize = tower.normalize
        self.uses_tokens = bool(getattr(tower.projector, "uses_tokens", False))

    def forward(self, pooled: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        from encoders.base import EncoderOutput

        out = self.projector(EncoderOutput(pooled=pooled, tokens=tokens, mask=mask))  # [B, D]
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


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


# -- from a Lightning checkpoint ---------------------------------------------------------------

def load_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint without unpickling arbitrary objects (``weights_only=True``).

    Lightning checkpoints of mmalign recipes hold tensors and plain containers only, which the
    restricted unpickler accepts. A checkpoint that smuggles other objects (custom hparams classes)
    is refused rather than executed.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError variants
        raise ExportError(
            f"{path} cannot be read with torch.load(weights_only=True): {err}\n"
            "mmalign never unpickles arbitrary objects; a checkpoint holding non-tensor objects (e.g. custom "
            "classes in hyper_parameters) must be re-saved with plain values"
        ) from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ExportError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return state


def find_recipe_config(ckpt: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` LightningCLI saved in the run directory of ``ckpt`` (its folder or the one above)."""
    ckpt = Path(ckpt).resolve()
    for folder in (ckpt.parent, ckpt.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe config not found: {path}")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(recipe, dict) or "model" not in recipe:
        raise ExportError(f"{path} has no 'model' section: pass the recipe YAML that trained the checkpoint")
    return recipe


def module_from_recipe(recipe: Mapping[str, Any]) -> nn.Module:
    """Instantiate the recipe's ``model`` section the way LightningCLI does (jsonargparse, subclass mode)."""
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True, fail_untyped=False)
    try:
        cfg = parser.parse_object({"model": copy.deepcopy(recipe["model"])})  # it edits lists in place
    except Exception as err:  # noqa: BLE001 - jsonargparse raises ArgumentError with the details
        raise ExportError(f"the recipe's model section does not parse: {err}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    module = instantiate(cfg).model
    if not hasattr(module, "towers") or not hasattr(module, "objectives"):
        raise ExportError(f"the recipe builds a {class_path(module)}, not an AlignmentModule-like module with towers")
    return module


def load_export_state(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Copy a checkpoint's projector/objective tensors into ``module``; every key and shape must match."""
    expected = export_state(module)
    missing = [k for k in expected if k not in state_dict]
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs recipe {tuple(v.shape)}"
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or wrong:
        raise ExportError(
            f"{source} does not fit the recipe's module (was it trained with another config?)"
            + (f"\n  missing tensors: {missing}" if missing else "")
            + (f"\n  shape mismatches: {wrong}" if wrong else "")
        )
    for name, tower in module.towers.items():
        prefix = f"towers.{name}.projector."
        tower.projector.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    for i, objective in enumerate(module.objectives):
        prefix = f"objectives.{i}."
        objective.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})


def training_languages(recipe: Mapping[str, Any] | None = None, datamodule: Any = None) -> list[str] | None:
    """Languages of the training rows: from a set-up datamodule, else from the recipe's train manifest."""
    train_set = (getattr(datamodule, "datasets", None) or {}).get("train")
    if hasattr(train_set, "languages"):  # a ManifestDataset
        return list(train_set.languages)
    if hasattr(train_set, "rows"):  # a feature-cache split keeps its manifest rows
        return sorted({r.get("lang", "und") for r in train_set.rows})
    init = ((recipe or {}).get("data") or {}).get("init_args") or {}
    train = init.get("train")
    if not train or not Path(train).is_file():
        return None
    from mmalign.data.manifest import read_manifest

    langs = {r["lang"] for r in read_manifest(train)}
    if init.get("train_languages"):
        langs &= set(init["train_languages"])
    return sorted(langs)


def checkpoint_metrics(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The monitored score(s) recorded by ModelCheckpoint callbacks in a checkpoint, if any."""
    out: dict[str, Any] = {}
    for cb in (state.get("callbacks") or {}).values():
        if isinstance(cb, Mapping) and cb.get("monitor") and cb.get("best_model_score") is not None:
            out[f"best/{cb['monitor']}"] = float(cb["best_model_score"])
    return out or None


def export_checkpoint(
    ckpt: str | os.PathLike,
    output: str | os.PathLike,
    config: str | os.PathLike | None = None,
    onnx: bool = False,
) -> Path:
    """Export a Lightning checkpoint of an mmalign recipe (see :func:`export`)."""
    recipe_path = Path(config) if config is not None else find_recipe_config(ckpt)
    if recipe_path is None:
        raise ExportError(
            f"no config.yaml next to {ckpt} (LightningCLI saves one in the run's log directory): "
            "pass the recipe with --config"
        )
    recipe = read_recipe(recipe_path)
    state = load_checkpoint(ckpt)
    module = module_from_recipe(recipe)
    load_export_state(module, state["state_dict"], str(ckpt))
    return export_module(
        module, output, languages=training_languages(recipe), recipe=recipe, metrics=checkpoint_metrics(state),
        checkpoint=str(Path(ckpt).resolve()), epoch=state.get("epoch"), global_step=state.get("global_step"),
        onnx=onnx,
    )


def export(ckpt: str, output: str, config: str | None = None, onnx: bool = False) -> None:
    """Export the projectors of a trained checkpoint as ``config.json`` + ``model.safetensors``.

    Args:
        ckpt: Lightning checkpoint (``.ckpt``) of an mmalign recipe.
        output: Directory to write (replaced if it holds an earlier export).
        config: Recipe YAML that trained the checkpoint. Default: the ``config.yaml`` LightningCLI saved
            in the checkpoint's run directory.
        onnx: Also write each projector as ``onnx/<tower>.onnx``.
    """
    out = export_checkpoint(ckpt, output, config=config, onnx=onnx)
    cfg = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    size = cfg["weights"]["num_bytes"]
    print(f"exported {len(cfg['towers'])} towers ({cfg['weights']['num_parameters']:,} parameters, "
          f"{size / 1e6:.2f} MB) to {out}")
