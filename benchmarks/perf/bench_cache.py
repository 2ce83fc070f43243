"""Benchmark of the feature cache (issue 3): training speed and memory, as ratios measured in one run.

The machine may be shared, so absolute figures mean little: every comparison is made inside one
invocation, the torch thread count is pinned (``--threads``, printed and recorded), and the load
average is recorded before and after each part. A figure measured at a load average above the
number of cores is marked ``"loaded": true`` and must be re-run on a quiet machine.

1. Speed (``--part speed``): the same LiT-style recipe (EfficientNet-Lite0 image tower with the real
   packaged weights + tiny XLM-R text tower, MLP projector with a 1024-d hidden layer + Linear, CLIP
   loss) trained with Lightning on the same rows, once from raw files (decode + resize + encoder forward
   every step) and once from the cache (the only change: ``--data.init_args.cache_dir``). A step's time
   is the median interval between consecutive training-batch starts within an epoch (data loading
   included; epoch boundaries and the first step excluded); the ratio cached/raw is printed.
2. Memory (``--part memory``): cached training of the same shape (two 1280-d towers, batch 256) for two
   dataset sizes. Each size is cached in one fresh process (a deterministic stand-in encoder, so 200k
   rows take seconds) and trained in another fresh process, which records its anonymous RSS (RssAnon:
   its own memory, not the page cache of the memmapped shards) before and after opening the cache and
   at every step. Growth while training should not depend on the dataset size; the ratio
   large/small is printed. Opening the cache holds the manifest rows (ids, text) in memory, which is
   O(rows) and reported separately per row.

    python benchmarks/perf/bench_cache.py                       # both parts (< 3 min on 2 idle cores)
    python benchmarks/perf/bench_cache.py --part memory --sizes 10000,100000 --steps 150
    python benchmarks/perf/bench_cache.py --part speed --threads 2 --raw_steps 8 --cached_steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPE = """
seed_everything: 0
trainer:
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
model:
  class_path: mmalign.AlignmentModule
  init_args:
    embed_dim: 256
    towers:
      image:
        class_path: mmalign.Tower
        init_args:
          field: image
          encoder: {class_path: encoders.TimmImageEncoder, init_args: {model_name: "packaged:efficientnet-lite0"}}
          projector: {class_path: projectors.MLP, init_args: {hidden_dim: 1024, num_blocks: 1, dropout: 0.0}}
      text:
        class_path: mmalign.Tower
        init_args:
          field: text
          encoder: {class_path: encoders.HFTextEncoder, init_args: {model_name_or_path: "tiny:xlmr-text"}}
          projector: {class_path: projectors.Linear}
    objectives:
      - class_path: mmalign.Objective
        init_args: {towers: [image, text], loss: {class_path: mmalign.ClipLoss}}
    optimizer:  # as in the shipped recipes
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001, weight_decay: 0.01, fused: true}
data:
  class_path: mmalign.data.AlignmentDataModule
  init_args: {batch_size: 32}
"""


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pin_threads(threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _step_timer():
    import lightning as L

    class StepTimer(L.Callback):
        """Wall time at the start of every training batch (data loading included, as users see it) and
        the peak anonymous RSS seen at batch starts and ends."""

        def __init__(self) -> None:
            self.starts: list[tuple[int, float]] = []  # (epoch, time)
            self.rss_anon_kb = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append((trainer.current_epoch, time.perf_counter()))
            self.rss_anon_kb = max(self.rss_anon_kb, _status_kb("RssAnon"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rss_anon_kb = max(self.rss_anon_kb, _status_kb("RssAnon"))

        def intervals(self) -> list[float]:
            """Seconds between consecutive batch starts of the same epoch, without the run's first step."""
            pairs = zip(self.starts[1:], self.starts[2:])
            return [t1 - t0 for (e0, t0), (e1, t1) in pairs if e0 == e1]

        def seconds_per_step(self) -> float:
            gaps = sorted(self.intervals())
            if not gaps:
                raise RuntimeError("too few steps to time: raise the step count")
            return gaps[len(gaps) // 2]

    return StepTimer()


def _cli(recipe: Path, args: list[str]):
    from mmalign.recipe import load_recipe  # the recipe as mmalign fit instantiates it

    return load_recipe(["--config", str(recipe), *args])


def speed(work: Path, raw_steps: int, cached_steps: int, num_concepts: int) -> dict:
    from mmalign.cli import main
    from mmalign.datasets.synthetic import build_synthetic_dataset

    load_before = _load()
    data = build_synthetic_dataset(work / "data", num_concepts=num_concepts)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE)
    paths = [f"--data.init_args.train={data / 'train.jsonl'}"]
    cache_cmd = ["cache", "--config", str(recipe), *paths, "--output", str(work / "cache"), "--split", "train", "--progress=false"]
    print("$ mmalign", " ".join(cache_cmd), flush=True)
    t0 = time.perf_counter()
    main(cache_cmd)
    cache_s = time.perf_counter() - t0

    per_step: dict[str, float] = {}
    timed: dict[str, int] = {}
    for name, steps, extra in (("raw", raw_steps, []), ("cached", cached_steps, [f"--data.init_args.cache_dir={work / 'cache'}"])):
        cli = _cli(recipe, [*paths, f"--trainer.max_steps={steps}", *extra])
        timer = _step_timer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
        per_step[name], timed[name] = timer.seconds_per_step(), len(timer.intervals())
        print(f"{name}: {per_step[name] * 1e3:.1f} ms/step (median of {timed[name]} steps)", flush=True)
    load_after = _load()
    return {
        "encoder": "EfficientNet-Lite0 (packaged real weights, 224x224) + tiny XLM-R text",
        "train_rows": len(cli.datamodule.datasets["train"]), "batch_size": 32, "cache_write_s": round(cache_s, 1),
        "raw_ms_per_step": round(per_step["raw"] * 1e3, 1), "cached_ms_per_step": round(per_step["cached"] * 1e3, 2),
        "timed_steps": timed, "speedup": round(per_step["raw"] / per_step["cached"], 1),
        "load_avg_before": load_before, "load_avg_after": load_after,
    }


