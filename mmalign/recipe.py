"""Recipes: the shipped YAML files (package data) and the one way to build a recipe into objects.

    from mmalign import recipe
    recipe.list_recipes()                                   # ['clasp_speech_text', 'lit_contrastive', ...]
    model, data = recipe.build(recipe.load_config("offline/uclip_pivot"), seed=0)

``build`` instantiates exactly as ``mmalign fit --config X.yaml --seed_everything <seed>`` would (LightningCLI),
so a recipe means the same thing in the CLI, the quickstart, the benchmarks and the tests.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mmalign.cli.lightning import MMAlignCLI, load_recipe

__all__ = ["MMAlignCLI", "build", "list_recipes", "load_config", "load_recipe", "recipe_path"]


def _root() -> Path:
    # Package data: ``mmalign/recipes`` (in the repository a link to the top-level ``configs/``; in a wheel a copy).
    return Path(str(resources.files("mmalign") / "recipes"))


def list_recipes(include_variants: bool = True) -> list[str]:
    """Names of the shipped recipes (``uclip_pivot``; with variants also ``offline/uclip_pivot``, ``tiny/...``)."""
    root = _root()
    names = [p.stem for p in root.glob("*.yaml")]
    if include_variants:
        names += [f"{p.parent.name}/{p.stem}" for p in root.glob("*/*.yaml") if p.parent.name != "trainer"]
    return sorted(names)


def recipe_path(name: str | Path) -> Path:
    """The YAML file of a shipped recipe name (``offline/uclip_pivot``), or ``name`` itself when it is a file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = _root() / f"{str(name).removesuffix('.yaml')}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"no recipe {str(name)!r}: not a file, and not one of {', '.join(list_recipes())}")


def load_config(name: str | Path) -> dict[str, Any]:
    """A recipe as a plain dict (``yaml.safe_load``), by shipped name or path."""
    return yaml.safe_load(recipe_path(name).read_text(encoding="utf-8"))


def build(config: dict[str, Any], seed: int = 0, trainer: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``(model, datamodule)`` of a recipe config dict, instantiated as ``mmalign fit --seed_everything <seed>``
    would (LightningCLI; the seed is set before the projectors are initialised).

    Args:
        config: A recipe (``{"model": ..., "data": ..., ...}``), e.g. from :func:`load_config`.
        seed: ``seed_everything``.
        trainer: Trainer options (default: no logger); the trainer itself is not returned.
    """
    cli = load_recipe(args={
        "seed_everything": seed, "model": config["model"], "data": config["data"],
        "trainer": {"logger": False, **(trainer or {})},
    })
    return cli.model, cli.datamodule
