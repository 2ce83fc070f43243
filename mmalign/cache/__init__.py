"""Feature cache: frozen encoders run once; projectors train from memory-mapped fp16 features.

``mmalign cache --config recipe.yaml --output DIR`` writes it (:mod:`mmalign.cache.command`); setting
``data.init_args.cache_dir: DIR`` in the same recipe trains from it (:class:`CachedSplit`). See docs/cache.md.
"""

from mmalign.cache.format import CacheError, DiskFullError, item_digests, unique_items
from mmalign.cache.reader import CachedSplit, load_manifest, passthrough
from mmalign.cache.writer import merge_split, plan_entries, resolve_rank, write_split

__all__ = [
    "CacheError", "CachedSplit", "DiskFullError", "item_digests", "load_manifest", "merge_split", "passthrough", "plan_entries",
    "resolve_rank", "unique_items", "write_split",
]