# -- memory --------------------------------------------------------------------------------------

def _stand_in_encoder():
    import numpy as np
    import torch

    from encoders.base import Encoder, EncoderOutput, Modality

    class HashFeatures(Encoder):
        """Deterministic 1280-d vectors from a string's crc32: an EfficientNet-sized output, no compute."""

        modality, output_dim, has_tokens = Modality.TEXT, 1280, False

        def __init__(self, salt: str = "") -> None:
            super().__init__()
            self._init_args = {"salt": salt}
            self.salt = salt
            self.freeze()

        def spec(self) -> dict:
            return {**super().spec(), "salt": self.salt}

        def preprocess(self, items):
            seeds = [zlib.crc32(f"{self.salt}\0{s}".encode()) for s in items]
            return {"x": torch.from_numpy(np.stack([np.random.default_rng(s).standard_normal(1280, dtype=np.float32) for s in seeds]))}

        def encode(self, inputs):
            return EncoderOutput(pooled=inputs["x"])

    return HashFeatures


def _memory_setup(rows: int, work: Path):
    """Manifest of ``rows`` rows, the two-tower module and its DataModule (cache at ``work/cache``)."""
    import torch

    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from mmalign.data import AlignmentDataModule
    from projectors import MLP, Linear

    manifest = work / "train.jsonl"
    if not manifest.exists():
        with manifest.open("w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"t{i}", "text_en": f"e{i}"}) + "\n")
    enc = _stand_in_encoder()
    torch.manual_seed(0)
    towers = {"a": Tower(enc("a"), "text", lambda i, o: MLP(i, o, hidden_dim=1024, dropout=0.0)), "b": Tower(enc("b"), "text_en", Linear)}
    module = AlignmentModule(towers, [Objective(ClipLoss(), ["a", "b"])], embed_dim=256)
    dm = AlignmentDataModule(train=str(manifest), batch_size=256, cache_dir=str(work / "cache"))
    dm.connect(module)
    return module, dm


def memory_write(rows: int, work: Path) -> dict:
    """Child process 1: write the cache of ``rows`` rows (nothing measured but its size)."""
    from mmalign.cache import write_split

    module, dm = _memory_setup(rows, work)
    t0 = time.perf_counter()
    write_split(dm.manifest_dataset("train").rows, dict(module.towers.items()), work / "cache" / "train",
                batch_size=4096, progress=False, fingerprint="rows")
    cache_mb = sum(p.stat().st_size for p in (work / "cache").rglob("*.npy")) / 2**20
    return {"cache_mb": round(cache_mb, 1), "write_s": round(time.perf_counter() - t0, 1)}


def memory_train(rows: int, steps: int, work: Path) -> dict:
    """Child process 2: open the cache (full verification) and train ``steps`` steps; RSS at each stage."""
    import lightning as L

    module, dm = _memory_setup(rows, work)
    anon_start = _status_kb("RssAnon")
    dm.setup("fit")  # reads the manifest rows, opens and verifies the cache (fingerprint + NaN/Inf scan)
    anon_open = _status_kb("RssAnon")
    timer = _step_timer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, dm)
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {
        "rows": rows, "steps": steps, "rows_read": steps * 256,
        "rss_anon_start_mb": mb(anon_start), "rss_anon_after_open_mb": mb(anon_open),
        "peak_rss_anon_mb": mb(timer.rss_anon_kb), "peak_rss_total_mb": mb(_status_kb("VmHWM")),
        "open_growth_mb": mb(anon_open - anon_start), "train_growth_mb": mb(timer.rss_anon_kb - anon_open),
        "ms_per_step": round(timer.seconds_per_step() * 1e3, 2) if timer.intervals() else None,
    }


