"""Device-resident cached features: a split loaded once into device (or pinned host) memory.

With ``data.init_args.resident`` set, the training split of a feature cache is copied once from its
memory-mapped shards into one tensor per tower (``[items, D]`` pooled, ``[items, T, D_tok]`` tokens +
mask when the projector reads them) on the training device, in ``resident_dtype``. Batches are then
drawn by index on the device: the loader draws a permutation of rows per epoch (a CPU index tensor,
seeded by ``seed`` and the epoch, so every rank draws the same one), slices this rank's share of each
batch, and gathers rows with ``index_select`` on the device. No per-row Python object is built for
features and nothing waits on the device (the index goes host -> device without a sync); ``meta`` and
``keys`` are looked up in numpy object arrays with the same CPU index (a list of existing strings per
batch, microseconds).

Resume: :class:`ResidentLoader` has ``state_dict``/``load_state_dict`` (seed, epoch, batches served),
which Lightning stores in the checkpoint as it does for ``StatefulDataLoader``: a fit resumed
mid-epoch gets exactly the remaining batches of that epoch's permutation.

DDP: every rank draws the same permutation and takes rows ``rank::world_size`` of each global batch of
``batch_size * world_size`` rows, so the ranks' rows are disjoint and each rank sees ``batch_size`` rows
a step (what ``DistributedSampler`` gives a map-style dataset).

Placement (``resident``): ``"auto"`` copies the split to the device when its size is within
``resident_budget`` (a fraction of the free device memory; on CPU of the available RAM), else to pinned
host memory (CUDA only) when that fits, else keeps memory-mapped reading, printing the reason either
way. ``True`` does the same but raises instead of falling back; ``False`` (default) never loads.
Splits with partial-modality rows (a row without one tower's field) stay memory-mapped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from mmalign.data.manifest import META_FIELDS

log = logging.getLogger("mmalign.cache")

RESIDENT = ("auto", True, False)
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def parse_resident(value: Any) -> str | bool:
    """``"auto"``, ``True`` or ``False`` from a YAML/CLI value (``"true"``/``"false"`` strings too)."""
    if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
        value = {"true": True, "false": False, "auto": "auto"}[value.lower()]
    if value not in RESIDENT or (value is not True and value is not False and value != "auto"):
        raise ValueError(f"resident must be 'auto', true or false, got {value!r}")
    return value


def split_bytes(cached: Any, dtype: torch.dtype) -> int:
    """Bytes the split's features need resident in ``dtype`` (all towers, tokens and masks included)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for view in cached.views.values():
        items = int(view.starts[-1] + view.shards[-1]["count"]) if view.shards else 0
        dim = view._array(0, "pooled").shape[1] if view.shards else 0
        total += items * dim * size
        if view.tokens:
            t = max(s["token_len"] for s in view.shards)
            d_tok = view._array(0, "tokens").shape[2]
            total += items * t * (d_tok * size + 1)
    return total


