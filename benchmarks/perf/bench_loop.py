"""Training from the feature cache vs a plain PyTorch loop (issue 21): steps/s ratio measured in one run.

Both sides train the same module (a deep copy of one freshly built recipe: same projector initialisation,
same losses, same fused AdamW) on the same cached features through the same DataLoader. The plain side is
the loop a researcher would write by hand::

    for batch in loader:
        loss = sum(module.compute_losses(module(batch)).values())
        opt.zero_grad(); loss.backward(); opt.step()

The Lightning side is ``Trainer.fit`` as ``mmalign fit`` runs it on the recipe, with the recipe's logging
(``log_every_n_steps``, a CSV logger); validation and checkpoint saves are off, since the plain loop does
neither (a save of the offline pivot's checkpoint, ~11 MB with the AdamW state, costs ~80 ms: with 7 batches per
epoch, saving every epoch would add ~11 ms a step to either loop).
Steps/s is counted after ``--warmup`` steps. The sides alternate ``--rounds`` times; the ratio of each round
and their median are printed (short interleaved rounds: a burst of load on a shared machine hits one
round, not one side). The thread count is pinned (``--threads``, default 1) so CPU figures compare. Steps per CPU second of
the process (``time.process_time``) are printed beside wall-clock steps/s: on a shared machine they measure
the work a step costs, not the other jobs (data loading runs in-process, ``num_workers: 0``).

    python benchmarks/perf/bench_loop.py                              # offline uCLIP pivot, data/emoji
    python benchmarks/perf/bench_loop.py --steps 600 --rounds 5 --batch_size 128
    python benchmarks/perf/bench_loop.py --device cuda                # on a GPU (records the GPU name)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")

ROOT = Path(__file__).resolve().parents[2]


def _cycle(loader: Any):
    while True:
        yield from loader


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rates(steps: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """Steps per wall second and per CPU second of this process."""
    return steps / (end[0] - start[0]), steps / (end[1] - start[1])


def plain_loop(module: Any, data: Any, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Steps/s (wall, CPU) of the hand-written loop over the datamodule's train loader."""
    module = module.to(device).train()
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    batches = _cycle(data.train_dataloader())
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = _clocks()
        batch = _to(next(batches), device)
        losses = module.compute_losses(module(batch), module.batch_groups(batch))
        loss = torch.stack(list(losses.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return _rates(steps, start, _clocks())


def lightning_fit(module: Any, data: Any, steps: int, warmup: int, device: torch.device, trainer_cfg: dict, work: Path) -> tuple[float, float]:
    """Steps/s (wall, CPU) of ``Trainer.fit`` (the recipe's logging and checkpointing, validation off)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    class Clock(L.Callback):
        start = end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == warmup and self.start is None:
                _sync(device)
                self.start = _clocks()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == warmup + steps:
                _sync(device)
                self.end = _clocks()

    clock = Clock()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=warmup + steps, max_epochs=-1,
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 50), logger=CSVLogger(work, name="bench"),
        callbacks=[clock], limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=work, precision=trainer_cfg.get("precision", "32-true"),
    )
    trainer.fit(module, datamodule=data)
    return _rates(steps, clock.start, clock.end)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="offline/uclip_pivot")
    p.add_argument("--data", default=str(ROOT / "data" / "emoji"), help="emoji dataset (mmalign data emoji --root data/emoji builds it)")
    p.add_argument("--cache", default=str(Path(os.environ.get("MMALIGN_CACHE_DIR", Path.home() / ".cache" / "mmalign")) / "bench_loop"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "loop.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    from cached_recipe import cached_recipe_config  # beside this script (run as python benchmarks/perf/X.py)
    from mmalign.recipe import build

    # the recipe's fused AdamW and CPU accelerator are CPU settings
    config = cached_recipe_config(a.recipe, a.data, a.cache, a.batch_size, progress=True,
                                  accelerator="cuda" if device.type == "cuda" else None)
    d = config["data"]["init_args"]
    base, _ = build(config)

    rounds = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            _, data = build(config)
            data.connect(base)
            data.setup("fit")
            plain = plain_loop(copy.deepcopy(base), data, a.steps, a.warmup, device)
            _, data = build(config)
            fit = lightning_fit(copy.deepcopy(base), data, a.steps, a.warmup, device, config["trainer"], Path(tmp) / str(r))
            row = {"plain_steps_per_s": round(plain[0], 1), "fit_steps_per_s": round(fit[0], 1), "ratio": round(fit[0] / plain[0], 3),
                   "plain_steps_per_cpu_s": round(plain[1], 1), "fit_steps_per_cpu_s": round(fit[1], 1),
                   "cpu_ratio": round(fit[1] / plain[1], 3)}
            rounds.append(row)
            print(f"round {r}: plain {plain[0]:.1f} steps/s, fit {fit[0]:.1f} steps/s, fit/plain {row['ratio']:.3f} "
                  f"(per CPU second of this process: {plain[1]:.1f} vs {fit[1]:.1f}, {row['cpu_ratio']:.3f})", flush=True)
    ratio = statistics.median(x["ratio"] for x in rounds)
    cpu_ratio = statistics.median(x["cpu_ratio"] for x in rounds)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {
        "command": "python benchmarks/perf/bench_loop.py " + " ".join(
            f"--{k} {v}" for k, v in (("recipe", a.recipe), ("data", a.data), ("steps", a.steps), ("rounds", a.rounds), ("threads", a.threads), ("device", a.device))),
        "recipe": a.recipe, "batch_size": d["batch_size"], "device": a.device, "gpu": gpu, "torch_threads": a.threads,
        "load_average_start": load_start, "load_average": os.getloadavg(), "rounds": rounds, "median_ratio": ratio, "median_cpu_ratio": cpu_ratio,
    }
    spread = sorted(x["cpu_ratio"] for x in rounds)
    print(f"median fit/plain steps/s: {ratio:.3f} wall, {cpu_ratio:.3f} per CPU second (rounds {spread[0]:.3f}-{spread[-1]:.3f}; "
          f"goal >= 0.9); load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
