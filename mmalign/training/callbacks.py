"""Lightning callbacks of mmalign (usable from a recipe's ``trainer.callbacks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ExportOnFitEnd(L.Callback):
    """Write an export (``config.json`` + ``model.safetensors``) when ``fit`` ends.

    The one end-of-fit exporter of both export kinds: an :class:`~mmalign.training.module.AlignmentModule`
    gives an embedding export, a :class:`~mmalign.captioning.PrefixCaptioningModule` a captioner export (its
    ``export_dir`` argument runs this callback). Weights holding NaN/Inf are refused, not exported.

    In a recipe::

        trainer:
          callbacks:
            - class_path: mmalign.training.callbacks.ExportOnFitEnd
              init_args: {output: exports/lit}

    Args:
        output: Export directory. Default: ``<trainer.log_dir or default_root_dir>/export``.
        onnx: Also write ONNX projectors (see :func:`mmalign.export.export_onnx`).
        best: Export the best checkpoint of the trainer's ``ModelCheckpoint`` (if it has one)
            instead of the weights the module holds at the end of fit.
    """

    def __init__(self, output: str | None = None, onnx: bool = False, best: bool = False) -> None:
        super().__init__()
        self.output = output
        self.onnx = onnx
        self.best = best
        self.path: Path | None = None  # where the last export went

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from mmalign.export import export_module, load_checkpoint, load_export_state, training_languages

        ckpt_cb = trainer.checkpoint_callback
        checkpoint = None
        if ckpt_cb is not None:
            checkpoint = getattr(ckpt_cb, "best_model_path", "") if self.best else getattr(ckpt_cb, "last_model_path", "")
            checkpoint = checkpoint or getattr(ckpt_cb, "best_model_path", "") or None
        epoch, step = trainer.current_epoch, trainer.global_step
        if self.best and checkpoint:
            state = load_checkpoint(checkpoint)
            load_export_state(pl_module, state["state_dict"], checkpoint)
            epoch, step = state.get("epoch", epoch), state.get("global_step", step)
        output = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "export"
        self.path = export_module(
            pl_module,
            output,
            languages=training_languages(datamodule=trainer.datamodule),
            recipe=_recipe_config(trainer),
            metrics={k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1},
            checkpoint=checkpoint,
            epoch=epoch,
            global_step=step,
            onnx=self.onnx,
        )
        rank_zero_info(f"mmalign: exported projectors to {self.path}")


def _recipe_config(trainer: L.Trainer) -> dict[str, Any] | None:
    """The full config LightningCLI parsed (held by its SaveConfigCallback), or None outside the CLI."""
    import yaml
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            return yaml.safe_load(cb.parser.dump(cb.config, skip_none=False, skip_validation=True))
    return None
