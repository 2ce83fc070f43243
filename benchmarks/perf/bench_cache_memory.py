"""Peak memory of ``mmalign cache`` vs dataset size (issue 21.6): 1k vs 100k items, same peak.

Each size runs in a fresh subprocess (peak RSS only grows): ``write_split`` of ``--items`` distinct
texts with a text encoder (default the tiny random ``tiny:xlmr-text``: no download; the encoder's
size does not change what is measured, the growth with the item count) at the automatic forward
batch, ``shard_size`` 4096, pooled and token features. Printed: peak RSS of each run and their ratio.

    python benchmarks/perf/bench_cache_memory.py                    # 1000 vs 100000 items
    python benchmarks/perf/bench_cache_memory.py --sizes 1000 20000
    python benchmarks/perf/bench_cache_memory.py --encoder bytes --sizes 1000 100000 1000000   # near-free encoder

Also printed: the sizes of ``manifest.json`` and of the row-id files (cache format 2), and the time, CPU time and RSS
of opening the written cache with :class:`~mmalign.cache.reader.CachedSplit` (``verify=False`` and ``verify=True``).

Rows come from a Parquet table opened with ``open_source`` (``--source list``: a list of row dicts the
benchmark itself holds, ~0.85 KB a row, as before).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(items: int, out: str, encoder: str, tokens: bool, source: str = "table") -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    import encoders
    import projectors
    from mmalign import Tower
    from mmalign.cache.command import encode_batch_size
    from mmalign.cache.writer import write_split

    proj = (lambda i, o: projectors.AttentionPool(i, o, num_heads=2)) if tokens else (lambda i, o: projectors.Linear(i, o))
    if encoder == "bytes":  # near-free: what is measured is the cache's own memory
        from benchmarks.perf.bench_sources import cheap_text_encoder

        enc, proj = cheap_text_encoder(), (lambda i, o: projectors.Linear(i, o))
    else:
        enc = encoders.HFTextEncoder(encoder)
    tower = Tower(enc, "text", proj)
    tower.build(16)  # the projector decides whether tokens are cached
    if source == "table":  # a Parquet table (written by the parent) opened as a source: never held as rows
        from mmalign.data.sources import open_source

        os.environ["MMALIGN_ARROW_CACHE"] = str(Path(out) / "arrow")
        rows = open_source(str(Path(out) / "rows.parquet"), required_fields=["text"]).rows
    else:
        rows = [{"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"item number {i} of the benchmark"} for i in range(items)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batch = encode_batch_size(tower.encoder, torch.device("cpu"))
    t = time.perf_counter()
    write_split(rows, {"text": tower}, Path(out) / "train", split="train", batch_size=batch, shard_size=4096, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - t
    split = Path(out) / "train"
    sizes = {name: (split / name).stat().st_size for name in ("manifest.json", "row_ids.offsets.npy", "row_ids.utf8.npy")}
    from mmalign.cache.reader import cached_row_ids

    sizes["format1_row_ids_json"] = len(json.dumps({"row_ids": cached_row_ids(split)}, indent=1))  # what format 1 added
    # Opening the cache as training does (row ids compared with the dataset's, shard headers checked), twice:
    # verify=False (the ids and headers only) and verify=True (item digests recomputed too)
    from mmalign.cache.reader import CachedSplit

    opens = {}
    for verify in (False, True):
        rss0 = _rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        ds = CachedSplit(split, rows, {"text": tower}, verify=verify)
        opens[f"open_verify_{verify}".lower()] = {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                                  "rss_added_mb": _rss_mb() - rss0}
        assert len(ds) == items
        del ds
    return {"items": items, "batch": batch, "seconds": seconds, "source": source,
            "peak_rss_mb": peak, "rss_before_write_mb": base, "files_bytes": sizes, "cache_open": opens}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def write_table(path: Path, items: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = np.arange(items)
    pq.write_table(pa.table({"id": np.char.add("r", idx.astype(str)), "concept": np.char.add("c", idx.astype(str)),
                             "lang": np.full(items, "en"), "text": np.char.add("item number ", idx.astype(str))}), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 100000])
    p.add_argument("--encoder", default="tiny:xlmr-text")
    p.add_argument("--pooled_only", action="store_true")
    p.add_argument("--source", choices=["table", "list"], default="table",
                   help="rows from a Parquet source (default) or a Python list of row dicts held by the benchmark")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cache_memory.json"))
    a = p.parse_args()
    runs = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            if a.source == "table":
                write_table(Path(tmp) / "rows.parquet", n)
            code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.perf.bench_cache_memory import child; "
                    f"print(json.dumps(child({n}, {tmp!r}, {a.encoder!r}, {not a.pooled_only}, {a.source!r})))")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r)
        o = r["cache_open"]
        print(f"{r['items']} items ({r['source']}, forward batch {r['batch']}): peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(before writing {r['rss_before_write_mb']:.0f} MB), {r['seconds']:.1f} s; manifest.json "
              f"{r['files_bytes']['manifest.json']} B (format 1 listed the ids in it: +{r['files_bytes']['format1_row_ids_json']} B), "
              f"row-id files {r['files_bytes']['row_ids.offsets.npy'] + r['files_bytes']['row_ids.utf8.npy']} B; "
              f"CachedSplit open {o['open_verify_false']['s']:.2f} s ({o['open_verify_false']['cpu_s']:.2f} CPU s, "
              f"{o['open_verify_false']['rss_added_mb']:+.0f} MB), with verify {o['open_verify_true']['s']:.2f} s "
              f"({o['open_verify_true']['cpu_s']:.2f} CPU s)", flush=True)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    print(f"peak RSS {runs[-1]['items']} / {runs[0]['items']} items: {ratio:.2f} (goal: ~1, bounded)")
    result = {"command": f"python benchmarks/perf/bench_cache_memory.py --sizes {' '.join(map(str, a.sizes))} --encoder {a.encoder}"
                         f" --source {a.source}" + (" --pooled_only" if a.pooled_only else ""),
              "load_average": os.getloadavg(), "runs": runs, "ratio": ratio}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
