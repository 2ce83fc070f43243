"""DataModule yielding raw batches (each tower's encoder preprocesses in DataLoader workers) or, with
``cache_dir`` set, batches of cached encoder features written by ``mmalign cache``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

from mmalign.data.collate import TowerCollator, tower_fields
from mmalign.data.manifest import ManifestDataset
from mmalign.data.sources import ListSource, open_source

# Splits each Lightning stage reads: a cache need not hold the test split to fit, nor train to test.
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors on ``device``: nested dicts, lists and tuples of tensors walked directly, a
    tensor already there returned as is (no copy, no call). Lightning's ``move_data_to_device`` does the same
    through ``apply_to_collection``, at ~0.3 ms per cached batch of a few towers, which is ~1% of a CPU
    projector step; anything else still goes through it. Non-blocking copies where Lightning makes them
    (CUDA), blocking on CPU and MPS."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        return value.to(device, non_blocking=device.type not in ("cpu", "mps"))
    if type(value) is dict:
        return {k: _to_device(v, device) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_device(v, device) for v in value)
    return move_data_to_device(value, device)


class EpochRandomSampler(StatefulRandomSampler, RandomSampler):
    """A shuffled order that is a pure function of ``(seed, epoch)``, as ``DistributedSampler.set_epoch`` gives.

    torchdata's ``RandomSampler`` seeds its generator once from the global RNG and lets it run on across epochs,
    so an epoch's order depends on every random draw made before it. Lightning does not checkpoint the global
    RNG, so a fit resumed from a checkpoint taken at an epoch end reshuffled differently from the uninterrupted
    run. Here each epoch's permutation is drawn from a generator seeded with ``seed + epoch`` (the epoch Lightning
    passes to ``set_epoch`` before every epoch, the one the checkpoint restores). Mid-epoch resume is unchanged:
    torchdata's iterator still saves the generator state and the position within the epoch.

    Lightning builds the loader's first iterator (torchdata draws the permutation then) before it calls
    ``set_epoch``, so the DataModule passes the epoch the fit loop is at (``epoch``): on a resumed fit that is
    the restored one, not 0. The seed is saved with the loader's state (``state_dict``) and restored from a
    mid-epoch checkpoint; Lightning restores no loader state from an epoch-end one, so there the seed is the
    resumed process' ``torch.initial_seed()``: exact for a seeded run (``seed_everything``, as the recipes set),
    not for an unseeded one. The epoch is never restored from that state (Lightning's ``set_epoch`` names it).

    A subclass of torch's ``RandomSampler`` as well, so Lightning sees a shuffled loader and, under DDP, swaps in a
    ``DistributedSampler(shuffle=True, seed=<run seed>)`` (itself a function of the seed and epoch).

    Args:
        data_source: The map-style dataset.
        seed: Base seed (default: ``torch.initial_seed()``, the run's seed, as the resident loader uses).
        epoch: The epoch of the first iteration.
    """

    def __init__(self, data_source: Any, seed: int | None = None, epoch: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Any:
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])


class AlignmentDataModule(L.LightningDataModule):
    """Train/val/test manifests -> raw batches for an :class:`~mmalign.training.module.AlignmentModule`.

    The towers (and so the fields and preprocessing) are taken from the model the trainer fits, so a
    recipe's YAML never repeats them.

    Args:
        train: Training data: a manifest (``.jsonl``/``.csv``) or any source spec of :mod:`mmalign.data.sources`
            (Parquet/Arrow/HF folder, wide table with ``fields:``, text corpus, audio folder, WebDataset
            shards; see docs/data.md), or a list of them concatenated in order (e.g. the emoji names plus
            extra spoken vocabulary from ``mmalign data words``).
        val: Validation manifest (or a list).
        test: Test manifest or list (defaults to ``val``).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (encoder preprocessing runs there).
        train_languages: Train only on rows in these languages (``["en"]``: English-pivot recipes).
        eval_languages: Evaluate only on rows in these languages (default: all).
        on_error: Bad-input policy (``mmalign.data.policy``): ``"error"`` raises naming the item and field;
            ``"skip"`` drops bad rows and media, counted per reason and reported (``BadInputCallback``).
        silent_audio: ``"error"``, ``"skip"`` or ``"allow"`` for all-silent clips.
        cache_dir: Read encoder features from this feature cache (``mmalign cache --config <this recipe>``)
            instead of raw files: no decoding, no encoder forward. A cache written for another encoder,
            other rows or other sizes is refused with :class:`~mmalign.cache.CacheError`.
        verify_cache: Recompute the dataset fingerprint (file sizes/mtimes) when opening the cache.
        max_image_pixels: Image files with more pixels are bad input (``huge image``), refused before
            decoding; default ``None``: ``MMALIGN_MAX_IMAGE_PIXELS`` or 50 MP (:mod:`encoders.image_io`);
            ``0``: no limit. ``mmalign cache`` follows it too.
        resident: With ``cache_dir``: load the training split's features once into device memory and draw
            batches by index there (:mod:`mmalign.cache.resident`): ``"auto"`` when they fit
            ``resident_budget`` (else pinned host memory on CUDA, else memory-mapped reading, with the
            reason printed), ``true`` (the same, but an error instead of memory-mapped reading), ``false``
            (default: memory-mapped reading). Resumable mid-epoch, sharded over DDP ranks.
        resident_dtype: Dtype of resident features: ``float16`` (default, as cached), ``bfloat16``, ``float32``.
        resident_budget: Fraction of the free device memory (CPU: available RAM) resident features may take.
    """

    def __init__(
        self,
        train: str | dict[str, Any] | list[Any] | None = None,
        val: str | dict[str, Any] | list[Any] | None = None,
        test: str | dict[str, Any] | list[Any] | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        train_languages: list[str] | None = None,
        eval_languages: list[str] | None = None,
        on_error: str = "error",
        silent_audio: str = "error",
        cache_dir: str | None = None,
        verify_cache: bool = True,
        max_image_pixels: int | None = None,
        resident: str | bool = False,
        resident_dtype: str = "float16",
        resident_budget: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.datasets: dict[str, Any] = {}
        self._towers: dict[str, tuple[str, Callable]] | None = None
        self._module_towers: dict[str, Any] | None = None
        self._skipped: dict[str, dict[str, int]] = {}
        self._resident: dict[str, Any] = {}  # split -> ResidentStore (or None: memory-mapped)
        from mmalign.cache.resident import DTYPES, parse_resident

        self.hparams.resident = parse_resident(resident)
        if resident_dtype not in DTYPES:
            raise ValueError(f"resident_dtype must be one of {sorted(DTYPES)}, got {resident_dtype!r}")

    def connect(self, module: Any) -> None:
        """Bind the towers whose encoders preprocess the data (done automatically in ``setup``)."""
        self._towers = tower_fields(module)
        self._module_towers = dict(module.towers.items())
        # Field pairs a row may hold to be usable (partial-modality rows): the objectives'.
        pairs = [tuple(o.towers) for o in getattr(module, "objectives", [])]
        self._field_sets = [sorted({module.towers[t].field for t in p}) for p in pairs if all(t in module.towers for t in p)]

    def split_manifests(self) -> dict[str, tuple[str | list[str], list[str] | None]]:
        """``{split: (manifest path, languages)}`` of the configured splits (test defaults to val)."""
        hp = self.hparams
        splits = {"train": (hp.train, hp.train_languages), "val": (hp.val, hp.eval_languages),
                  "test": (hp.test or hp.val, hp.eval_languages)}
        return {s: v for s, v in splits.items() if v[0]}

    def cache_split(self, split: str) -> str:
        """Folder of ``split`` in the cache: ``test`` without its own manifest reuses ``val``'s features."""
        return "val" if split == "test" and not self.hparams.test else split

    def manifest_dataset(self, split: str) -> Any:
        """The raw rows of ``split``, filtered by language and required fields (what the cache is keyed on)."""
        if self._towers is None:
            raise RuntimeError("AlignmentDataModule needs the model's towers: call connect(module) first")
        splits = self.split_manifests()
        if split not in splits:
            raise ValueError(f"no {split} manifest configured (data.init_args.{split})")
        path, langs = splits[split]
        fields = sorted({f for f, _ in self._towers.values()})
        field_sets = getattr(self, "_field_sets", None)
        if not field_sets or len(fields) <= 2:  # one pair: every field is needed by every row
            return open_source(path, langs, fields, self.hparams.on_error)
        from mmalign.data.collate import usable_rows
        from mmalign.data.manifest import ManifestError

        rows = open_source(path, langs, (), self.hparams.on_error)
        if not isinstance(rows, ManifestDataset):  # a table's lazy rows: keep the usable ones in a list
            rows = ListSource.of(rows.rows, rows)
        rows.rows = usable_rows(rows.rows, fields, field_sets, rows.path, rows.report, self.hparams.on_error)
        if not rows.rows:
            raise ManifestError(f"{rows.path}: no usable rows (each needs the fields of one of {field_sets}; "
                                f"{rows.report.summary()})")
        return rows

    def setup(self, stage: str | None = None) -> None:
        if self._towers is None:
            if self.trainer is None or self.trainer.lightning_module is None:
                raise RuntimeError("AlignmentDataModule needs the model's towers: call connect(module) first")
            self.connect(self.trainer.lightning_module)
        wanted = _STAGE_SPLITS.get(stage or "", ("train", "val", "test"))
        for split in self.split_manifests():
            if split in self.datasets or split not in wanted:
                continue
            rows = self.manifest_dataset(split)
            self._skipped[split] = rows.skipped
            if self.hparams.cache_dir is None:
                self.datasets[split] = rows
            else:
                if isinstance(rows, IterableDataset):  # WebDataset shards: the rows `mmalign cache` listed
                    rows = rows.materialize(Path(self.hparams.cache_dir) / "_media" / self.cache_split(split))
                from mmalign.cache.reader import CachedSplit

                cached = CachedSplit(Path(self.hparams.cache_dir) / self.cache_split(split), rows.rows, self._module_towers,
                                     verify=self.hparams.verify_cache, on_error=self.hparams.on_error)
                cached.report = getattr(rows, "report", None)  # merged with the rows the cache left out
                self._skipped[split] = dict(cached.report.counts)
                self.datasets[split] = cached

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"no {split} manifest configured (data.init_args.{split})")
        ds = self.datasets[split]
        if shuffle and self.hparams.cache_dir is not None and self.hparams.resident is not False:
            loader = self._resident_loader(split, ds)
            if loader is not None:
                return loader
        collate: Callable = TowerCollator(self._towers, self.hparams.on_error, self.hparams.silent_audio,
                                          max_image_pixels=self.hparams.max_image_pixels)
        if self.hparams.cache_dir is not None:
            from mmalign.cache.reader import passthrough  # the cached dataset builds whole batches

            collate = passthrough
        # torchdata's StatefulDataLoader checkpoints its sampler position and shuffle state: Lightning then
        # resumes a killed fit mid-epoch on exactly the batches the uninterrupted run would have seen; the
        # sampler's order is a function of (seed, epoch), so a fit resumed at an epoch end does too.
        stream = isinstance(ds, IterableDataset)  # WebDataset shards: shuffled by shard, split by rank and worker
        return StatefulDataLoader(
            ds,
            batch_size=self.hparams.batch_size,
            sampler=EpochRandomSampler(ds, epoch=self._fit_epoch()) if shuffle and not stream else None,
            drop_last=shuffle and not stream and len(ds) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=collate,
            persistent_workers=self.hparams.num_workers > 0,
            # page-locked host batches let Lightning's transfer to the GPU overlap with compute
            pin_memory=torch.cuda.is_available(),
            # An evaluation loader draws its base seed from its own generator, not the global torch stream: a
            # validation in the middle of an epoch then leaves the training stream (dropout masks, mixup) as it
            # was, so a fit resumed from a checkpoint on either side of it continues bit for bit.
            generator=None if shuffle else torch.Generator().manual_seed(0),
        )

    def _fit_epoch(self) -> int:
        """The epoch Lightning's fit loop will pass to ``set_epoch`` next (restored on resume), else 0."""
        loop = getattr(self.trainer, "fit_loop", None) if self.trainer is not None else None
        return int(loop.epoch_progress.current.processed) if loop is not None else 0

    def _resident_loader(self, split: str, ds: Any) -> Any:
        """A :class:`~mmalign.cache.resident.ResidentLoader` over ``split``, or None (memory-mapped reading)."""
        from mmalign.cache.resident import DTYPES, ResidentLoader, ResidentStore, choose_placement

        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if split not in self._resident:
            dtype = DTYPES[self.hparams.resident_dtype]
            placement, reason = choose_placement(ds, device, self.hparams.resident, dtype, self.hparams.resident_budget)
            print(f"[mmalign] {split} features: {reason}", flush=True)
            self._resident[split] = None if placement == "memmap" else ResidentStore(
                ds, torch.device("cpu") if placement == "pinned" else device, dtype, pin=placement == "pinned")
        store = self._resident[split]
        if store is None:
            return None
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ResidentLoader(store, self.hparams.batch_size, shuffle=True, drop_last=True, rank=rank,
                              world_size=world, target=device)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the batch's tensors; ``meta`` and ``keys`` (lists of strings) are passed through unwalked.

        Lightning's default walks every element of every list of the batch (ids, concepts, languages, paths),
        which costs more than the projector step itself on cached features.
        """
        if not isinstance(batch, dict) or "meta" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {k: v if k in ("meta", "keys", "skipped") else _to_device(v, device) for k, v in batch.items()}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def skipped(self) -> dict[str, dict[str, int]]:
        """Counts of rows skipped under ``on_error="skip"``, per split and reason."""
        return {s: dict(d) for s, d in self._skipped.items() if d}
