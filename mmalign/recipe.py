"""Recipes: the shipped YAML files (package data) and the one way to build a recipe into objects.

Each recipe is one YAML naming hub models (``uclip_pivot.yaml``). Its variants are overlays composed after it,
exactly as several ``--config`` files compose on the command line (jsonargparse: mappings merge, lists such
as ``objectives`` and ``callbacks`` are replaced): ``tiny/<recipe>.yaml`` swaps in random tiny encoders of the
same families and the synthetic data (the tests run it), ``offline/<recipe>.yaml`` the real packaged encoders.
One mapping does not merge: ``model.init_args.towers`` keeps only the towers the last file names (each merged with
its earlier definition), so an overlay names every tower it keeps (``text: {}`` keeps one as defined); the CLI
refuses an overlay that would drop a tower, naming the file and the towers.

    from mmalign import recipe
    recipe.list_recipes()                                   # ['clasp_speech_text', 'lit_contrastive', ...]
    recipe.recipe_files("uclip_pivot", variant="offline")   # [.../uclip_pivot.yaml, .../offline/uclip_pivot.yaml]
    config = recipe.load_config("uclip_pivot", variant="offline")   # the composed config, a plain dict
    model, data = recipe.build(config, seed=0)

``build`` instantiates exactly as ``mmalign fit --config X.yaml --seed_everything <seed>`` would (LightningCLI),
so a recipe means the same thing in the CLI, the quickstart, the benchmarks and the tests.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

if TYPE_CHECKING:
    from mmalign.cli.lightning import MMAlignCLI, load_recipe

__all__ = [
    "VARIANTS", "MMAlignCLI", "build", "describe", "list_recipes", "list_variants", "load_config", "load_recipe",
    "recipe_files", "recipe_path", "recipes",
]

#: Overlay folders beside the recipes: ``tiny/`` (random tiny twins, tests) and ``offline/`` (packaged encoders).
VARIANTS = ("offline", "tiny")
_SNIPPETS = ("trainer",)  # folders of composable snippets that are not recipe variants


def __getattr__(name: str) -> Any:
    # The LightningCLI is imported on first use, so listing recipes (``mmalign recipes``) needs no Lightning.
    if name in ("MMAlignCLI", "load_recipe"):
        from mmalign.cli import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _root() -> Path:
    # Package data: ``mmalign/recipes`` (in the repository a link to the top-level ``configs/``; in a wheel a copy).
    return Path(str(resources.files("mmalign") / "recipes")).resolve()


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``clasp_speech_text``, ..., ``uclip_pivot``)."""
    return sorted(p.stem for p in _root().glob("*.yaml"))


def list_variants(name: str) -> list[str]:
    """The overlays shipped for recipe ``name`` (a subset of :data:`VARIANTS`)."""
    return [v for v in VARIANTS if (_root() / v / f"{name}.yaml").is_file()]


def _split(name: str, variant: str | None) -> tuple[str, str | None]:
    """``"offline/uclip_pivot"`` -> ``("uclip_pivot", "offline")``; a plain name keeps ``variant``."""
    head, sep, tail = str(name).removesuffix(".yaml").rpartition("/")
    if sep and head in VARIANTS + _SNIPPETS:
        if variant is not None and variant != head:
            raise ValueError(f"recipe {name!r} names variant {head!r} but variant={variant!r} was given")
        return tail, head
    return str(name).removesuffix(".yaml"), variant


def recipe_path(name: str | Path, variant: str | None = None) -> Path:
    """The one YAML file of a shipped recipe (``uclip_pivot``), of one of its overlays (``variant="tiny"``, or
    the name ``tiny/uclip_pivot``), of a snippet (``trainer/ddp``), or ``name`` itself when it is a file."""
    path = Path(name)
    if variant is None and path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    base, variant = _split(str(name), variant)
    if variant is not None and variant not in VARIANTS + _SNIPPETS:
        raise ValueError(f"unknown variant {variant!r}; variants are {', '.join(VARIANTS)}")
    candidate = _root() / (f"{variant}/{base}.yaml" if variant else f"{base}.yaml")
    if candidate.is_file():
        return candidate
    known = ", ".join(f"{r} [{', '.join(list_variants(r)) or 'no variants'}]" for r in list_recipes())
    what = f"variant {variant!r} of recipe {base!r}" if variant else f"recipe {base!r}"
    raise FileNotFoundError(f"no {what}: not a file, and not shipped; recipes: {known}")


