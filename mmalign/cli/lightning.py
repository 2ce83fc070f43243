"""The LightningCLI of mmalign, shared by ``mmalign fit|validate|test|predict``, ``eval``, ``cache``, the
quickstart, benchmarks and tests, so a recipe YAML means the same thing everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from mmalign.cli.errors import MMAlignParser
from mmalign.data.policy import BadInputCallback
from mmalign.training.callbacks import BestCheckpoint, resolve_ckpt_path


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written only into a run folder.

    Lightning writes it to ``trainer.log_dir``, which is the working directory when the run has no logger
    (``trainer.default_root_dir`` defaults to it): every tiny fit (``logger: false``, no checkpoints) replaced
    ``./config.yaml``. A run that writes nothing else (no logger, no checkpoints saved (a fit with a
    ``ModelCheckpoint``), no ``default_root_dir`` given) now writes no config either; the parsed config stays available to callbacks (``self.config``).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        writes_elsewhere = bool(trainer.loggers) or (stage == "fit" and bool(trainer.checkpoint_callbacks))
        in_cwd = Path(trainer.default_root_dir).resolve() == Path.cwd().resolve()
        if not writes_elsewhere and in_cwd:
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


class MMAlignCLI(LightningCLI):
    """LightningCLI over any LightningModule/LightningDataModule given by ``class_path``.

    A :class:`~mmalign.data.policy.BadInputCallback` is always attached (``--bad_inputs.*``), so inputs skipped
    under ``on_error: skip`` are summed over DataLoader workers, logged and reported at the end of every run.
    A :class:`~mmalign.training.callbacks.BestCheckpoint` keeps ``best.ckpt`` beside the ``ModelCheckpoint``
    files, and ``--ckpt_path best|last|RUN_DIR`` is resolved from the run folders in a fresh process
    (:func:`~mmalign.training.callbacks.resolve_ckpt_path`). ``predict`` without ``--ckpt_path`` is refused
    (it would run untrained projectors) unless ``--allow_untrained true``; ``validate``/``test`` warn.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("parser_class", MMAlignParser)
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(BadInputCallback, "bad_inputs")
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="predict (validate, test) without --ckpt_path: run the untrained projectors anyway")
        parser.add_argument("--sweep_seeds", type=Optional[list[int]], default=None,
                            help="fit: train the recipe under each seed as one batched model; exports per seed and an "
                                 "ensemble list in <run>/sweep (mmalign.training.sweep)")
        parser.add_argument("--sweep", type=Optional[dict[str, list[float]]], default=None,
                            help="fit: hyperparameter members of one batched model, e.g. '{lr: [1e-3, 3e-4], weight_decay: "
                                 "[0.0, 0.01]}' (the grid, under each of --sweep_seeds or the recipe's seed; "
                                 "mmalign.training.sweep)")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        if isinstance(args, list):
            sub = self.config.get("subcommand")
            _check_sections(args, self.config[sub] if sub else self.config, parser)
            _check_towers(args, parser)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else {}
        seeds = config.get("sweep_seeds") if self.subcommand == "fit" else None
        settings = config.get("sweep") if self.subcommand == "fit" else None
        if seeds or settings:  # N seeds / settings of the recipe's model as one vmapped module (mmalign.training.sweep)
            from mmalign.training.sweep import SweepModule

            self.model = SweepModule.from_cli(self._parser(self.subcommand), config, seeds, settings)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.checkpoint_callbacks:  # after the recipe's ModelCheckpoint: it stays trainer.checkpoint_callback
            trainer.callbacks.append(BestCheckpoint())
        return trainer

    def _resolve_ckpt(self) -> None:
        sub = self.subcommand
        config = self.config_init[sub]
        config["ckpt_path"] = resolve_ckpt_path(self.trainer, config.get("ckpt_path"), sub)
        if sub == "fit" or config["ckpt_path"] is not None or config.get("allow_untrained"):
            return
        if sub == "predict":
            raise ValueError(
                "predict without --ckpt_path would run the UNTRAINED projectors (captions/embeddings from random "
                "weights): pass --ckpt_path best (the best checkpoint of this recipe's latest fit), last, a run "
                "folder or a .ckpt file; or --allow_untrained true to do it anyway")
        rank_zero_warn(f"mmalign {sub}: no --ckpt_path: evaluating the UNTRAINED projectors (pass --ckpt_path best "
                       "for the latest fit's best checkpoint; --allow_untrained true silences this)")

    before_fit = before_validate = before_test = before_predict = _resolve_ckpt


