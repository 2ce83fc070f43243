"""Open time, memory and row throughput of synthetic table and manifest sources vs the row-by-row manifest reader.

    python -m benchmarks.perf.bench_sources --rows 1000000 10000000 --formats parquet jsonl csv --out outputs/bench_sources

For each size: a Parquet table (id, concept, lang, text, image) is written in 1M-row row groups, and the same rows as
a plain JSONL and CSV manifest (``--formats``; ``jsonl_late``: the JSONL plus one last row with a key no other row
has, the case where a key first seen after the first block must be unified); then, in a fresh process each, each file is opened with
:func:`mmalign.data.sources.open_source` three times (cold: the one-time conversion to a mapped Arrow copy and the row
checks; warm: the mapped copy and the saved checks; fields: as the DataModule opens it for a recipe reading text +
image), and we record open wall and CPU seconds, extra RSS (MB), random row access (us/row) and the seconds the
feature cache takes to plan all rows (``RowTable.of`` + ``unique_index`` over ``text``, what ``mmalign cache`` and
``CachedSplit`` do first). ``--cache_only`` then measures rows/s through the feature-cache writer of ``mmalign cache``
(``write_split``) with a near-free text encoder (a byte histogram) on the first ``--cache_rows`` rows of each table.
The row-by-row manifest reader (``ManifestDataset``) is measured on a JSONL of ``--manifest_rows`` rows in the same
run (us and KB of RSS per row). ``--open_code OLD_CHECKOUT ''`` alternates the opens between checkouts of mmalign
(``--repeats`` rounds, in ``open_runs``). Generated files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

LANGS = ["en", "de", "fr", "es", "ja", "zh", "ar", "ru"]


def rss_mb(kind: str = "VmRSS") -> float:
    """Resident MB: ``VmRSS`` (all), ``RssAnon`` (process memory), ``RssFile`` (mapped file pages, shared) or ``VmHWM``
    (the peak of ``VmRSS``; not ``ru_maxrss``, which a child process inherits from its parent's RSS at the spawn:
    opens measured after the parent generated a file read the parent's ~600 MB as their peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_table(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = np.arange(start, start + n)
        ids = pa.array(np.char.add("row", idx.astype(str)))
        table = pa.table({
            "id": ids, "concept": pa.array(np.char.add("c", (idx // 4).astype(str))),
            "lang": pa.array(np.array(LANGS)[idx % len(LANGS)]),
            "text": pa.array(np.char.add("a synthetic caption number ", idx.astype(str))),
            "image": pa.array(np.char.add(np.char.add("images/", (idx // 4).astype(str)), ".jpg")),
        })
        writer = writer or pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def make_text(parquet: Path, path: Path, late_key: bool = False) -> None:
    """The rows of ``parquet`` as a plain JSONL or CSV manifest (by ``path``'s suffix), 1M rows at a time; with
    ``late_key`` (JSONL) one more row at the end with a key (``source``) no other row has."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(parquet))
    if path.suffix == ".csv":
        with pacsv.CSVWriter(str(path), pf.schema_arrow) as writer:
            for batch in pf.iter_batches(batch_size=1_000_000):
                writer.write_batch(batch)
        return
    with open(path, "w") as f:
        for batch in pf.iter_batches(batch_size=1_000_000):
            cols = {k: batch.column(k).to_pylist() for k in batch.schema.names}
            f.write("".join(json.dumps(dict(zip(cols, vals))) + "\n" for vals in zip(*cols.values())))
        if late_key:
            n = pf.metadata.num_rows
            f.write(json.dumps({"id": f"row{n}", "concept": f"c{n // 4}", "lang": "en", "text": "a late row",
                                "image": f"images/{n // 4}.jpg", "source": "late"}) + "\n")


def measure(path: str, check_rows: int) -> dict:
    import random

    from mmalign.cache.rowtable import RowTable
    from mmalign.data.sources import open_source

    out = {}
    for phase in ("cold", "warm", "fields"):
        # fields: as the DataModule opens it for a recipe reading text + image (blank/missing checks too)
        base, base_anon = rss_mb(), rss_mb("RssAnon")
        t, c = time.perf_counter(), time.process_time()
        src = open_source(path, required_fields=["text", "image"] if phase == "fields" else (), check_files=False)
        out[f"open_{phase}_s"] = round(time.perf_counter() - t, 2)
        out[f"open_{phase}_cpu_s"] = round(time.process_time() - c, 2)
        out[f"rss_{phase}_mb"] = round(rss_mb() - base, 1)
        out[f"rss_anon_{phase}_mb"] = round(rss_mb("RssAnon") - base_anon, 1)
        if phase == "cold":
            out["peak_rss_cold_mb"] = round(rss_mb("VmHWM") - base, 1)
        if phase != "fields":
            del src
    out["source"] = type(src).__name__
    n = len(src)
    picks = [random.randrange(n) for _ in range(20000)]
    t = time.perf_counter()
    for i in picks:
        src[i]
    out["random_row_us"] = round((time.perf_counter() - t) / len(picks) * 1e6, 1)
    t, c = time.perf_counter(), time.process_time()
    table = RowTable.of(src.rows, ["text"])  # what the cache writer and CachedSplit do first, over every row
    first, _ = table.unique_index("text")
    out["cache_plan_s"] = round(time.perf_counter() - t, 2)
    out["cache_plan_cpu_s"] = round(time.process_time() - c, 2)
    out["items"] = len(first)
    out["rss_after_plan_mb"] = round(rss_mb() - base, 1)
    if path.endswith(".parquet"):  # the row-id check of opening a feature cache of these rows (cache format 2)
        import tempfile

        import numpy as np

        from mmalign.cache.format import ids_difference
        from mmalign.cache.rowtable import id_buffers
        from mmalign.cache.validate import row_ids

        with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
            offsets, data = id_buffers(table.columns["id"])
            np.save(Path(tmp) / "row_ids.offsets.npy", offsets)
            np.save(Path(tmp) / "row_ids.utf8.npy", data)
            nbytes = len(data)
            del offsets, data
            rss0 = rss_mb()
            t, c = time.perf_counter(), time.process_time()
            ids = row_ids(Path(tmp), n, nbytes)
            assert ids_difference(ids, table.columns["id"]) is None
            out["cache_ids_check_s"] = round(time.perf_counter() - t, 2)
            out["cache_ids_check_cpu_s"] = round(time.process_time() - c, 2)
            out["cache_ids_check_rss_mb"] = round(rss_mb() - rss0, 1)
            out["cache_ids_files_mb"] = round(sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20, 1)
            del ids
    out["peak_rss_mb"] = round(rss_mb("VmHWM"), 1)
    out["rows"] = n
    return out


def cheap_text_encoder(kind: str = "vectorised"):
    """A text encoder costing almost nothing (a 64-bin histogram of byte % 64): the benchmark measures the data path.

    ``vectorised`` counts every item of a batch in one ``numpy.bincount``; ``per_item`` (the benchmark's encoder up to
    session 5) builds three tensors per item, which cost more than the writer itself. Both give the same features."""
    import numpy as np
    import torch

    from encoders.base import Encoder, EncoderOutput, Modality

    class ByteHistogram(Encoder):
        modality = Modality.TEXT
        output_dim = 64
        has_tokens = False

        def __init__(self) -> None:
            super().__init__()
            self.freeze()

        def preprocess(self, items):
            if kind == "per_item":
                out = torch.zeros(len(items), 64)
                for i, t in enumerate(items):
                    b = torch.frombuffer(bytearray(t.encode()), dtype=torch.uint8).long() % 64
                    out[i].index_add_(0, b, torch.ones(len(b)))
                return {"x": out}
            enc = [t.encode() for t in items]
            lengths = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
            data = np.frombuffer(b"".join(enc), dtype=np.uint8)
            rows = np.repeat(np.arange(len(enc)), lengths)
            hist = np.bincount(rows * 64 + data % 64, minlength=len(enc) * 64).reshape(len(enc), 64)
            return {"x": torch.from_numpy(hist.astype(np.float32))}

        def encode(self, inputs):
            return EncoderOutput(pooled=inputs["x"])

    return ByteHistogram()


def measure_cache(path: str, rows: int, out_dir: str, encoder: str = "vectorised") -> dict:
    """Rows/s of the feature-cache writer (mmalign cache's ``write_split``) over the first ``rows`` rows of a table
    (0: all), given as the table's columns (what ``mmalign cache`` hands the writer for a table source)."""
    import shutil

    import torch

    from mmalign.cache.rowtable import RowTable
    from mmalign.cache.writer import write_split
    from mmalign.data.sources import open_source
    from mmalign.training.towers import Tower

    torch.set_num_threads(1)
    src = open_source(path)
    table = RowTable.of(src.rows, ["text"])
    if 0 < rows < len(table):
        table = RowTable({k: c.slice(0, rows) for k, c in table.columns.items()})
    shutil.rmtree(out_dir, ignore_errors=True)
    base = rss_mb()
    t, c = time.perf_counter(), time.process_time()
    write_split(table, {"text": Tower(cheap_text_encoder(encoder), "text")}, out_dir, split="train", batch_size=1024,
                fingerprint="rows", progress=False, shard_size=65536)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"rows": len(table), "encoder": encoder, "cache_s": round(dt, 1), "cache_cpu_s": round(dc, 1),
            "cache_rows_per_s": int(len(table) / dt), "cache_rows_per_cpu_s": int(len(table) / dc),
            "rss_mb": round(rss_mb() - base, 1), "load_average": os.getloadavg()[0]}


def measure_manifest(path: str) -> dict:
    from mmalign.data.manifest import ManifestDataset

    base = rss_mb()
    t = time.perf_counter()
    ds = ManifestDataset(path, check_files=False)
    dt = time.perf_counter() - t
    return {"rows": len(ds), "open_s": round(dt, 2), "us_per_row": round(dt / len(ds) * 1e6, 1),
            "kb_per_row": round((rss_mb() - base) * 1024 / len(ds), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--formats", nargs="+", default=["parquet", "jsonl", "csv"], choices=["parquet", "jsonl", "csv", "jsonl_late"])
    p.add_argument("--manifest_rows", type=int, default=20_000)
    p.add_argument("--check_rows", type=int, default=200_000, help=argparse.SUPPRESS)
    p.add_argument("--cache_rows", type=int, default=200_000, help="rows written by the cache-writer measurement (0: all)")
    p.add_argument("--cache_only", action="store_true", help="only the cache-writer rows/s on the existing tables")
    p.add_argument("--cache_encoder", nargs="+", default=["vectorised"], choices=["vectorised", "per_item"],
                   help="the cheap encoder(s) of the cache measurement (several: alternated in one run)")
    p.add_argument("--cache_code", nargs="+", default=[""],
                   help="checkouts of mmalign whose writer is measured (PYTHONPATH of the measuring process; '' = "
                        "the installed one), alternated with the encoders in one run")
    p.add_argument("--open_code", nargs="+", default=[""],
                   help="checkouts of mmalign whose opens are measured ('' = the installed one), alternated in one run")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the alternated cache (or --open_code) measurements")
    p.add_argument("--out", default="outputs/bench_sources")
    p.add_argument("--json", default=None, help="also write the results here (e.g. benchmarks/results/sources.json)")
    p.add_argument("--keep", action="store_true", help="keep the generated files and Arrow copies")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        kind, path = args.measure
        if kind == "cache":
            print(json.dumps(measure_cache(path, args.cache_rows, str(Path(args.out) / "cache"), args.cache_encoder[0])))
        else:
            print(json.dumps(measure(path, args.check_rows) if kind == "table" else measure_manifest(path)))
        return
    if args.cache_only:
        results = {"command": "python -m benchmarks.perf.bench_sources " + shlex.join(sys.argv[1:]), "runs": []}
        for n in args.rows:
            path = Path(args.out) / f"table-{n}.parquet"
            for _ in range(args.repeats):
                for code in args.cache_code:
                    for encoder in args.cache_encoder:
                        env = {**os.environ, "MMALIGN_ARROW_CACHE": str(Path(args.out) / "arrow-cache")}
                        if code:  # the other checkout's mmalign + encoders first; this file is run as a script
                            env["PYTHONPATH"] = str(Path(code).resolve())
                        res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cache_rows", str(args.cache_rows),
                                              "--out", args.out, "--cache_encoder", encoder, "--measure", "cache", str(path)],
                                             env=env, capture_output=True, text=True, check=True)
                        run = {"table": path.name, "code": code or "installed", **json.loads(res.stdout.strip().splitlines()[-1])}
                        results["runs"].append(run)
                        print(json.dumps(run), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        return
    import shutil

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MMALIGN_ARROW_CACHE": str(out / "arrow-cache")}
    results = {"command": "python -m benchmarks.perf.bench_sources " + shlex.join(sys.argv[1:]), "load_average": os.getloadavg()}
    man = out / f"manifest-{args.manifest_rows}.jsonl"
    with open(man, "w") as f:
        for i in range(args.manifest_rows):
            f.write(json.dumps({"id": f"row{i}", "concept": f"c{i // 4}", "lang": LANGS[i % 8],
                                "text": f"a synthetic caption number {i}", "image": f"images/{i // 4}.jpg"}) + "\n")
    jobs = [("manifest", man)]
    for n in args.rows:
        for fmt in args.formats:
            jobs.append(("table", out / (f"table-{n}-late.jsonl" if fmt == "jsonl_late" else f"table-{n}.{fmt}")))
    results["open_runs"] = []
    try:
        for kind, path in jobs:
            if kind == "table" and not path.exists():
                n = int(path.stem.split("-")[1])
                parquet = out / f"table-{n}.parquet"
                if not parquet.exists():
                    make_table(parquet, n)
                if path != parquet:
                    make_text(parquet, path, late_key=path.stem.endswith("-late"))
            runs = [(r, code) for r in range(args.repeats) for code in args.open_code] if kind == "table" else [(0, "")]
            for r, code in runs:
                run_env = dict(env)
                if code:  # the other checkout's mmalign first; this file is run as a script
                    run_env["PYTHONPATH"] = str(Path(code).resolve())
                res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", kind, str(path)],
                                     env=run_env, capture_output=True, text=True, check=True)
                results[path.name] = json.loads(res.stdout.strip().splitlines()[-1])
                results[path.name]["file_mb"] = round(path.stat().st_size / 2**20, 1)
                results[path.name]["load_average"] = os.getloadavg()[0]
                if kind == "table":
                    results["open_runs"].append({"file": path.name, "code": code or "installed", "round": r, **results[path.name]})
                    shutil.rmtree(out / "arrow-cache", ignore_errors=True)  # the next code or round converts again
                print(path.name, code or "installed", results[path.name], flush=True)
            if kind == "table" and path.suffix != ".parquet" and not args.keep:
                path.unlink()  # disk: only the Parquet source and the Arrow copies stay until the end
        (out / "results.json").write_text(json.dumps(results, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.keep:
            for f in list(out.glob("table-*")) + [man]:
                f.unlink(missing_ok=True)
            shutil.rmtree(out / "arrow-cache", ignore_errors=True)


if __name__ == "__main__":
    main()
