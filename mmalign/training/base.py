"""What every mmalign LightningModule shares: optimisation of the trainable (projector) parameters only,
and validation/test routed through one ``_eval_step`` / ``_eval_epoch_end`` pair per module."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from mmalign.training.rng import RngCheckpointHooks


class FrozenBackboneModule(RngCheckpointHooks, L.LightningModule):  # the global RNG in checkpoints (exact resume)
    """Base of :class:`~mmalign.training.module.AlignmentModule` and :class:`~mmalign.captioning.PrefixCaptioningModule`.

    Subclasses call ``super().__init__(optimizer, scheduler)`` and implement ``_eval_step(batch, stage)``
    and ``_eval_epoch_end(stage)`` (``stage`` is ``"val"`` or ``"test"``).
    """

    def __init__(self, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        self._optimizer = optimizer
        self._scheduler = scheduler

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eval_epoch_end(self, stage: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Projector, temperature (and LoRA) parameters: frozen encoders and LMs never reach the optimizer."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer(self.trainable_parameters())
        if self._scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}
