"""Device-resident vs memory-mapped cached features (issue 21.2): batches/s and steps/s in one run.

Same recipe, cache and projector step as ``bench_loop.py`` (the offline uCLIP pivot by default). A side
reads the training split with ``data.init_args.resident: false`` (memory-mapped shards through the
``StatefulDataLoader``), B side with ``resident: auto`` (features loaded once, index batches). Two
figures per round, alternating A/B: loader-only batches/s (what the data path costs) and plain-loop
training steps/s (``bench_loop.plain_loop``: forward, losses, backward, AdamW). CPU seconds of the
process are the figure that counts on a loaded machine.

    python benchmarks/perf/bench_resident.py
    python benchmarks/perf/bench_resident.py --device cuda --batch_size 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.perf.bench_loop import _clocks, _cycle, _rates, _sync, plain_loop  # noqa: E402


def loader_rate(data, batches: int, device: torch.device) -> tuple[float, float]:
    it = _cycle(data.train_dataloader())
    for _ in range(5):
        next(it)
    start = _clocks()
    for _ in range(batches):
        b = next(it)
        for f in b["features"].values():
            for v in f.values():
                v.to(device, non_blocking=True)
    _sync(device)
    return _rates(batches, start, _clocks())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="offline/uclip_pivot")
    p.add_argument("--data", default=str(ROOT / "data" / "emoji"), help="emoji dataset (mmalign data emoji --root data/emoji builds it)")
    p.add_argument("--cache", default=str(Path(os.environ.get("MMALIGN_CACHE_DIR", Path.home() / ".cache" / "mmalign")) / "bench_loop"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "resident.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    from cached_recipe import cached_recipe_config  # beside this script (run as python benchmarks/perf/X.py)
    from mmalign.recipe import build

    config = cached_recipe_config(a.recipe, a.data, a.cache, a.batch_size, progress=False)
    d = config["data"]["init_args"]
    base, _ = build(config)

    def data(resident):
        cfg = copy.deepcopy(config)
        cfg["data"]["init_args"]["resident"] = resident
        _, dmod = build(cfg)
        dmod.connect(base)
        dmod.setup("fit")
        return dmod

    rounds = []
    for r in range(a.rounds):
        row = {}
        for name, resident in (("memmap", False), ("resident", "auto")):
            dmod = data(resident)
            row[f"{name}_batches_per_cpu_s"] = round(loader_rate(dmod, a.batches, device)[1], 1)
            row[f"{name}_steps_per_cpu_s"] = round(plain_loop(copy.deepcopy(base), dmod, a.steps, 10, device)[1], 1)
        row["loader_ratio"] = round(row["resident_batches_per_cpu_s"] / row["memmap_batches_per_cpu_s"], 2)
        row["step_ratio"] = round(row["resident_steps_per_cpu_s"] / row["memmap_steps_per_cpu_s"], 3)
        rounds.append(row)
        print(f"round {r}: {row}", flush=True)
    result = {
        "command": f"python benchmarks/perf/bench_resident.py --recipe {a.recipe} --rounds {a.rounds} --threads {a.threads} --device {a.device}",
        "batch_size": d["batch_size"], "load_average": os.getloadavg(), "rounds": rounds,
        "median_loader_ratio": statistics.median(x["loader_ratio"] for x in rounds),
        "median_step_ratio": statistics.median(x["step_ratio"] for x in rounds),
    }
    print(f"resident / memmap per CPU second: loader {result['median_loader_ratio']:.2f}x, "
          f"training steps {result['median_step_ratio']:.3f}x (batch {d['batch_size']})")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
