"""Shared set-up of the cached-training benchmarks: a recipe on the emoji data with its feature cache filled."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cached_recipe_config(recipe: str, data: str | Path, cache_root: str | Path, batch_size: int | None = None,
                         progress: bool = True, accelerator: str | None = None) -> dict[str, Any]:
    """Recipe ``recipe`` with its splits under ``data``, its feature cache filled (``mmalign cache``, finished
    shards kept) under ``<cache_root>/<recipe>``; returns the config reading that cache (``data.init_args.cache_dir``)."""
    from mmalign.cache.command import cache
    from mmalign.recipe import build, load_config

    config = load_config(recipe)
    d = config["data"]["init_args"]
    for split in ("train", "val", "test"):
        d[split] = str(Path(data).resolve() / f"{split}.jsonl")
    if batch_size:
        d["batch_size"] = batch_size
    if accelerator:
        config["trainer"]["accelerator"] = accelerator
    model, dm = build(config)
    cache_dir = Path(cache_root) / recipe.replace("/", "-")
    cache(model, dm, output=str(cache_dir), shard_size=256, progress=progress)
    d["cache_dir"] = str(cache_dir)
    return config