def memory_budget(device: torch.device, fraction: float) -> tuple[int, str]:
    """``(bytes, what)``: ``fraction`` of the free memory of ``device`` (CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction), f"{fraction:g} of the {free / 2**30:.1f} GiB free on {device}"
    import psutil

    avail = psutil.virtual_memory().available
    return int(avail * fraction), f"{fraction:g} of the {avail / 2**30:.1f} GiB of available RAM"


def choose_placement(cached: Any, device: torch.device, mode: str | bool, dtype: torch.dtype, fraction: float) -> tuple[str, str]:
    """``(placement, reason)``: placement ``"device"``, ``"pinned"`` or ``"memmap"``; the reason is printed."""
    if mode is False:
        return "memmap", "resident: false"
    partial = [n for n, v in cached.views.items() if (v.row_index < 0).any()]
    need = split_bytes(cached, dtype)
    if partial:
        reason = f"towers {partial} have rows without their field (partial-modality split): memory-mapped reading"
    else:
        budget, what = memory_budget(device, fraction)
        if need <= budget:
            return "device", f"{need / 2**20:.1f} MiB of features fit the budget ({what}): resident on {device}"
        reason = f"{need / 2**20:.1f} MiB of features exceed the budget ({what})"
        if device.type == "cuda":
            host, host_what = memory_budget(torch.device("cpu"), fraction)
            if need <= host:
                return "pinned", f"{reason}: resident in pinned host memory ({host_what}) instead"
            reason += f" and the host budget ({host_what})"
        reason += ": memory-mapped reading"
    if mode is True:
        raise ValueError(f"data.init_args.resident=true, but {reason}; use resident: auto to fall back")
    return "memmap", reason


@dataclass
class _Tower:
    row_index: torch.Tensor  # [N] row -> item, on the store's device
    pooled: torch.Tensor  # [M, D]
    tokens: torch.Tensor | None = None  # [M, T, D_tok]
    mask: torch.Tensor | None = None  # [M, T]


class ResidentStore:
    """The features of a :class:`~mmalign.cache.reader.CachedSplit`, copied once into ``device`` memory.

    Args:
        cached: The opened (validated) split.
        device: Where the features live (``"pinned"`` placement: CPU, page-locked).
        dtype: Feature dtype (fp16/bf16 halve fp32's memory; the module casts to float anyway).
        pin: Page-lock host memory (for the pinned-host fallback of a CUDA run).
    """

    def __init__(self, cached: Any, device: torch.device, dtype: torch.dtype = torch.float16, pin: bool = False) -> None:
        self.device, self.dtype, self.pin = device, dtype, pin
        self.towers: dict[str, _Tower] = {}
        for name, view in cached.views.items():
            pooled = np.concatenate([view._array(s, "pooled") for s in range(len(view.shards))])
            t = _Tower(row_index=self._put(torch.from_numpy(np.ascontiguousarray(view.row_index))),
                       pooled=self._put(torch.from_numpy(pooled).to(dtype)))
            if view.tokens:
                t_max = max(s["token_len"] for s in view.shards)
                tok = np.zeros((len(pooled), t_max, view._array(0, "tokens").shape[2]), dtype=np.float32)
                mask = np.zeros((len(pooled), t_max), dtype=bool)
                for s, shard in enumerate(view.shards):
                    a, n, tl = shard["start"], shard["count"], shard["token_len"]
                    tok[a:a + n, :tl] = view._array(s, "tokens")
                    mask[a:a + n, :tl] = view._array(s, "mask")
                t.tokens, t.mask = self._put(torch.from_numpy(tok).to(dtype)), self._put(torch.from_numpy(mask))
            self.towers[name] = t
        # The reader's string columns (Python strings up to 1M rows: one fancy index + tolist per batch).
        self.keep = cached.keep
        self.meta = {k: cached._columns[k] for k in META_FIELDS}
        self.keys = {f: cached._columns[f] for f in cached.fields}
        self.num_rows = len(cached.rows)

    def _put(self, x: torch.Tensor) -> torch.Tensor:
        if self.pin:
            return x.pin_memory()
        return x.to(self.device)

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, idx: torch.Tensor, target: torch.device | None = None) -> dict[str, Any]:
        """The ``{"meta", "keys", "features"}`` batch of rows ``idx`` (a CPU int64 tensor)."""
        host = idx.numpy()
        on = idx.to(self.device, non_blocking=True) if self.device.type != "cpu" else idx
        features = {}
        for name, t in self.towers.items():
            items = t.row_index.index_select(0, on)
            out = {"pooled": t.pooled.index_select(0, items)}
            if t.tokens is not None:
                out["tokens"], out["mask"] = t.tokens.index_select(0, items), t.mask.index_select(0, items)
            if self.pin and target is not None and target.type == "cuda":
                out = {k: v.pin_memory().to(target, non_blocking=True) for k, v in out.items()}
            features[name] = out
        return {
            "meta": {k: v.take(self.keep[host]) for k, v in self.meta.items()},
            "keys": {k: v.take(self.keep[host]) for k, v in self.keys.items()},
            "features": features,
        }


class _EpochSampler:
    """What Lightning's ``_set_sampler_epoch`` finds on a loader (``loader.sampler.set_epoch``)."""

    def __init__(self, loader: "ResidentLoader") -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class ResidentLoader:
    """Batches of a :class:`ResidentStore` by index: shuffled per epoch, sharded per rank, resumable.

    Iterating yields ``len(self)`` batches of ``batch_size`` rows of this rank. ``state_dict()`` holds
    ``{"seed", "epoch", "served"}`` (batches of the current epoch already handed out); after
    ``load_state_dict`` the next iteration continues that epoch where it stopped.

    Args:
        store: The resident features.
        batch_size: Rows per batch per rank.
        shuffle: A new permutation every epoch (``seed + epoch``); else rows in order.
        drop_last: Drop the last incomplete global batch.
        seed: Base seed of the permutations (default: ``torch.initial_seed()``, i.e. the run's seed).
        rank: This process' rank; world_size: number of ranks.
        target: The training device (the batches' tensors end up there).
    """

    def __init__(self, store: ResidentStore, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int | None = None, rank: int = 0, world_size: int = 1, target: torch.device | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store, self.batch_size, self.shuffle = store, batch_size, shuffle
        self.drop_last = drop_last and len(store) > batch_size * world_size
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self.rank, self.world_size, self.target = rank, world_size, target
        self.epoch, self.served = 0, 0
        self._resume = False
        self.sampler = _EpochSampler(self)

    def set_epoch(self, epoch: int) -> None:
        if self._resume and epoch == self.epoch:
            return  # the restored epoch: keep its position
        if epoch != self.epoch:
            self.epoch, self.served, self._resume = epoch, 0, False

    def _global(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n, g = len(self.store), self._global()
        return n // g if self.drop_last else -(-n // g)

    def order(self, epoch: int) -> torch.Tensor:
        """``[N]`` CPU row order of ``epoch`` (the same on every rank)."""
        n = len(self.store)
        if not self.shuffle:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=gen)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order, g = self.order(self.epoch), self._global()
        start = self.served if self._resume else 0
        self._resume = False
        self.served = start
        for b in range(start, len(self)):
            rows = order[b * g:(b + 1) * g][self.rank::self.world_size]
            self.served = b + 1
            yield self.store.batch(rows, self.target)
        # an epoch ran to its end: the next iteration is the next epoch unless Lightning says otherwise
        self.epoch, self.served = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.served = int(state["seed"]), int(state["epoch"]), int(state["served"])
        self._resume = True
