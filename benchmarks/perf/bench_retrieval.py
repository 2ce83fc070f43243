"""Retrieval evaluation vs the raw similarity matmul (issue 21.5): time ratio measured in one run.

A = the score matmul alone, ``q[chunk] @ g.T`` over all query chunks (the floor: any exact evaluation
computes every score), timed at both the old block size (2**24 scores) and the one ``retrieval_ranks``
picks; the smaller time is the reference. B = ``retrieval_ranks`` (exact ranks, pessimistic ties) on
the same embeddings. A and B alternate ``--rounds`` times; CPU seconds of the process
(``time.process_time``) are reported beside wall clock, so a loaded shared machine reads right.

    python benchmarks/perf/bench_retrieval.py                      # 30k x 30k, D=256, 1 thread
    python benchmarks/perf/bench_retrieval.py --n 100000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def matmul_only(q: torch.Tensor, g: torch.Tensor, step: int) -> None:
    for s in range(0, len(q), step):
        q[s : s + step] @ g.T


def timed(fn, *args) -> tuple[float, float]:
    w, c = _clock()
    fn(*args)
    w2, c2 = _clock()
    return w2 - w, c2 - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30000, help="queries = gallery items")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "retrieval.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from mmalign.evaluation.retrieval import auto_chunk_size, rank_chunk_size, retrieval_ranks

    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(a.n, a.dim, generator=gen), dim=-1)
    g = F.normalize(q + 0.7 * torch.randn(a.n, a.dim, generator=gen), dim=-1)
    labels = torch.arange(a.n)
    steps = sorted({auto_chunk_size(a.n, None), rank_chunk_size(a.n, None)})
    rounds = []
    for r in range(a.rounds):
        mm = {s: timed(matmul_only, q, g, s) for s in steps}
        best_step = min(mm, key=lambda s: mm[s][1])
        ev = timed(retrieval_ranks, q, g, labels, labels)
        row = {"matmul_cpu_s": {str(s): round(mm[s][1], 3) for s in steps}, "eval_cpu_s": round(ev[1], 3),
               "matmul_wall_s": round(mm[best_step][0], 3), "eval_wall_s": round(ev[0], 3),
               "cpu_ratio": round(ev[1] / mm[best_step][1], 3), "wall_ratio": round(ev[0] / mm[best_step][0], 3)}
        rounds.append(row)
        print(f"round {r}: matmul {row['matmul_cpu_s']} CPU s (rows per block), retrieval_ranks {ev[1]:.2f} CPU s: "
              f"eval / matmul {row['cpu_ratio']:.2f} per CPU second, {row['wall_ratio']:.2f} wall", flush=True)
    cpu_ratio = statistics.median(x["cpu_ratio"] for x in rounds)
    result = {"command": f"python benchmarks/perf/bench_retrieval.py --n {a.n} --dim {a.dim} --rounds {a.rounds} --threads {a.threads}",
              "load_average": os.getloadavg(), "rounds": rounds, "median_cpu_ratio": cpu_ratio}
    print(f"retrieval_ranks / raw matmul, {a.n} x {a.n} at D={a.dim}: {cpu_ratio:.2f} per CPU second (goal <= 2)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
