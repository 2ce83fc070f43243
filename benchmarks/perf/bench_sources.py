"""Open time, memory and row throughput of a synthetic table source vs the JSONL manifest reader.

    python -m benchmarks.perf.bench_sources --rows 1000000 10000000 --out /tmp/bench_sources

For each size: a Parquet table (id, concept, lang, text, image) is written in 1M-row row groups; then, in a fresh
process each, it is opened with :func:`mmalign.data.sources.open_source` twice (cold: the one-time Parquet ->
Arrow conversion; warm: the memory-mapped Arrow copy), and we record open seconds, extra RSS (MB), random row
access (us/row) and rows/s of a pass over the rows as the feature-cache writer plans them
(:func:`mmalign.cache.format.unique_items` over ``text``). ``--cache_only`` then measures rows/s through the
feature-cache writer of ``mmalign cache`` (``write_split``) with a near-free text encoder (a byte histogram) on
the first ``--cache_rows`` rows of each table. The manifest reader is measured on a JSONL of
``--manifest_rows`` rows in the same run (us and KB of RSS per row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LANGS = ["en", "de", "fr", "es", "ja", "zh", "ar", "ru"]


def rss_mb(kind: str = "VmRSS") -> float:
    """Resident MB: ``VmRSS`` (all), ``RssAnon`` (process memory) or ``RssFile`` (mapped file pages, shared)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_table(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = np.arange(start, start + n)
        ids = pa.array(np.char.add("row", idx.astype(str)))
        table = pa.table({
            "id": ids, "concept": pa.array(np.char.add("c", (idx // 4).astype(str))),
            "lang": pa.array(np.array(LANGS)[idx % len(LANGS)]),
            "text": pa.array(np.char.add("a synthetic caption number ", idx.astype(str))),
            "image": pa.array(np.char.add(np.char.add("images/", (idx // 4).astype(str)), ".jpg")),
        })
        writer = writer or pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def measure(path: str, check_rows: int) -> dict:
    import random

    from mmalign.cache.format import unique_items
    from mmalign.data.sources import open_source

    out = {}
    import resource

    for phase in ("cold", "warm", "fields"):
        # fields: as the DataModule opens it for a recipe reading text + image (blank/missing checks too)
        base, base_anon = rss_mb(), rss_mb("RssAnon")
        t, c = time.perf_counter(), time.process_time()
        src = open_source(path, required_fields=["text", "image"] if phase == "fields" else ())
        out[f"open_{phase}_s"] = round(time.perf_counter() - t, 2)
        out[f"open_{phase}_cpu_s"] = round(time.process_time() - c, 2)
        out[f"rss_{phase}_mb"] = round(rss_mb() - base, 1)
        out[f"rss_anon_{phase}_mb"] = round(rss_mb("RssAnon") - base_anon, 1)
        if phase != "fields":
            del src
    out["peak_rss_added_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 1)
    n = len(src)
    picks = [random.randrange(n) for _ in range(20000)]
    t = time.perf_counter()
    for i in picks:
        src[i]
    out["random_row_us"] = round((time.perf_counter() - t) / len(picks) * 1e6, 1)
    t = time.perf_counter()
    sub = src.rows[:check_rows]  # rows built as the cache writer reads them, then its pass over `text`
    unique_items(sub, "text")
    out["plan_rows_per_s"] = int(len(sub) / (time.perf_counter() - t))
    out["rss_after_pass_mb"] = round(rss_mb() - base, 1)
    out["rss_anon_after_pass_mb"] = round(rss_mb("RssAnon") - base_anon, 1)
    out["rows"] = n
    return out


def cheap_text_encoder():
    """A text encoder costing almost nothing (a 64-bin byte histogram): the benchmark measures the data path."""
    import torch

    from encoders.base import Encoder, Modality

    class ByteHistogram(Encoder):
        modality = Modality.TEXT
        output_dim = 64
        has_tokens = False

        def __init__(self) -> None:
            super().__init__()
            self.freeze()

        def preprocess(self, items):
            out = torch.zeros(len(items), 64)
            for i, t in enumerate(items):
                b = torch.frombuffer(bytearray(t.encode()), dtype=torch.uint8).long() % 64
                out[i].index_add_(0, b, torch.ones(len(b)))
            return {"x": out}

        def encode(self, inputs):
            from encoders.base import EncoderOutput

            return EncoderOutput(pooled=inputs["x"])

    return ByteHistogram()


def measure_cache(path: str, rows: int, out_dir: str) -> dict:
    """Rows/s of the feature-cache writer (mmalign cache's ``write_split``) over the first ``rows`` rows of a table."""
    import shutil

    from mmalign.cache.writer import write_split
    from mmalign.data.sources import open_source
    from mmalign.training.towers import Tower

    src = open_source(path)
    sub = src.rows[:rows]
    shutil.rmtree(out_dir, ignore_errors=True)
    base = rss_mb()
    t = time.perf_counter()
    write_split(sub, {"text": Tower(cheap_text_encoder(), "text")}, out_dir, split="train", batch_size=1024,
                fingerprint="rows", progress=False, shard_size=65536)
    dt = time.perf_counter() - t
    return {"rows": len(sub), "cache_s": round(dt, 1), "cache_rows_per_s": int(len(sub) / dt), "rss_mb": round(rss_mb() - base, 1)}


def measure_manifest(path: str) -> dict:
    from mmalign.data.manifest import ManifestDataset

    base = rss_mb()
    t = time.perf_counter()
    ds = ManifestDataset(path, check_files=False)
    dt = time.perf_counter() - t
    return {"rows": len(ds), "open_s": round(dt, 2), "us_per_row": round(dt / len(ds) * 1e6, 1),
            "kb_per_row": round((rss_mb() - base) * 1024 / len(ds), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--manifest_rows", type=int, default=200_000)
    p.add_argument("--check_rows", type=int, default=200_000, help="rows of the cache-planning pass")
    p.add_argument("--cache_rows", type=int, default=200_000, help="rows written by the cache-writer measurement")
    p.add_argument("--cache_only", action="store_true", help="only the cache-writer rows/s on the existing tables")
    p.add_argument("--out", default="/tmp/bench_sources")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        kind, path = args.measure
        if kind == "cache":
            print(json.dumps(measure_cache(path, args.cache_rows, str(Path(args.out) / "cache"))))
        else:
            print(json.dumps(measure(path, args.check_rows) if kind == "table" else measure_manifest(path)))
        return
    if args.cache_only:
        for n in args.rows:
            path = Path(args.out) / f"table-{n}.parquet"
            res = subprocess.run([sys.executable, "-m", "benchmarks.perf.bench_sources", "--cache_rows", str(args.cache_rows),
                                  "--out", args.out, "--measure", "cache", str(path)],
                                 env={**os.environ, "MMALIGN_ARROW_CACHE": str(Path(args.out) / "arrow-cache")},
                                 capture_output=True, text=True, check=True)
            print(path.name, "cache", res.stdout.strip().splitlines()[-1], flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MMALIGN_ARROW_CACHE": str(out / "arrow-cache")}
    results = {}
    man = out / f"manifest-{args.manifest_rows}.jsonl"
    with open(man, "w") as f:
        for i in range(args.manifest_rows):
            f.write(json.dumps({"id": f"row{i}", "concept": f"c{i // 4}", "lang": LANGS[i % 8],
                                "text": f"a synthetic caption number {i}", "image": f"images/{i // 4}.jpg"}) + "\n")
    for kind, path in [("manifest", man)] + [("table", out / f"table-{n}.parquet") for n in args.rows]:
        if kind == "table" and not path.exists():
            make_table(path, int(path.stem.split("-")[1]))
        res = subprocess.run([sys.executable, "-m", "benchmarks.perf.bench_sources", "--check_rows", str(args.check_rows),
                              "--measure", kind, str(path)], env=env, capture_output=True, text=True, check=True)
        results[path.name] = json.loads(res.stdout.strip().splitlines()[-1])
        print(path.name, results[path.name], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
