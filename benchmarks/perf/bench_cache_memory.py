"""Peak memory of ``mmalign cache`` vs dataset size (issue 21.6): 1k vs 100k items, same peak.

Each size runs in a fresh subprocess (peak RSS only grows): ``write_split`` of ``--items`` distinct
texts with a text encoder (default the tiny random ``tiny:xlmr-text``: no download; the encoder's
size does not change what is measured, the growth with the item count) at the automatic forward
batch, ``shard_size`` 4096, pooled and token features. Printed: peak RSS of each run and their ratio.

    python benchmarks/perf/bench_cache_memory.py                    # 1000 vs 100000 items
    python benchmarks/perf/bench_cache_memory.py --sizes 1000 20000
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


def child(items: int, out: str, encoder: str, tokens: bool) -> dict:
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
    tower = Tower(encoders.HFTextEncoder(encoder), "text", proj)
    tower.build(16)  # the projector decides whether tokens are cached
    rows = [{"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"item number {i} of the benchmark"} for i in range(items)]
    batch = encode_batch_size(tower.encoder, torch.device("cpu"))
    t = time.perf_counter()
    write_split(rows, {"text": tower}, Path(out) / "train", split="train", batch_size=batch, shard_size=4096, progress=False)
    return {"items": items, "batch": batch, "seconds": time.perf_counter() - t,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 100000])
    p.add_argument("--encoder", default="tiny:xlmr-text")
    p.add_argument("--pooled_only", action="store_true")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cache_memory.json"))
    a = p.parse_args()
    runs = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.perf.bench_cache_memory import child; "
                    f"print(json.dumps(child({n}, {tmp!r}, {a.encoder!r}, {not a.pooled_only})))")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(f"{r['items']} items (forward batch {r['batch']}): peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s", flush=True)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    print(f"peak RSS {runs[-1]['items']} / {runs[0]['items']} items: {ratio:.2f} (goal: ~1, bounded)")
    result = {"command": f"python benchmarks/perf/bench_cache_memory.py --sizes {' '.join(map(str, a.sizes))} --encoder {a.encoder}",
              "load_average": os.getloadavg(), "runs": runs, "ratio": ratio}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
