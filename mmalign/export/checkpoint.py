"""``mmalign export``: a Lightning checkpoint (+ its recipe) -> an export directory (either export kind).

The checkpoint and the ``config.yaml`` beside it may come from someone else, so: the checkpoint is read
without unpickling objects, only the recipe's ``model`` section is instantiated (never the optimizer,
scheduler, trainer or data), every ``class_path`` in it must be one of the project's classes (or trusted),
and tensors holding NaN/Inf are refused.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from mmalign.export.format import CONFIG_NAME, ClassList, ExportError, allowed_class_path, class_path
from mmalign.export.writer import export_module, export_state

#: Constructor arguments of a recipe's model that only training uses: never instantiated by an export.
TRAINING_ONLY = ("optimizer", "scheduler")


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


def _names_a_module(text: str) -> bool:
    """True for a dotted name whose first part is an importable top-level module (found, never imported)."""
    import importlib.util

    parts = text.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        return False
    try:
        return importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        return False


def _check_class_paths(value: Any, where: str, trusted: ClassList | None) -> None:
    """Every ``class_path`` in a recipe section must be allowed (checked before jsonargparse imports it); so must
    every plain string that names an importable module: jsonargparse imports a dotted string given for a
    callable- or class-typed argument (a projector factory, say) without any ``class_path`` key."""
    if isinstance(value, str):
        if _names_a_module(value):
            allowed_class_path(value, f"recipe {where}", trusted, kind="classes")
        return
    if isinstance(value, Mapping):
        if "class_path" in value:
            allowed_class_path(value["class_path"], f"recipe {where}", trusted, kind="classes")
        for k, v in value.items():
            _check_class_paths(v, f"{where}.{k}", trusted)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_class_paths(v, f"{where}[{i}]", trusted)


def model_section(recipe: Mapping[str, Any], trusted_classes: ClassList | None = None) -> dict[str, Any]:
    """The recipe's ``model`` section as an export instantiates it: training-only arguments dropped, every
    ``class_path`` checked against the project's packages (or ``trusted_classes``)."""
    model = copy.deepcopy(recipe.get("model"))  # jsonargparse edits lists in place
    if not isinstance(model, dict):
        raise ExportError("the recipe's model section must be a mapping with class_path/init_args")
    init = model.get("init_args")
    if isinstance(init, dict):
        for key in TRAINING_ONLY:
            init.pop(key, None)
    _check_class_paths(model, "model", trusted_classes)
    return model


