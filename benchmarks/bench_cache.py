"""Benchmark of the feature cache (issue 3): training speed and peak memory.

1. Speed: the same LiT-style recipe (EfficientNet-Lite0 image tower with real packaged weights + tiny
   text tower, MLP/Linear projectors, CLIP loss) trained with Lightning on the same data, once with raw
   batches (decode + resize + encoder forward every step; MLP projector with a 1024-d hidden layer) and once from the cache (the only change:
   ``--data.init_args.cache_dir``). Both are measured in this one run; steps/s and the ratio are printed.
2. Memory: cached training of the same recipe shape (1280-d features, a deterministic stand-in encoder
   so that 20k and 200k rows can be cached in seconds) in a fresh process per dataset size; prints peak
   total RSS (VmHWM, includes page-cache pages of the memmapped shards the process touched) and peak
   anonymous RSS (RssAnon: the process's own memory).

    python benchmarks/bench_cache.py                      # both parts, writes benchmarks/results/cache.json
    python benchmarks/bench_cache.py --part speed --raw_steps 6 --cached_steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
data:
  class_path: mmalign.data.AlignmentDataModule
  init_args: {batch_size: 32}
"""


def _step_timer():
    import lightning as L

    class StepTimer(L.Callback):
        """Wall time at the start of every training batch (data loading included, as users see it)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.rss_anon_kb = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.times.append(time.perf_counter())
            self.rss_anon_kb = max(self.rss_anon_kb, _status_kb("RssAnon"))

        def steps_per_s(self, warmup: int) -> float:
            t = self.times[warmup:]
            return (len(t) - 1) / (t[-1] - t[0])

    return StepTimer()


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cli(recipe: Path, args: list[str]):
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, auto_configure_optimizers=False, save_config_callback=None,
                        args=["--config", str(recipe), *args])


def speed(work: Path, raw_steps: int, cached_steps: int, num_concepts: int) -> dict:
    from mmalign.cli import main
    from mmalign.data.synthetic import build_synthetic_dataset

    data = build_synthetic_dataset(work / "data", num_concepts=num_concepts)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE)
    paths = [f"--data.init_args.train={data / 'train.jsonl'}"]
    cache_cmd = ["cache", "--config", str(recipe), *paths, "--output", str(work / "cache"), "--split", "train"]
    print("$ mmalign", " ".join(cache_cmd))
    t0 = time.perf_counter()
    main(cache_cmd)
    cache_s = time.perf_counter() - t0

    results = {}
    for name, steps, extra in (("raw", raw_steps, []), ("cached", cached_steps, [f"--data.init_args.cache_dir={work / 'cache'}"])):
        cli = _cli(recipe, [*paths, f"--trainer.max_steps={steps}", *extra])
        timer = _step_timer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
        results[name] = timer.steps_per_s(warmup=1)
        print(f"{name}: {results[name]:.3f} steps/s over {len(timer.times) - 2} timed steps")
    n_train = len(cli.datamodule.datasets["train"])
    return {
        "encoder": "EfficientNet-Lite0 (packaged real weights, 224x224) + tiny XLM-R text",
        "train_rows": n_train, "batch_size": 32, "cache_write_s": round(cache_s, 1),
        "raw_steps_per_s": round(results["raw"], 3), "cached_steps_per_s": round(results["cached"], 1),
        "speedup": round(results["cached"] / results["raw"], 1),
    }


# -- memory --------------------------------------------------------------------------------------

def _stand_in_encoder():
    import numpy as np
    import torch

    from encoders.base import Encoder, EncoderOutput, Modality

    class HashFeatures(Encoder):
        """Deterministic 1280-d vectors from a string's hash: an EfficientNet-sized output, no compute."""

        modality, output_dim, has_tokens = Modality.TEXT, 1280, False

        def __init__(self, salt: str = "") -> None:
            super().__init__()
            self._init_args = {"salt": salt}
            self.salt = salt
            self.freeze()

        def spec(self) -> dict:
            return {**super().spec(), "salt": self.salt}

        def preprocess(self, items):
            seeds = [abs(hash((self.salt, s))) % 2**32 for s in items]
            return {"x": torch.from_numpy(np.stack([np.random.default_rng(s).standard_normal(1280, dtype=np.float32) for s in seeds]))}

        def encode(self, inputs):
            return EncoderOutput(pooled=inputs["x"])

    return HashFeatures


def memory_child(rows: int, steps: int, work: Path) -> dict:
    """Cache ``rows`` rows (two 1280-d towers), then train ``steps`` steps from the cache in this process."""
    os.environ["PYTHONHASHSEED"] = "0"
    import lightning as L
    import torch

    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from mmalign.cache import write_split
    from mmalign.data import AlignmentDataModule
    from projectors import MLP, Linear

    manifest = work / "train.jsonl"
    with manifest.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"t{i}", "text_en": f"e{i}"}) + "\n")
    enc = _stand_in_encoder()
    torch.manual_seed(0)
    towers = {"a": Tower(enc("a"), "text", lambda i, o: MLP(i, o, hidden_dim=1024, dropout=0.0)), "b": Tower(enc("b"), "text_en", Linear)}
    module = AlignmentModule(towers, [Objective(ClipLoss(), ["a", "b"])], embed_dim=256)
    dm = AlignmentDataModule(train=str(manifest), batch_size=256, cache_dir=str(work / "cache"))
    dm.connect(module)
    write_split(dm.manifest_dataset("train").rows, dict(module.towers.items()), work / "cache" / "train",
                batch_size=4096, progress=False, fingerprint="rows")
    timer = _step_timer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    base_anon = _status_kb("RssAnon")
    trainer.fit(module, dm)
    shard_mb = sum(p.stat().st_size for p in (work / "cache").rglob("*.npy")) / 2**20
    return {"rows": rows, "cache_mb": round(shard_mb, 1), "steps": steps, "rows_read": steps * 256,
            "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1), "peak_rss_anon_mb": round(timer.rss_anon_kb / 1024, 1),
            "rss_anon_before_fit_mb": round(base_anon / 1024, 1), "steps_per_s": round(timer.steps_per_s(warmup=1), 1)}


def memory(sizes: list[int], steps: int) -> list[dict]:
    out = []
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--part", "memory-child", "--rows", str(rows), "--steps", str(steps), "--work", tmp]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            out.append(json.loads(line))
            print(out[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "speed", "memory", "memory-child"])
    p.add_argument("--raw_steps", type=int, default=6)
    p.add_argument("--cached_steps", type=int, default=300)
    p.add_argument("--num_concepts", type=int, default=200)
    p.add_argument("--sizes", default="20000,200000")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache.json"))
    a = p.parse_args()
    if a.part == "memory-child":
        print(json.dumps(memory_child(a.rows, a.steps, Path(a.work))))
        return
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "torch_threads": __import__("torch").get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if a.part in ("all", "speed"):
            results["speed"] = speed(Path(tmp), a.raw_steps, a.cached_steps, a.num_concepts)
            print(f"cached / raw training speed: {results['speed']['speedup']}x")
    if a.part in ("all", "memory"):
        results["memory"] = memory([int(s) for s in a.sizes.split(",")], a.steps)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
