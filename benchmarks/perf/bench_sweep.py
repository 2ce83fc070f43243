"""N runs as one batched model vs N runs one after another (issue 21.4): steps/s ratio in one run.

Members: two MLP projectors (``--a_dim``/``--b_dim`` -> ``--embed_dim``, hidden ``--hidden``, ``--dropout``,
``--norm``) + InfoNCE, the shape of the offline uCLIP pivot head (dropout 0.1, no norm), on random features
standing in for cached ones (the data path is not what is compared). Sequential = each member trained alone
with ``torch.optim.AdamW`` for ``--steps`` steps; sweep = :class:`mmalign.training.sweep.Sweep` of the same
members for the same steps. Every size of ``--members`` (default 4 and 8) is measured in each of ``--rounds``
rounds, sequential and sweep alternating; per-CPU-second figures are printed beside wall clock. CPU goal: no
slower than sequential (2 compute-bound cores gain nothing from batching); the GPU goal (>= 4x for 8 seeds)
needs a device: ``--device cuda``.

    python benchmarks/perf/bench_sweep.py                 # 4 and 8 members, batch 128, 1 thread
    python benchmarks/perf/bench_sweep.py --norm batch    # the uCLIP hub recipe's BatchNorm head
    python benchmarks/perf/bench_sweep.py --device cuda --members 8 --batch_size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, nargs="+", default=[4, 8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--a_dim", type=int, default=512)
    p.add_argument("--b_dim", type=int, default=384)
    p.add_argument("--embed_dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--norm", default="none", choices=["none", "layer", "batch"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    import projectors
    from mmalign.training.losses import ClipLoss
    from mmalign.training.sweep import PairMember, Sweep, build_members

    def make():
        head = dict(hidden_dim=a.hidden, dropout=a.dropout, norm=a.norm, num_blocks=0, input_norm=a.norm != "none")
        return PairMember(projectors.MLP(a.a_dim, a.embed_dim, **head),
                          projectors.MLP(a.b_dim, a.embed_dim, **head), ClipLoss()).to(device)

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(a.batch_size, a.a_dim, generator=gen).to(device), torch.randn(a.batch_size, a.b_dim, generator=gen).to(device))
               for _ in range(8)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def sequential(seeds: list[int]) -> tuple[float, float]:
        members = build_members(make, seeds)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in members]
        sync()
        w, c = time.perf_counter(), time.process_time()
        for m, opt in zip(members, opts):
            for s in range(a.steps):
                loss = m(*batches[s % len(batches)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    def batched(seeds: list[int]) -> tuple[float, float]:
        sweep = Sweep(build_members(make, seeds), lr=1e-3)
        sweep.step(*batches[0])  # warm-up (vmap tracing)
        sync()
        w, c = time.perf_counter(), time.process_time()
        for s in range(a.steps):
            sweep.step(*batches[s % len(batches)])
        sync()
        return time.perf_counter() - w, time.process_time() - c

    sequential([0])  # warm-up
    rounds = []
    for r in range(a.rounds):
        for n in a.members:
            seeds = list(range(n))
            seq, swp = sequential(seeds), batched(seeds)
            row = {"members": n, "sequential_wall_s": round(seq[0], 3), "sweep_wall_s": round(swp[0], 3),
                   "sequential_cpu_s": round(seq[1], 3), "sweep_cpu_s": round(swp[1], 3),
                   "speedup_wall": round(seq[0] / swp[0], 3), "speedup_cpu": round(seq[1] / swp[1], 3)}
            rounds.append(row)
            print(f"round {r}: {n} runs x {a.steps} steps: sequential {seq[0]:.2f} s, sweep {swp[0]:.2f} s wall -> "
                  f"{row['speedup_wall']:.2f}x wall, {row['speedup_cpu']:.2f}x per CPU second", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    medians = {}
    for n in a.members:
        med_w = statistics.median(x["speedup_wall"] for x in rounds if x["members"] == n)
        med_c = statistics.median(x["speedup_cpu"] for x in rounds if x["members"] == n)
        medians[str(n)] = {"median_speedup_wall": med_w, "median_speedup_cpu": med_c}
        print(f"sweep / sequential speed-up, {n} members: {med_w:.2f}x wall, {med_c:.2f}x per CPU second "
              f"(goal: >= 1 on CPU, >= 4 on a GPU){' on ' + gpu if gpu else ''}")
    result = {"command": f"python benchmarks/perf/bench_sweep.py --members {' '.join(map(str, a.members))} --steps {a.steps} "
              f"--rounds {a.rounds} --batch_size {a.batch_size} --dropout {a.dropout} --norm {a.norm} --threads {a.threads} "
              f"--device {a.device}", "gpu": gpu, "load_average": os.getloadavg(), "rounds": rounds, "medians": medians}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
