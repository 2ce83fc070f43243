"""``mmalign export``: a Lightning checkpoint (+ its recipe) -> an export directory."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mmalign.export.format import ExportError, class_path
from mmalign.export.format import CONFIG_NAME
from mmalign.export.writer import export_module, export_state


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
