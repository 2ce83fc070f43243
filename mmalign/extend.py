"""Grow a trained space: train a new tower into an existing export and write ONE export holding both.

    mmalign extend --base runs/quickstart/export --recipe offline/extend --output runs/extend

A recipe that extends a space names the export's towers as :class:`~mmalign.export.tower.ExportTower`\\ s
(frozen teachers or contrastive targets: encoder + trained projector, loaded through the safe loader) beside
the new tower(s) (a new text encoder for more languages, a second speech encoder, a new modality), and trains
the new towers only. Exporting such a module (``mmalign extend``, ``ExportOnFitEnd``, ``mmalign export``)
writes :func:`extended_export`: every tower of the source export(s), config entry copied verbatim and
tensors copied bit for bit (same keys, dtypes and values), its objectives and temperatures, then the new
towers and objectives. ``provenance`` is the new training's, with ``provenance.extends`` listing each source
export (path, weights sha256, the tower name map, languages, and its own provenance, which nests the chain
of earlier extensions) and ``provenance.trained_towers`` naming the towers this training added.

Renaming: an ExportTower keeps its name in the module (``text`` for the export's ``text`` tower, say); a
module may give it another name, and the written export then uses that name for it (the other towers of the
source keep theirs). The field a teacher reads in training (``text_en`` for parallel text) does not change the
copied entry: the tower keeps the field it was trained on.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from mmalign.export.format import ExportError
from mmalign.export.tower import ExportTower, export_towers


# -- the merged export ---------------------------------------------------------------------------

def _source_tensors(tower: ExportTower) -> dict[str, Tensor]:
    from mmalign.export.weights import load_tensors, open_weights, verify_checksum

    weights = open_weights(tower.source.root, tower.source.config)
    verify_checksum(weights)  # the file may have changed since the tower was loaded
    if weights.info["sha256"] != tower.source.weights_sha256:  # pragma: no cover - verify_checksum compares with config
        raise ExportError(f"{tower.source.root}: the weights changed since the tower was loaded")
    return load_tensors(weights)


def extended_export(
    module: nn.Module,
    *,
    languages: list[str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json without "weights", tensors)`` of a module whose towers include ExportTowers.

    The source exports' towers and objectives come first, unchanged; the module's own towers and objectives
    follow (objective indices shifted past the sources'). See the module docstring for names and provenance.

    Raises:
        ExportError: Two towers with one name, two ExportTowers of one exported tower, source exports of
            another shared size than the module's, or a source export whose weights changed since loading.
    """
    from mmalign.export.format import FORMAT, MEAN_KEY, format_version
    from mmalign.export.writer import objective_config, provenance, tower_config

    sources = export_towers(module)
    embed_dim = int(module.embed_dim)
    new_names = [n for n in module.towers if n not in sources]
    # one entry per source export (by weights sha256): its ExportTowers' {source tower: module name}
    bases: dict[str, dict[str, Any]] = {}
    for name, tower in sources.items():
        src = tower.source
        base = bases.setdefault(src.weights_sha256, {"tower": tower, "map": {}})
        if src.tower_name in base["map"]:
            raise ExportError(f"towers {base['map'][src.tower_name]!r} and {name!r} both load tower {src.tower_name!r} of "
                              f"{src.root}: an export holds each tower once; evaluate other fields with one tower")
        base["map"][src.tower_name] = name
    towers: dict[str, Any] = {}
    state: dict[str, Tensor] = {}
    objectives: list[dict[str, Any]] = []
    extends: list[dict[str, Any]] = []
    for sha, base in bases.items():
        src = base["tower"].source
        cfg = src.config
        if int(cfg["embed_dim"]) != embed_dim:
            raise ExportError(f"{src.root} is a {cfg['embed_dim']}-d space but the module's is {embed_dim}-d")
        tensors = _source_tensors(base["tower"])
        names = {t: base["map"].get(t, t) for t in cfg["towers"]}  # every tower of the source, renamed if loaded so
        for old, new in names.items():
            if new in towers or new in new_names:
                raise ExportError(f"tower name {new!r} is used twice in the extended export (tower {old!r} of {src.root} "
                                  f"and another tower); rename the new tower")
            towers[new] = copy.deepcopy(cfg["towers"][old])
            prefix = f"towers.{old}.projector."
            state.update({f"towers.{new}.projector.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)})
            if f"towers.{old}.{MEAN_KEY}" in tensors:  # a centred tower's mean, copied like its weights
                state[f"towers.{new}.{MEAN_KEY}"] = tensors[f"towers.{old}.{MEAN_KEY}"]
        for i, obj in enumerate(cfg.get("objectives") or []):
            j = len(objectives)
            objectives.append({**copy.deepcopy(obj), "towers": [names.get(t, t) for t in obj["towers"]]})
            prefix = f"objectives.{i}."
            state.update({f"objectives.{j}.{k[len(prefix):]}": v for k, v in tensors.items() if k.startswith(prefix)})
        other = {k: v for k, v in tensors.items() if not k.startswith(("towers.", "objectives."))}
        clash = sorted(set(other) & set(state))
        if clash:
            raise ExportError(f"{src.root}: tensors {clash} clash with another source's")
        state.update(other)
        extends.append({
            "export": str(src.root), "weights_sha256": sha, "towers": names, "embed_dim": int(cfg["embed_dim"]),
            "languages": cfg.get("languages"), "provenance": cfg.get("provenance"),
        })
    for name in new_names:
        tower = module.towers[name]
        towers[name] = tower_config(name, tower)
        for key, value in tower.projector.state_dict().items():
            state[f"towers.{name}.projector.{key}"] = value
        if tower.center:
            state[f"towers.{name}.{MEAN_KEY}"] = tower.embedding_mean.float()
    offset = len(objectives)
    for i, obj in enumerate(module.objectives):
        objectives.append(objective_config(obj))
        for key, value in obj.state_dict().items():
            state[f"objectives.{offset + i}.{key}"] = value
    langs = set(languages or [])
    for entry in extends:
        langs |= set(entry["languages"] or [])
    prov = provenance(recipe=recipe, metrics=metrics, checkpoint=checkpoint, epoch=epoch, global_step=global_step)
    prov["trained_towers"] = new_names
    prov["extends"] = extends
    config = {
        "format": FORMAT,
        "format_version": format_version(towers),
        "embed_dim": embed_dim,
        "towers": towers,
        "objectives": objectives,
        "languages": sorted(langs) if (languages is not None or any(e["languages"] for e in extends)) else None,
        "provenance": prov,
    }
    # copies on CPU, independent storage (safetensors refuses shared tensors); dtypes as stored
    return config, {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


# -- ``mmalign extend`` --------------------------------------------------------------------------

def _recipe_towers(files: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The composed recipe's towers (parsed, nothing instantiated) and the names of its ExportTowers."""
    from mmalign.recipe import load_config

    config = load_config([str(f) for f in files])
    towers = (((config.get("model") or {}).get("init_args") or {}).get("towers")) or {}
    names = [name for name, t in towers.items()
             if isinstance(t, dict) and str(t.get("class_path", "")).rsplit(".", 1)[-1] == "ExportTower"]
    return towers, names


def extend(
    recipe: str | list[str] = "offline/extend",
    base: str | None = None,
    output: str = "runs/extend",
    train: str | None = None,
    val: str | None = None,
    test: str | None = None,
    max_epochs: int | None = None,
    cache: bool = True,
    evaluate: bool = True,
    args: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a new tower into an existing space; write one export with the old towers unchanged plus the new one.

    Runs the recipe as ``mmalign fit`` would (LightningCLI), with every :class:`~mmalign.export.tower.ExportTower`
    of the recipe pointed at ``base``: encodes each split once into the feature cache (the ExportTowers'
    embeddings too, keyed by the export's sha256), fits the new tower(s), tests the best checkpoint on every pair
    of towers in the extended space (trained and emergent, per language), and writes ``<output>/export``.

    Args:
        recipe: A shipped recipe (``extend``, ``offline/extend``, ``tiny/extend``) or YAML files composed in order.
        base: The export to extend (sets the ``path`` of every ExportTower in the recipe). Default: the paths
            the recipe gives.
        output: Run folder: checkpoints, ``cache/``, ``export/`` and ``results.json``.
        train: Train manifest (overrides the recipe's ``data.init_args.train``); ``val``, ``test`` likewise.
        max_epochs: Override the recipe's epochs.
        cache: Encode into ``<output>/cache`` first and train from it (default); ``False`` trains on raw data.
        evaluate: Test the best (else last) checkpoint after the fit.
        args: More LightningCLI options (``["--trainer.max_steps=10"]``).
        progress: Show progress bars while caching.

    Returns:
        ``{"export", "checkpoint", "towers": {"kept": [...], "trained": [...]}, "results", "kinds"}``.
    """
    import yaml
    from lightning.pytorch.cli import SaveConfigCallback

    from mmalign.export.format import read_config
    from mmalign.export.writer import export_module
    from mmalign.export.checkpoint import training_languages
    from mmalign.recipe import load_recipe, recipe_files
    from mmalign.training.callbacks import _recipe_config

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = [f for item in ([recipe] if isinstance(recipe, (str, os.PathLike)) else recipe) for f in recipe_files(item)]
    towers, names = _recipe_towers(files)
    if not names:
        raise ValueError(f"recipe {[str(f) for f in files]} has no mmalign.ExportTower tower: there is no space to extend "
                         "(name the existing export's towers as ExportTowers; see configs/extend.yaml)")
    if base is not None:
        read_config(base)  # a clear error now rather than inside the CLI
        # the whole towers mapping (an overlay naming only some towers would drop the others when merged)
        for name in names:
            towers[name]["init_args"]["path"] = str(base)
        overlay = out / "extend_base.yaml"
        overlay.write_text(yaml.safe_dump({"model": {"init_args": {"towers": towers}}}, sort_keys=False), encoding="utf-8")
        files.append(overlay)
    cli_args = [a for f in files for a in ("--config", str(f))] + [f"--trainer.default_root_dir={out}"]
    cli_args += [f"--data.init_args.{k}={v}" for k, v in (("train", train), ("val", val), ("test", test)) if v]
    if max_epochs is not None:
        cli_args.append(f"--trainer.max_epochs={max_epochs}")
    if cache:
        cli_args.append(f"--data.init_args.cache_dir={out / 'cache'}")
    cli_args += list(args or [])
    cli = load_recipe(cli_args, save_config_callback=SaveConfigCallback, save_config_kwargs={"overwrite": True})
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    kept = {n: t.source.tower_name for n, t in export_towers(model).items()}
    trained = [n for n in model.towers if n not in kept]
    print(f"[mmalign extend] space {sorted({str(t.source.root) for t in export_towers(model).values()})}: "
          f"frozen towers {kept}, training {trained}")
    if cache:
        from mmalign.cache.command import cache as write_cache

        write_cache(model, data, output=str(out / "cache"), progress=progress)
    trainer.fit(model, data)
    ckpt_cb = trainer.checkpoint_callback
    ckpt = (ckpt_cb.best_model_path or ckpt_cb.last_model_path or None) if ckpt_cb is not None else None
    results: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    if evaluate and data.split_manifests().get("test"):
        trainer.test(model, data, ckpt_path=ckpt, verbose=False)
        last = getattr(model, "last_eval", None) or {}
        results, kinds = last.get("results", {}), last.get("kinds", {})
        _print_results(results, kinds)
    elif ckpt:  # export the checkpoint's weights, as the test would have loaded them
        from mmalign.export.checkpoint import load_checkpoint, load_export_state

        load_export_state(model, load_checkpoint(ckpt)["state_dict"], ckpt)
    path = export_module(model, out / "export", languages=training_languages(datamodule=data),
                         recipe=_recipe_config(trainer), metrics={"test": results} if results else None, checkpoint=ckpt,
                         epoch=trainer.current_epoch, global_step=trainer.global_step)
    summary = {"export": str(path), "checkpoint": ckpt, "towers": {"kept": sorted(read_config(path)["towers"].keys() - set(trained)),
                                                                   "trained": trained},
               "results": results, "kinds": kinds}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(f"[mmalign extend] wrote {path}: towers kept unchanged {summary['towers']['kept']}, trained {trained}")
    return summary


def _print_results(results: Mapping[str, Any], kinds: Mapping[str, str]) -> None:
    """One line per pair, direction and language: R@1 (trained or emergent)."""
    for pair, per_lang in results.items():
        for lang, directions in per_lang.items():
            cells = ", ".join(f"{d} R@1 {m['R@1']:.3f}" for d, m in directions.items())
            print(f"[mmalign extend] {pair} ({kinds.get(pair, '?')}) {lang}: {cells}")