def recipe_files(name: str | Path, variant: str | None = None) -> list[Path]:
    """The ``--config`` files of a recipe, in order: ``[recipe]``, or ``[recipe, overlay]`` for a variant.

    ``name`` is a shipped name (``uclip_pivot``; ``offline/uclip_pivot`` is the same as ``variant="offline"``)
    or a YAML file of a complete recipe.
    """
    path = Path(name)
    if variant is None and path.suffix in (".yaml", ".yml") and path.is_file():
        return [path]
    base, variant = _split(str(name), variant)
    if variant in _SNIPPETS:
        raise ValueError(f"{name!r} is a snippet, not a recipe: compose it after one")
    files = [recipe_path(base)]
    return files + [recipe_path(base, variant)] if variant else files


def describe(name: str | Path, variant: str | None = None) -> str:
    """The one-line description of a recipe: the first comment line of its YAML."""
    for line in recipe_path(name, variant).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _parse_only_cli() -> type:
    from mmalign.cli.lightning import MMAlignCLI

    class ParseOnlyCLI(MMAlignCLI):
        """Parses and type-checks (class_path/init_args against signatures) without instantiating."""

        def _set_seed(self) -> None:  # parsing a recipe must not seed the caller's RNGs
            pass

        def instantiate_classes(self) -> None:
            pass

    return ParseOnlyCLI


def load_config(name: str | Path | Sequence[str | Path], variant: str | None = None) -> dict[str, Any]:
    """A recipe, composed with its overlay when ``variant`` is given, as a plain dict ready for :func:`build`.

    The files are parsed as ``mmalign fit --config recipe.yaml --config <variant>/recipe.yaml`` parses them
    (same merge, every value checked against the code's signatures, defaults filled in), so the dict is the
    config that command would train; nothing is instantiated and nothing is downloaded.

    Args:
        name: A shipped recipe (``uclip_pivot``, or ``offline/uclip_pivot`` for its offline variant), a YAML
            file, or a list of YAML files composed in order.
        variant: ``"tiny"`` or ``"offline"``: compose the recipe's overlay of that name.
    """
    if isinstance(name, (str, Path)):
        files = recipe_files(name, variant)
    else:
        if variant is not None:
            raise ValueError("variant applies to a recipe name, not to a list of files")
        files = [Path(f) for f in name]
    args = [a for f in files for a in ("--config", str(f))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
        cli = _parse_only_cli()(args=args, run=False, save_config_callback=None)
    config = yaml.safe_load(cli.parser.dump(cli.config))
    # The sections the files set (seed_everything, trainer, model, data), not every option the CLI has.
    sections = {k for f in files for k in (yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {})}
    return {k: v for k, v in config.items() if k in sections}


def build(config: dict[str, Any], seed: int = 0, trainer: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``(model, datamodule)`` of a recipe config dict, instantiated as ``mmalign fit --seed_everything <seed>``
    would (LightningCLI; the seed is set before the projectors are initialised).

    Args:
        config: A recipe (``{"model": ..., "data": ..., ...}``), e.g. from :func:`load_config`.
        seed: ``seed_everything``.
        trainer: Trainer options (default: no logger); the trainer itself is not returned.
    """
    from mmalign.cli.lightning import load_recipe

    cli = load_recipe(args={
        "seed_everything": seed, "model": config["model"], "data": config["data"],
        "trainer": {"logger": False, **(trainer or {})},
    })
    return cli.model, cli.datamodule


def recipes(show: str | None = None) -> None:
    """List the shipped recipes (name, one-line description, files), or print one YAML.

    Args:
        show: A recipe (``uclip_pivot``), an overlay (``tiny/uclip_pivot``, ``offline/uclip_pivot``) or a
            trainer snippet (``trainer/ddp``) whose YAML to print.
    """
    if show is not None:
        print(recipe_path(show).read_text(encoding="utf-8"), end="")
        return
    root = _root()
    print("recipes (mmalign fit --config RECIPE [--config OVERLAY]; mmalign recipes --show NAME prints one):\n")
    names = list_recipes()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")
        print(f"{'':<{width}}    {recipe_path(name)}")
        for variant in list_variants(name):
            print(f"{'':<{width}}    {recipe_path(name, variant)}  ({variant} overlay)")
    for folder in _SNIPPETS:
        snippets = sorted((root / folder).glob("*.yaml"))
        if snippets:
            print(f"\n{folder} snippets (compose after a recipe: --config RECIPE --config SNIPPET):\n")
            for p in snippets:
                print(f"{folder + '/' + p.stem:<{width}}  {describe(p)}")
                print(f"{'':<{width}}    {p}")