def module_from_recipe(recipe: Mapping[str, Any], trusted_classes: ClassList | None = None) -> nn.Module:
    """Instantiate the recipe's ``model`` section the way LightningCLI does (jsonargparse, subclass mode).

    Only what an export holds is built: the optimizer and scheduler arguments are dropped first (a
    ``config.yaml`` could name any callable there), and every ``class_path`` must be a project class.
    """
    import lightning as L
    from jsonargparse import ArgumentParser

    model = model_section(recipe, trusted_classes)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True, fail_untyped=False)
    try:
        cfg = parser.parse_object({"model": model})
    except Exception as err:  # noqa: BLE001 - jsonargparse raises ArgumentError with the details
        raise ExportError(f"the recipe's model section does not parse: {err}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    module = instantiate(cfg).model
    if not (hasattr(module, "towers") and hasattr(module, "objectives")) and not _is_captioner(module):
        raise ExportError(f"the recipe builds a {class_path(module)}, neither an AlignmentModule-like module with towers "
                          "nor a PrefixCaptioningModule")
    return module


def _is_captioner(module: nn.Module) -> bool:
    from mmalign.captioning.module import PrefixCaptioningModule

    return isinstance(module, PrefixCaptioningModule)


def load_export_state(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Copy a checkpoint's exported tensors (projectors, temperatures, centred towers' means, LoRA) into ``module``.

    Every key and shape must match, and no value may be NaN/Inf (a diverged run is not exported).
    """
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
    bad = [k for k in expected if state_dict[k].is_floating_point() and not bool(torch.isfinite(state_dict[k]).all())]
    if bad:
        raise ExportError(f"{source}: trainable tensors {bad} hold NaN/Inf values (did training diverge?); "
                          "refusing to export them")
    if not hasattr(module, "towers"):  # a captioner: its state dict is its trainable part
        module.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
        return
    for name, tower in module.towers.items():
        prefix = f"towers.{name}.projector."
        tower.projector.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        if getattr(tower, "center", False):  # a centred tower's running mean (and how many rows it averaged)
            tower.embedding_mean.copy_(state_dict[f"towers.{name}.embedding_mean"])
            count = state_dict.get(f"towers.{name}.embedding_count")
            if count is not None:
                tower.embedding_count.copy_(count)
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
    recipe: str | os.PathLike | None = None,
    onnx: bool = False,
    trusted_classes: ClassList | None = None,
    config: str | os.PathLike | None = None,
) -> Path:
    """Export a Lightning checkpoint of an mmalign recipe (see :func:`export`; ``config`` is ``recipe``)."""
    if recipe is not None and config is not None and Path(recipe) != Path(config):
        raise ExportError(f"two recipes given: recipe={recipe} and config={config}")
    recipe = recipe if recipe is not None else config
    recipe_path = Path(recipe) if recipe is not None else find_recipe_config(ckpt)
    if recipe_path is None:
        raise ExportError(
            f"no config.yaml next to {ckpt} (LightningCLI saves one in the run's log directory): "
            "pass the recipe with --config"
        )
    recipe_cfg = read_recipe(recipe_path)
    state = load_checkpoint(ckpt)
    module = module_from_recipe(recipe_cfg, trusted_classes)
    load_export_state(module, state["state_dict"], str(ckpt))
    return export_module(
        module, output, languages=training_languages(recipe_cfg), recipe=recipe_cfg, metrics=checkpoint_metrics(state),
        checkpoint=str(Path(ckpt).resolve()), epoch=state.get("epoch"), global_step=state.get("global_step"),
        onnx=onnx,
    )


def export(ckpt: str, output: str, recipe: str | None = None, config: str | None = None, onnx: bool = False,
           trusted_classes: list[str] | None = None) -> None:
    """Export the trainable part of a checkpoint as ``config.json`` + ``model.safetensors``.

    Embedding recipes export their projectors and temperatures, visual-prefix captioners their projector
    and LoRA weights. Only the recipe's model is built (never its optimizer); every ``class_path`` in it
    must be one of mmalign's own classes or listed in ``trusted_classes``.

    Args:
        ckpt: Lightning checkpoint (``.ckpt``) of an mmalign recipe, or a folder: a run
            (``lightning_logs/version_0``) or a ``default_root_dir`` (``runs/uclip``), meaning its newest ``best.ckpt``.
        output: Directory to write (replaced if it holds an earlier export).
        recipe: Recipe YAML that trained the checkpoint (``mmalign export --config`` is the same option).
            Default: the ``config.yaml`` LightningCLI saved in the checkpoint's run directory.
        config: Same as ``recipe``.
        onnx: Also write each projector as ``onnx/<tower>.onnx`` (embedding exports).
        trusted_classes: Class paths outside mmalign's packages that the recipe may name.
    """
    if Path(ckpt).is_dir():  # a run folder or a default_root_dir (runs/uclip): its (newest) best.ckpt
        from mmalign.training.callbacks import checkpoint_in_folder

        ckpt = str(checkpoint_in_folder(ckpt))
        print(f"checkpoint: {ckpt}")
    out = export_checkpoint(ckpt, output, recipe=recipe, config=config, onnx=onnx, trusted_classes=trusted_classes)
    cfg = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    size = cfg["weights"]["num_bytes"]
    what = f"{len(cfg['towers'])} towers" if "towers" in cfg else "a captioner"
    print(f"exported {what} ({cfg['weights']['num_parameters']:,} parameters, {size / 1e6:.2f} MB) to {out}")
