"""What every mmalign LightningModule shares: optimisation of the trainable (projector) parameters only,
and validation/test routed through one ``_eval_step`` / ``_eval_epoch_end`` pair per module."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from mmalign.training.rng import RngCheckpointHooks

_PLAIN_VALUES = (str, int, float, bool, type(None))


class FrozenBackboneModule(RngCheckpointHooks, L.LightningModule):  # the global RNG in checkpoints (exact resume)
    """Base of :class:`~mmalign.training.module.AlignmentModule` and :class:`~mmalign.captioning.PrefixCaptioningModule`.

    Subclasses call ``super().__init__(optimizer, scheduler)`` and implement ``_eval_step(batch, stage)``
    and ``_eval_epoch_end(stage)`` (``stage`` is ``"val"`` or ``"test"``).
    """

    def __init__(self, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        self._optimizer = optimizer
        self._scheduler = scheduler

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module.__setattr__``, with a fast path for re-setting an existing plain attribute to a plain value.

        Lightning sets ``_current_fx_name`` before and after every hook it dispatches (~40 times a training step);
        ``nn.Module.__setattr__`` checks each value against parameters, buffers and submodules (~3 us a call on a
        CPU). A name already in the instance ``__dict__`` is none of those (they live in ``_parameters``,
        ``_buffers`` and ``_modules``), so storing a str/int/float/bool/None there is what ``nn.Module`` does too.
        """
        if type(value) in _PLAIN_VALUES and name in self.__dict__:
            self.__dict__[name] = value
            return
        super().__setattr__(name, value)

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

    def _parameter_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """The trainable parameters; one extra group per tower with ``lr_scale != 1`` (its projector's)."""
        params = self.trainable_parameters()
        towers = getattr(self, "towers", None) or {}
        scaled = {name: t for name, t in towers.items() if getattr(t, "lr_scale", 1.0) != 1.0}
        if not scaled:
            return params
        groups, taken = [], set()
        for name, tower in scaled.items():
            ps = [p for p in tower.projector.parameters() if p.requires_grad]
            taken |= {id(p) for p in ps}
            if ps:
                groups.append({"params": ps, "lr_scale": tower.lr_scale, "tower": name})
        rest = [p for p in params if id(p) not in taken]
        return ([{"params": rest}] if rest else []) + groups

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer(self._parameter_groups())
        for group in optimizer.param_groups:  # before the scheduler records each group's initial lr
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        if self._scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}
