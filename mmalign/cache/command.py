"""``mmalign cache``: encode a recipe's dataset once with its frozen encoders.

    mmalign cache --config configs/lit_contrastive.yaml --config configs/tiny/lit_contrastive.yaml --output cache/lit
    mmalign cache --config recipe.yaml --split train,val --rank 0 --world_size 4   # one of 4 writers
    torchrun --nproc_per_node 4 -m mmalign.cli cache --config recipe.yaml          # rank from the env

The recipe YAML is the one ``mmalign fit`` reads: its ``model`` and ``data`` are instantiated by
jsonargparse from the same ``class_path``/``init_args`` (several ``--config`` files compose as for
``fit``), so the cache holds exactly the features that recipe's towers would compute. Train from it by
setting ``data.init_args.cache_dir`` (the only change to the recipe).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmalign.cache.writer import write_split
from mmalign.data.policy import BadInputReport


def _device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


#: Items per encoder forward when ``--batch_size`` is not given, by modality: ``(CPU, GPU)``. Features never
#: depend on it (a speed and memory knob only). CPU: throughput peaks near 8-16 images
#: (docs/benchmarks.md, batch-size rule) and larger batches only add activation memory; GPU: large
#: batches keep the device busy and still take a few GB of activations at most for these encoders in fp16/bf16.
ENCODE_BATCH: dict[str, tuple[int, int]] = {"image": (16, 256), "speech": (8, 64), "text": (32, 512)}


def encode_batch_size(encoder: Any, device: torch.device, memory_budget_gb: float | None = None) -> int:
    """Items per forward of ``encoder`` on ``device``: the encoder's own ``cache_batch_size`` when it sets
    one, else :data:`ENCODE_BATCH` by modality, halved until its estimated activations fit
    ``memory_budget_gb`` (estimate: ``encoder.cache_item_bytes`` when set, else 8 MB per image,
    16 MB per speech clip, 1 MB per text; the measured peak RSS of the LiT recipe is in docs/benchmarks.md).
    """
    gpu = device.type == "cuda"
    own = getattr(encoder, "cache_batch_size", None)
    modality = str(getattr(encoder, "modality", "text"))
    size = int(own) if own else ENCODE_BATCH.get(modality, (16, 128))[1 if gpu else 0]
    if memory_budget_gb is not None:
        per_item = getattr(encoder, "cache_item_bytes", None) or {"image": 8 << 20, "speech": 16 << 20}.get(modality, 1 << 20)
        while size > 1 and size * per_item > memory_budget_gb * 2**30:
            size //= 2
    return max(1, size)


def _splits(split: str | list[str] | None, available: list[str]) -> list[str]:
    if split is None:
        return available
    names = [s.strip() for s in (split.split(",") if isinstance(split, str) else split) if s.strip()]
    unknown = [s for s in names if s not in available]
    if unknown:
        raise ValueError(f"split(s) {unknown} are not configured in the recipe's data; configured: {available}")
    return names


def cache(
    model: L.LightningModule,
    data: L.LightningDataModule,
    split: str | list[str] | None = None,
    output: str | None = None,
    batch_size: int | None = None,
    memory_budget_gb: float | None = None,
    num_workers: int | None = None,
    shard_size: int = 4096,
    dtype: str = "float16",
    fingerprint: str = "stat",
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    seed_everything: bool | int | None = None,
    trainer: dict | None = None,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """Run each frozen encoder of the recipe once over its data and write the feature cache.

    Media and features follow the recipe's bad-input policy exactly as ``mmalign fit`` does
    (``data.init_args.on_error``, ``silent_audio``, ``max_image_pixels``): a corrupt, truncated, huge or
    too short medium, or NaN/Inf features, stop the run under ``error`` (default) with the row id, the
    field and the path; under ``skip`` those rows are left out of the cache (listed in its manifest with
    their reason, counted and printed here, and not read by training or evaluation from the cache).
    Re-running on a finished cache writes nothing.

    Args:
        model: The recipe's model (an ``AlignmentModule``), from ``--config recipe.yaml``.
        data: The recipe's data (an ``AlignmentDataModule``).
        split: Splits to cache, ``train,val`` or ``[train, val]`` (default: every configured split;
            ``test`` without its own manifest shares ``val``'s features).
        output: Cache folder (default: the recipe's ``data.init_args.cache_dir``).
        batch_size: Items per encoder forward (default: chosen per encoder and device by
            :func:`encode_batch_size`, never the recipe's training batch: a LiT recipe's batch 256 of
            images took 6.1 GB of RSS on a CPU for no speed).
        memory_budget_gb: Cap the automatic forward batch so its estimated activations fit this many
            GB (ignored with ``batch_size``). Peak memory is then about: encoder weights + forward
            activations of one batch + one shard's features in float32 (``shard_size`` items of
            pooled and token features); it does not grow with the dataset (docs/cache.md).
        num_workers: Preprocessing workers (default: the recipe's).
        shard_size: Unique items per shard file.
        dtype: Storage dtype, ``float16`` (default) or ``float32``.
        fingerprint: ``stat`` (file size + mtime, default), ``content`` (file bytes) or ``rows`` (values only).
        rank: This writer's index (default: torch.distributed, then the ``RANK`` env variable, then 0).
        world_size: Number of writers (default: torch.distributed, then ``WORLD_SIZE``, then 1).
        device: ``auto`` (``cuda:$LOCAL_RANK`` when available, else CPU), ``cpu``, ``cuda:1``...
        progress: Show progress bars.
        seed_everything: Accepted from the recipe and ignored (encoders are deterministic).
        trainer: Accepted from the recipe and ignored.
        ckpt_path: Accepted from the recipe and ignored.

    Returns:
        ``{split: manifest summary or None}`` (None: other ranks still have shards to write).
    """
    del seed_everything, trainer, ckpt_path
    if not hasattr(data, "manifest_dataset"):
        raise TypeError(f"mmalign cache needs an AlignmentDataModule-like data module, got {type(data).__name__}")
    out_dir = output or data.hparams.get("cache_dir")
    if not out_dir:
        raise ValueError("give --output DIR or set data.init_args.cache_dir in the recipe")
    data.connect(model)
    available = [s for s in data.split_manifests() if data.cache_split(s) == s]
    summary: dict[str, Any] = {}
    on_error = data.hparams.get("on_error", "error")
    silent_audio = data.hparams.get("silent_audio", "error")
    max_image_pixels = data.hparams.get("max_image_pixels")
    for name in _splits(split, available):
        dataset = data.manifest_dataset(name)
        if hasattr(dataset, "materialize"):  # WebDataset shards: media extracted once beside the cache, rows listed
            dataset = dataset.materialize(Path(out_dir) / "_media" / name)
        rows = dataset.rows  # a lazy view for tables: rows are built as the writer reads them
        if dataset.report:  # rows the manifest reader dropped under on_error=skip never reach the cache
            print(f"[mmalign cache] {name}: " + dataset.report.summary("manifest rows skipped"))
        report = BadInputReport()
        manifest = write_split(
            rows, dict(model.towers.items()), Path(out_dir) / name, split=name,
            batch_size=batch_size or (lambda enc: encode_batch_size(enc, _device(device), memory_budget_gb)),
            num_workers=data.hparams.num_workers if num_workers is None else num_workers,
            shard_size=shard_size, dtype=dtype, fingerprint=fingerprint, rank=rank, world_size=world_size,
            device=_device(device), progress=progress, on_error=on_error, report=report,
            silent_audio=silent_audio, max_image_pixels=max_image_pixels,
        )
        if manifest is None:
            print(f"[mmalign cache] {name}: this rank's shards are done; waiting for other ranks to finish the merge")
            summary[name] = None
            continue
        entries = {k: {"items": e["num_items"], "dim": e["dim"], "tokens": e["tokens"]} for k, e in manifest["entries"].items()}
        print(f"[mmalign cache] {name}: {manifest['num_rows']} rows -> {Path(out_dir) / name} {entries}")
        if on_error == "skip" or report:  # rows left out (bad media, NaN/Inf features): say how many and why
            print(f"[mmalign cache] {name}: " + report.summary("rows left out of the cache"))
        summary[name] = {"num_rows": manifest["num_rows"], "num_cached_rows": manifest["num_cached_rows"],
                         "skipped": manifest["skipped"], "dataset_fingerprint": manifest["dataset_fingerprint"], "entries": entries}
    return summary