def _child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--threads", str(threads), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(sizes: list[int], steps: int, threads: int) -> dict:
    load_before = _load()
    out = []
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            written = _child(["--part", "memory-write", "--rows", str(rows), "--work", tmp], threads)
            trained = _child(["--part", "memory-train", "--rows", str(rows), "--steps", str(steps), "--work", tmp], threads)
            out.append({**trained, **written})
            print(out[-1], flush=True)
    small, large = out[0], out[-1]
    d_rows = large["rows"] - small["rows"]
    result = {
        "sizes": out, "load_avg_before": load_before, "load_avg_after": _load(),
        # Training growth (batches, optimizer state, autograd) should be the same at both sizes.
        "train_growth_large_over_small": round(large["train_growth_mb"] / max(small["train_growth_mb"], 0.1), 2),
        "peak_anon_large_over_small": round(large["peak_rss_anon_mb"] / small["peak_rss_anon_mb"], 2),
        # Opening the cache keeps the manifest rows (ids, text, meta) in memory: O(rows), not features.
        "open_bytes_per_extra_row": round((large["open_growth_mb"] - small["open_growth_mb"]) * 2**20 / d_rows) if d_rows else None,
        "feature_bytes_per_row_on_disk": round(large["cache_mb"] * 2**20 / large["rows"]),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "speed", "memory", "memory-write", "memory-train"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every part and child process")
    p.add_argument("--raw_steps", type=int, default=8)
    p.add_argument("--cached_steps", type=int, default=200)
    p.add_argument("--num_concepts", type=int, default=100, help="synthetic concepts; train rows = 1.5x this")
    p.add_argument("--sizes", default="10000,100000", help="dataset sizes (rows) of the memory part")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--steps", type=int, default=150, help="training steps (batch 256) per size in the memory part")
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache.json"))
    a = p.parse_args()
    threads = _pin_threads(a.threads)
    if a.part == "memory-write":
        print(json.dumps(memory_write(a.rows, Path(a.work))))
        return
    if a.part == "memory-train":
        print(json.dumps(memory_train(a.rows, a.steps, Path(a.work))))
        return
    cores = os.cpu_count() or 1
    print(f"torch threads: {threads} (pinned); {cores} CPU cores; load average {_load()}", flush=True)
    part_args = {  # the effective values, so that the recorded command is exact
        "speed": f"--part speed --threads {threads} --raw_steps {a.raw_steps} --cached_steps {a.cached_steps} --num_concepts {a.num_concepts}",
        "memory": f"--part memory --threads {threads} --sizes {a.sizes} --steps {a.steps}",
    }
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() and a.part != "all" else {}  # keep the other part's figures
    results["machine"] = f"{cores} CPU cores"
    for key in ("command", "torch_threads", "wall_s"):  # older layouts kept these at the top
        results.pop(key, None)
    if a.part in ("all", "speed"):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            s = speed(Path(tmp), a.raw_steps, a.cached_steps, a.num_concepts)
        s["loaded"] = max(s["load_avg_before"][0], s["load_avg_after"][0]) >= cores
        results["speed"] = {"command": "python benchmarks/perf/bench_cache.py " + part_args["speed"], "torch_threads": threads, **s, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"cached / raw training speed: {s['speedup']}x ({s['raw_ms_per_step']} vs {s['cached_ms_per_step']} ms/step)"
              + ("  [machine loaded: re-run]" if s["loaded"] else ""), flush=True)
    if a.part in ("all", "memory"):
        t0 = time.perf_counter()
        m = memory([int(s) for s in a.sizes.split(",")], a.steps, threads)
        results["memory"] = {"command": "python benchmarks/perf/bench_cache.py " + part_args["memory"], "torch_threads": threads, **m, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"anonymous RSS growth while training, largest/smallest dataset: {m['train_growth_large_over_small']}x; "
              f"peak anonymous RSS ratio {m['peak_anon_large_over_small']}x; opening costs "
              f"{m['open_bytes_per_extra_row']} B/row of manifest metadata", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
