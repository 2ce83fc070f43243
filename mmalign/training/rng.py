"""The global random state in checkpoints, so that a resumed fit draws the uninterrupted run's dropout masks
and mixup partners/lambdas.

Lightning checkpoints the weights, optimizer, loops and the loaders' state, not the global RNG (torch CPU,
CUDA, numpy, Python ``random``) that dropout and :func:`~mmalign.training.mixup.mixup_batch` draw from. The
modules' ``on_save_checkpoint`` call :func:`save_rng_state` and ``on_load_checkpoint`` / the first training
batch call :func:`restore_rng_state` (:class:`RngResume`):

- Saved under ``checkpoint["mmalign_rng"]`` = ``{"world_size": W, "ranks": [state of rank 0, ..., W - 1]}``;
  under DDP each rank's state is gathered (``torch.distributed.all_gather_object``: ``on_save_checkpoint``
  runs on every rank) and each rank restores its own. Tensors, ints and lists only, so
  ``torch.load(..., weights_only=True)`` still reads the checkpoint.
- A checkpoint of another world size: every rank restores rank 0's state, with a warning (the data partition
  differs anyway, so that resume is not exact; Lightning seeds every rank alike, so the ranks' streams start
  equal in a fresh run too). CUDA states are restored when the checkpoint has one per visible device.
- Old checkpoints without the key load as before (the process's own, freshly seeded, state).
- When: at ``on_load_checkpoint`` (a resume from an epoch-end checkpoint: the resumed run then opens the next
  epoch's loader, drawing its base seed as the uninterrupted run did) and again at the first training batch
  when that batch is mid-epoch (``batch_idx > 0``: the uninterrupted run opened this epoch's loader before
  the checkpoint, so the resumed run's extra draw when re-opening it is undone).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

KEY = "mmalign_rng"


def _state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(internal), py_gauss],
    }


def _set_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def save_rng_state(checkpoint: dict[str, Any]) -> None:
    """Put every rank's global random state into ``checkpoint`` (call on every rank: it gathers under DDP)."""
    rank, world = _dist()
    state = _state()
    if world > 1:
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, state)
    else:
        states = [state]
    checkpoint[KEY] = {"world_size": world, "ranks": states}


def restore_rng_state(checkpoint: dict[str, Any], warn: bool = True) -> bool:
    """Restore this rank's saved global random state; ``False`` (nothing changed) for a checkpoint without one."""
    saved = checkpoint.get(KEY)
    if not saved:
        return False
    rank, world = _dist()
    if saved["world_size"] != world:
        if rank == 0 and warn:
            warnings.warn(f"the checkpoint's random states are from {saved['world_size']} processes, this run has {world}: "
                          f"every process restores rank 0's (the resume is not exact)", stacklevel=2)
        rank = 0
    _set_state(saved["ranks"][rank])
    return True


class RngResume:
    """What a LightningModule's hooks call: ``save`` / ``load`` with the checkpoint, ``batch_start`` with
    ``batch_idx`` at every training batch (restores again at the first batch of a mid-epoch resume)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def save(self, checkpoint: dict[str, Any]) -> None:
        save_rng_state(checkpoint)

    def load(self, checkpoint: dict[str, Any]) -> None:
        if restore_rng_state(checkpoint):
            self.pending = {KEY: checkpoint[KEY]}

    def batch_start(self, batch_idx: int) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            if batch_idx > 0:
                restore_rng_state(pending, warn=False)


class RngCheckpointHooks:
    """LightningModule mixin: the global RNG in checkpoints through the three hooks, with one :class:`RngResume`
    per module (created on first use, so subclasses need no ``__init__`` call). :class:`FrozenBackboneModule`
    (alignment and captioning modules) and :class:`~mmalign.training.sweep.SweepModule` inherit it; a subclass
    overriding a hook calls ``super()``."""

    @property
    def _rng(self) -> RngResume:
        rng = self.__dict__.get("_rng_resume")
        if rng is None:
            rng = self.__dict__["_rng_resume"] = RngResume()
        return rng

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng.load(checkpoint)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._rng.batch_start(batch_idx)