def _check_sections(args: list[str], config: Any, parser: Any) -> None:
    """A misspelled top-level section of a ``--config`` file (``modle:``) is an error, not silently dropped."""
    import yaml

    from mmalign.cli.errors import ConfigError, did_you_mean

    known = {str(k).split(".")[0] for k in config.keys()}
    sub = getattr(parser, "_subcommands_action", None)
    for p in [parser, *(sub.choices.values() if sub is not None else ())]:
        known |= {str(g).split(".")[0] for g in (getattr(p, "groups", None) or {})}
    known.discard("subcommand")
    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    files += [b for a, b in zip(args, args[1:]) if a in ("--config", "-c")]
    for f in files:
        path = Path(f)
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # the parser already read it; nothing to add
        for key in data if isinstance(data, dict) else ():
            if str(key) not in known:
                raise ConfigError(f"{path}: unknown section {key!r} (sections: {', '.join(sorted(known - {'config', 'fit', 'validate', 'test', 'predict'}))})"
                                  + did_you_mean(str(key), known), parser)


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, a in enumerate(args):  # in command-line order: the order jsonargparse composes them in
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
    return files


def _towers_of(data: Any) -> dict | None:
    """The ``model.init_args.towers`` mapping a YAML file sets (also under a ``fit:``-style subcommand section)."""
    if not isinstance(data, dict):
        return None
    for section in (data, *(v for k, v in data.items() if k in ("fit", "validate", "test", "predict") and isinstance(v, dict))):
        model = section.get("model")
        if isinstance(model, dict):
            towers = (model.get("init_args") or {}).get("towers") if isinstance(model.get("init_args"), dict) else None
            towers = towers if towers is not None else model.get("towers")
            if isinstance(towers, dict):
                return towers
    return None


def _check_towers(args: list[str], parser: Any) -> None:
    """An overlay whose ``towers`` mapping names only some of the towers an earlier ``--config`` defines is an error.

    jsonargparse composes a ``dict[str, Tower]`` by REPLACING the mapping (each named tower is merged with the
    earlier one of that name), so an overlay naming ``towers.speech`` alone would silently drop the text and image
    towers. The message names the file, the dropped towers and the fix (``text: {}`` keeps a tower as defined).
    """
    import yaml

    from mmalign.cli.errors import ConfigError

    defined: dict[str, str] = {}  # tower -> the file that defined it last
    for f in _config_files(args):
        path = Path(f)
        if not path.is_file():
            continue
        try:
            towers = _towers_of(yaml.safe_load(path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError):
            continue
        if towers is None:
            continue
        dropped = [name for name in defined if name not in towers]
        if dropped:
            keep = "\n".join(f"      {name}: {{}}" for name in dropped)
            raise ConfigError(
                f"{path}: model.init_args.towers names {sorted(map(str, towers))} but not {dropped}, which "
                f"{defined[dropped[0]]} defines; a later --config file's towers mapping REPLACES the earlier one "
                f"(only the towers it names are kept, each merged with its earlier definition), so {dropped} would be "
                f"dropped. Name every tower the overlay keeps; an empty entry keeps a tower as defined:\n"
                f"model:\n  init_args:\n    towers:\n{keep}", parser)
        defined.update({str(name): str(path) for name in towers})


def load_recipe(args: list[str], **kwargs: Any) -> MMAlignCLI:
    """Parse and instantiate a recipe (model, data, trainer) without running a subcommand."""
    kwargs.setdefault("save_config_callback", None)
    return MMAlignCLI(args=args, run=False, **kwargs)
