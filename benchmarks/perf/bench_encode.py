"""Encoding throughput (issue 8): end-to-end ``mmalign cache`` samples/s vs the encoder's raw forward.

For each modality, the same unique items of ``data/emoji`` and the same batch size are run twice:

* raw: the encoder's forward on pre-made input tensors (``preprocess`` done beforehand, untimed);
* end-to-end: :func:`mmalign.cache.writer.write_split`, the engine of ``mmalign cache`` (DataLoader +
  decode/resample/preprocess in workers, forward, fp16 cast, shard files, markers, manifest merge).

The figure is ``end-to-end samples/s / raw samples/s`` (1.0 = the pipeline adds nothing). Both sides
are measured alternately ``--repeats`` times in this one run and the best of each is kept, which
damps noise from other processes on a shared machine. Encoders (real weights from registry packages):
image EfficientNet-Lite0 (``packaged:efficientnet-lite0``), speech Whisper base (``packaged_whisper_base()``,
full 30 s windows and cropped windows), text all-MiniLM-L6-v2 (``packaged:all-MiniLM-L6-v2``).

    python benchmarks/perf/bench_encode.py                         # every modality, writes benchmarks/results/encode.json
    python benchmarks/perf/bench_encode.py --modalities image --num_workers 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _image() -> Any:
    import encoders

    return encoders.TimmImageEncoder("packaged:efficientnet-lite0")


def _speech(pad_to_30s: bool) -> Callable[[], Any]:
    def build() -> Any:
        from encoders.convert_ct2 import packaged_whisper_base
        from encoders.whisper import WhisperSpeechEncoder

        return WhisperSpeechEncoder(packaged_whisper_base(), pad_to_30s=pad_to_30s)

    return build


def _text() -> Any:
    import encoders

    return encoders.HFTextEncoder("packaged:all-MiniLM-L6-v2", pooling="mean")


#: name -> (encoder factory, manifest field, number of unique items, batch size)
CASES: dict[str, tuple[Callable[[], Any], str, int, int]] = {
    "image": (_image, "image", 128, 8),
    "speech_30s": (_speech(True), "audio", 16, 4),
    "speech_cropped": (_speech(False), "audio", 128, 16),
    "text": (_text, "text", 256, 32),
}


def unique_rows(field: str, n: int, manifest: Path) -> list[dict[str, Any]]:
    """First ``n`` rows of the manifest with distinct values of ``field`` (so the cache encodes n items)."""
    rows, seen = [], set()
    base = manifest.parent
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        value = row.get(field)
        if value is None or value in seen:
            continue
        seen.add(value)
        if field in ("image", "audio"):
            row = {**row, field: str(base / value)}
        rows.append(row)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"{manifest} has only {len(rows)} distinct {field!r} values, {n} requested")
    return rows


def time_raw(encoder: Any, items: list[Any], batch_size: int) -> float:
    """Seconds of the encoder forward alone over pre-made input batches."""
    batches = [encoder.preprocess(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    encoder(batches[0])  # warm-up (allocator, lazy init)
    start = time.perf_counter()
    for inputs in batches:
        encoder(inputs)
    return time.perf_counter() - start


def time_cache(encoder: Any, field: str, rows: list[dict[str, Any]], batch_size: int, num_workers: int) -> float:
    """Seconds of ``mmalign cache``'s writer for one fresh split (nothing resumed)."""
    from mmalign.cache.writer import write_split
    from mmalign.training.towers import Tower

    tower = Tower(encoder, field=field)
    tower.build(None)
    tmp = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        start = time.perf_counter()
        manifest = write_split(rows, {"t": tower}, tmp / "train", split="train", batch_size=batch_size,
                               num_workers=num_workers, progress=False)
        seconds = time.perf_counter() - start
        assert manifest is not None and manifest["num_rows"] == len(rows)
        return seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_case(name: str, num_workers: list[int], repeats: int, manifest: Path, n: int | None = None) -> dict[str, Any]:
    factory, field, default_n, batch_size = CASES[name]
    n = n or default_n
    rows = unique_rows(field, n, manifest)
    encoder = factory()
    items = [r[field] for r in rows]
    raw = [time_raw(encoder, items, batch_size)]
    e2e: dict[int, list[float]] = {w: [] for w in num_workers}
    for _ in range(repeats):
        for w in num_workers:
            e2e[w].append(time_cache(encoder, field, rows, batch_size, w))
        raw.append(time_raw(encoder, items, batch_size))
    raw_sps = n / min(raw)
    out: dict[str, Any] = {"items": n, "batch_size": batch_size, "raw_samples_per_s": raw_sps, "workers": {}}
    for w, times in e2e.items():
        sps = n / min(times)
        out["workers"][w] = {"cache_samples_per_s": sps, "ratio": sps / raw_sps}
    best = max(out["workers"], key=lambda w: out["workers"][w]["ratio"])
    out["best_workers"], out["ratio"] = best, out["workers"][best]["ratio"]
    return out


def batch_size_sweep(name: str, sizes: list[int], manifest: Path) -> dict[int, float]:
    """Raw forward samples/s per batch size (the batch-size rule in docs/benchmarks.md)."""
    factory, field, _, _ = CASES[name]
    n = max(sizes) * 2
    items = [r[field] for r in unique_rows(field, n, manifest)]
    encoder = factory()
    return {bs: n / min(time_raw(encoder, items, bs) for _ in range(2)) for bs in sizes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modalities", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--num_workers", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--items", type=int, default=None, help="override the number of items per case")
    parser.add_argument("--sweep", nargs="*", type=int, default=[1, 8, 32], help="image batch sizes for the rule")
    parser.add_argument("--manifest", default=str(ROOT / "data" / "emoji" / "train.jsonl"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "encode.json"))
    args = parser.parse_args(argv)
    import torch

    results: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cases": {}}
    for name in args.modalities:
        r = run_case(name, args.num_workers, args.repeats, Path(args.manifest), args.items)
        results["cases"][name] = r
        per_w = ", ".join(f"workers={w}: {v['cache_samples_per_s']:.1f}/s ratio {v['ratio']:.3f}" for w, v in r["workers"].items())
        print(f"[encode] {name}: raw forward {r['raw_samples_per_s']:.1f} samples/s (batch {r['batch_size']}); "
              f"mmalign cache {per_w}; best ratio {r['ratio']:.3f}", flush=True)
    if args.sweep and "image" in args.modalities:
        sweep = batch_size_sweep("image", args.sweep, Path(args.manifest))
        results["image_batch_sweep"] = sweep
        top = max(sweep.values())
        print("[encode] image raw forward by batch size: "
              + ", ".join(f"{bs}: {sps:.1f}/s ({sps / top:.2f} of best)" for bs, sps in sweep.items()), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
