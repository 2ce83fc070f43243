"""The LightningCLI of mmalign, shared by ``mmalign fit|validate|test|predict``, ``eval``, ``cache``, the
quickstart, benchmarks and tests, so a recipe YAML means the same thing everywhere."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from mmalign.data.policy import BadInputCallback


class MMAlignCLI(LightningCLI):
    """LightningCLI over any LightningModule/LightningDataModule given by ``class_path``.

    A :class:`~mmalign.data.policy.BadInputCallback` is always attached (``--bad_inputs.*``), so inputs skipped
    under ``on_error: skip`` are summed over DataLoader workers, logged and reported at the end of every run.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
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


def load_recipe(args: list[str], **kwargs: Any) -> MMAlignCLI:
    """Parse and instantiate a recipe (model, data, trainer) without running a subcommand."""
    kwargs.setdefault("save_config_callback", None)
    return MMAlignCLI(args=args, run=False, **kwargs)
