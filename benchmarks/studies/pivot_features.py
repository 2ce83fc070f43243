"""Frozen features of the corpus-scale pivot study, encoded once in resumable, prefix-usable chunks.

The product's feature cache (``mmalign cache``) writes a split only when all of it is encoded; on a shared
2-core machine the 110k-text corpus takes hours of USE-m time, so this study encodes with the recipe's own
tower encoders (the same ``preprocess``/``forward`` that ``mmalign cache`` calls, hence the same features)
into fp16 chunk files of ``CHUNK`` texts, written atomically: an interrupted run resumes, and the first
``k`` chunks of ``data/corpus/train.txt`` (hash-ordered, so any prefix is a uniform sample) are usable while
later ones are still encoding. Folders are keyed by the encoder's ``cache_key``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

CHUNK = 1024


def _key(texts: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(texts).encode("utf-8"), digest_size=8).hexdigest()


def encode_chunked(encoder: Any, texts: Sequence[str], folder: Path, limit: int | None = None, log: str = "") -> np.ndarray:
    """``[min(limit, N), D]`` float32 features of ``texts`` (chunks already on disk are read, not re-encoded).

    Each chunk file is named by its index and the hash of its texts, so a changed text list never reuses a
    stale chunk.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = len(texts) if limit is None else min(limit, len(texts))
    parts = []
    for c, start in enumerate(range(0, n, CHUNK)):
        chunk = list(texts[start:min(start + CHUNK, len(texts))])
        path = folder / f"{c:05d}-{_key(chunk)}.npy"
        if not path.is_file():
            t0 = time.time()
            out = _encode(encoder, chunk)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, out)
            os.replace(tmp, path)
            print(f"{log} chunk {c} ({start + len(chunk)}/{len(texts)}) {time.time() - t0:.0f}s", flush=True)
        parts.append(np.load(path).astype(np.float32))
    return np.concatenate(parts)[:n] if parts else np.zeros((0, encoder.output_dim), np.float32)


def _encode(encoder: Any, texts: list[str], batch: int = 64) -> np.ndarray:
    """Features of ``texts`` in length-sorted batches of ``batch`` (little padding: what ``mmalign cache``'s
    small CPU text batches do too); rows come back in the input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), encoder.output_dim), np.float16)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            out[idx] = encoder(encoder.preprocess([texts[i] for i in idx])).pooled.float().numpy()
    return out


def available(texts: Sequence[str], folder: Path) -> int:
    """How many leading texts have finished chunks in ``folder``."""
    n = 0
    for c, start in enumerate(range(0, len(texts), CHUNK)):
        chunk = list(texts[start:start + CHUNK])
        if not (folder / f"{c:05d}-{_key(chunk)}.npy").is_file():
            break
        n = start + len(chunk)
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
