"""Contrastive loss on huge batches, blockwise vs dense (issue 21.3): memory and time in one run.

Each measurement runs in a fresh subprocess (peak RSS of a process only grows, so one process per
figure): the loss forward + backward of ``ClipLoss`` / ``SigLipLoss`` on ``[B, D]`` random embeddings,
``block_size=None`` (dense) vs ``--block`` rows. Reported: extra peak RSS over the process after
making the inputs (the loss's own memory), CPU seconds of forward + backward, and the blocked/dense
ratios. Dense at ``--dense_max`` rows at most (32k dense needs ~17 GB: not on a shared 23 GB machine);
blocked also at 32,768 rows. The dense/blocked pairs alternate. On a GPU (``--device cuda``)
``torch.cuda.max_memory_allocated`` replaces RSS.

    python benchmarks/perf/bench_blockwise_loss.py                   # 8192 dense vs blocked, 32768 blocked
    python benchmarks/perf/bench_blockwise_loss.py --sizes 4096 --loss siglip
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(n: int, dim: int, block: int | None, loss: str, device: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from mmalign.training.losses import ClipLoss, SigLipLoss

    fn = (ClipLoss if loss == "clip" else SigLipLoss)(block_size=block).to(device)
    # Warm-up on a small batch, blocked and dense (first calls import modules, e.g. checkpointing).
    for warm in (ClipLoss, SigLipLoss):
        w = [torch.randn(64, dim, device=device, requires_grad=True) for _ in range(2)]
        next(iter(warm(block_size=16).to(device)(*w).values())).backward()
        next(iter(warm().to(device)(*w).values())).backward()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, dim, generator=gen).to(device).requires_grad_(True)
    b = torch.randn(n, dim, generator=gen).to(device).requires_grad_(True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    c0 = time.process_time()
    w0 = time.perf_counter()
    out = next(iter(fn(a, b).values()))
    out.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"rows": n, "block": block, "loss": float(out), "cpu_s": time.process_time() - c0,
            "wall_s": time.perf_counter() - w0, "peak_mb": peak / 2**20}


def run(n: int, dim: int, block: int | None, loss: str, device: str) -> dict:
    code = f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.perf.bench_blockwise_loss import child; " \
           f"print(json.dumps(child({n}, {dim}, {block}, {loss!r}, {device!r})))"
    # A fixed mmap threshold: glibc otherwise raises it after the first big free and keeps later
    # [block, N] buffers on the heap, where freed memory stays in the RSS (same for both variants).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[8192])
    p.add_argument("--big", type=int, default=32768, help="blocked only (0: skip)")
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "blockwise_loss.json"))
    a = p.parse_args()
    rows = []
    for n in a.sizes:
        dense = run(n, a.dim, None, a.loss, a.device)
        blocked = run(n, a.dim, a.block, a.loss, a.device)
        rel = abs(dense["loss"] - blocked["loss"]) / abs(dense["loss"])
        row = {"rows": n, "dense": dense, "blocked": blocked, "memory_ratio": blocked["peak_mb"] / max(dense["peak_mb"], 1e-9),
               "time_ratio": blocked["cpu_s"] / dense["cpu_s"], "loss_rel_diff": rel}
        rows.append(row)
        print(f"{a.loss} B={n} D={a.dim}: dense {dense['peak_mb']:.0f} MB {dense['cpu_s']:.2f} CPU s, block {a.block}: "
              f"{blocked['peak_mb']:.0f} MB {blocked['cpu_s']:.2f} CPU s -> memory x{row['memory_ratio']:.3f}, "
              f"time x{row['time_ratio']:.2f}, loss rel. diff {rel:.1e}", flush=True)
    if a.big:
        big = run(a.big, a.dim, a.block, a.loss, a.device)
        rows.append({"rows": a.big, "blocked": big})
        print(f"{a.loss} B={a.big} block {a.block}: {big['peak_mb']:.0f} MB peak, {big['cpu_s']:.1f} CPU s forward+backward "
              f"(dense would need ~{4 * 4 * a.big * a.big / 2**30:.0f} GiB of logits buffers)", flush=True)
    result = {"command": f"python benchmarks/perf/bench_blockwise_loss.py --sizes {' '.join(map(str, a.sizes))} --big {a.big} "
              f"--block {a.block} --dim {a.dim} --loss {a.loss} --device {a.device}", "load_average": os.getloadavg(), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
