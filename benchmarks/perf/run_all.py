"""Run every benchmark script in one go and print every figure they report, as ratios from this one run.

Each ``benchmarks/bench_*.py`` runs in its own process, one after another (never in parallel: they
measure the same cores). A script reports its figures on stdout lines starting with ``[tag]`` (and
``cached / raw`` for the cache benchmark); this runner echoes everything live and reprints those lines
as a summary, with the machine they were measured on.

    python benchmarks/perf/run_all.py                    # every script with the QUICK arguments below
    python benchmarks/perf/run_all.py --full             # every script with its own defaults (slower)
    python benchmarks/perf/run_all.py --only encode precision
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Arguments used without ``--full``: same figures, fewer items/steps so the whole run fits a coffee.
QUICK: dict[str, list[str]] = {
    "bench_cache": ["--part", "speed", "--raw_steps", "6", "--cached_steps", "200"],
    "bench_encode": ["--repeats", "2"],
    "bench_precision": ["--steps", "30"],
    "bench_loop": ["--rounds", "3"],
    "bench_retrieval": ["--n", "20000", "--rounds", "2"],
    "bench_resident": ["--rounds", "2"],
    "bench_blockwise_loss": ["--sizes", "4096", "--big", "16384"],
    "bench_sweep": ["--steps", "10", "--rounds", "2"],
    "bench_cache_memory": ["--sizes", "1000", "20000"],
}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}; {os.cpu_count()} CPU cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"{gpu}; Python {platform.python_version()}")


def is_figure(line: str) -> bool:
    if line.startswith("[mmalign"):  # progress lines of the tools themselves, not figures
        return False
    return line.startswith("[") and "]" in line[:24] or line.startswith("cached / raw")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="script names without bench_ (encode, precision, cache)")
    p.add_argument("--full", action="store_true", help="run each script with its own defaults")
    a = p.parse_args(argv)
    scripts = sorted((ROOT / "benchmarks" / "perf").glob("bench_*.py"))
    if a.only:
        unknown = set(a.only) - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; have {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in a.only]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    summary: list[str] = [f"machine: {machine()}"]
    failed = []
    for script in scripts:
        args = [] if a.full else QUICK.get(script.stem, [])
        print(f"=== {script.name} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Loading weights" in line:
                continue
            print(line, end="", flush=True)
            if is_figure(line.strip()):
                summary.append(f"{script.stem}: {line.strip()}")
        rc = proc.wait()
        summary.append(f"{script.stem}: exit {rc} after {time.perf_counter() - start:.0f} s")
        if rc:
            failed.append(script.name)
    print("\n=== summary (every figure measured in this run)")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
