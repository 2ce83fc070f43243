"""Latent mixup (FuseMix; Vouitsis et al., CVPR 2024) beside no mixup, on the offline recipes' feature caches.

Each recipe (``configs/<recipe>.yaml`` + ``configs/offline/<recipe>.yaml``) trains from a finished product cache
(``mmalign cache``; nothing is encoded here) with ``model.init_args.mixup_alpha`` unset and set to 1, 3 seeds
each, and is scored by its own monitor, ``val/R@1`` (mean R@1 of the trained tower pairs, both directions, every
language together, on the held-out VALIDATION concepts); ``test/R@1`` is reported beside it. Mixup is kept in a
recipe only where its mean val/R@1 beats no mixup by more than the seeds' spread (both standard deviations)::

    python -m benchmarks.studies.mixup --recipes uclip_pivot anchor_bind lit_contrastive --seeds 0 1 2

Caches: ``--cache NAME=DIR`` (defaults: the folders the other studies fill: ``offline_results`` for uclip_pivot and
lit_contrastive, the trimodal study for anchor_bind and sonar_speech, see :func:`setups`); a recipe whose cache is
missing or does not match its config is reported as skipped, with the reason. sonar_speech reads the trimodal
subset's Whisper features (cropped windows, float32: :data:`SONAR_ENCODER`) from a hard-linked copy of
``runs/trimodal/cache`` brought to the current cache format with ``mmalign cache`` (nothing re-encoded but the
train split's USE-m texts)::

    cp -al runs/trimodal/cache outputs/mixup/trimodal_cache
    mmalign cache --config configs/sonar_speech.yaml --config configs/offline/sonar_speech.yaml \
        --model.init_args.towers.speech.init_args.encoder.init_args.pad_to_30s false \
        --model.init_args.towers.speech.init_args.encoder.init_args.dtype float32 \
        --data.init_args.train runs/trimodal/data/train.jsonl --data.init_args.val runs/trimodal/data/val.jsonl \
        --data.init_args.test runs/trimodal/data/test.jsonl --output outputs/mixup/trimodal_cache
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _msg in (".*LightningCLI's args parameter.*", ".*LeafSpec.*", ".*does not have many workers.*"):
    warnings.filterwarnings("ignore", message=_msg)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MMALIGN_CACHE_DIR", Path.home() / ".cache" / "mmalign"))


#: sonar_speech on the trimodal study's feature cache (``runs/trimodal/cache``: 240 spoken training concepts and 40
#: val / 80 test concepts, en/de/es/fr/it/pt/ru speech; ``python -m benchmarks.studies.trimodal``). Its Whisper
#: features are CROPPED windows in float32 (the anchor-bind setting), not the sonar recipe's 30 s window in bf16:
#: filling a 30 s cache of the recipe's own splits takes 45 min on an idle 2-core CPU, far more on a shared one.
SONAR_ENCODER = {"pad_to_30s": False, "dtype": "float32"}


def setups(data: Path) -> dict[str, dict[str, Any]]:
    """Per recipe: manifests, cache folder, data options (as the study that filled the cache set them)."""
    from benchmarks.studies.trimodal import HEARD, TRAIN_LANGUAGES, UNHEARD

    emoji = {s: str((data / f"{s}.jsonl").resolve()) for s in ("train", "val", "test")}
    trimodal = {s: str(ROOT / "runs" / "trimodal" / "data" / f"{s}.jsonl") for s in ("train", "val", "test")}
    lit = sorted((CACHE / "offline_results").glob("lit_contrastive-*"))  # offline_results names it by encoder key
    return {
        "uclip_pivot": {"splits": emoji, "cache": CACHE / "offline_results" / "uclip_pivot-UniversalSentenceEncoderM-6f55a4eccf1ad838"},
        "sonar_speech": {"splits": trimodal, "cache": ROOT / "outputs" / "mixup" / "trimodal_cache", "encoders": {"speech": SONAR_ENCODER},
                         "note": "on the trimodal study's subset cache (240 spoken training concepts, 40 val, 80 test; "
                                 "Whisper features of cropped windows in float32, not the recipe's 30 s window in bf16)"},
        "lit_contrastive": {"splits": emoji, "cache": lit[-1] if lit else CACHE / "offline_results" / "lit_contrastive"},
        "anchor_bind": {"splits": trimodal, "cache": ROOT / "runs" / "trimodal" / "cache",
                        "data": {"train_languages": list(TRAIN_LANGUAGES), "eval_languages": list(HEARD + UNHEARD)},
                        "note": "the trimodal study's subset (python -m benchmarks.studies.trimodal)"},
    }


def fit_and_score(name: str, setup: dict[str, Any], alpha: float | None, seed: int, epochs: int | None) -> dict[str, float]:
    """``mmalign fit`` of the cached recipe with ``mixup_alpha`` (Lightning), then its ``val/R@1`` and ``test/R@1``."""
    import lightning as L

    from mmalign.recipe import build, load_config

    cfg = load_config(name, variant="offline")
    d = cfg["data"]["init_args"]
    d.update({s: p for s, p in setup["splits"].items()})
    for tower, args in setup.get("encoders", {}).items():  # encoder settings of the cache read (see SONAR_ENCODER)
        cfg["model"]["init_args"]["towers"][tower]["init_args"]["encoder"]["init_args"].update(args)
    d.update(setup.get("data", {}))
    d["cache_dir"] = str(setup["cache"])
    cfg["model"]["init_args"]["mixup_alpha"] = alpha
    model, dm = build(cfg, seed=seed)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_epochs=epochs or cfg["trainer"]["max_epochs"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    ev = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = ev.validate(model, datamodule=dm, verbose=False)[0]["val/R@1"]
    test = ev.test(model, datamodule=dm, verbose=False)[0]["test/R@1"]
    return {"val": float(val), "test": float(test)}


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, scores in runs.items():
        out[arm] = {split: {"mean": statistics.mean(s[split] for s in scores),
                            "std": statistics.stdev([s[split] for s in scores]) if len(scores) > 1 else 0.0,
                            "runs": [s[split] for s in scores]} for split in ("val", "test")}
    off, on = out["no mixup"]["val"], out["mixup alpha 1"]["val"]
    out["keep_mixup"] = on["mean"] - off["mean"] > on["std"] + off["std"]
    return out


def _arm(arm: dict[str, Any]) -> str:
    return " / ".join(f"{arm[split]['mean']:.3f} ± {arm[split]['std']:.3f}" for split in ("val", "test") if split in arm)


def table_md(saved: dict[str, Any]) -> str:
    """The Markdown table of ``docs/results/mixup.json``: every recipe's two arms (mean ± std over the seeds) and
    the decision, one row per recipe, with the command and epochs each was run with."""
    lines = ["| recipe | command | no mixup val / test (mean ± std) | mixup alpha 1 val / test | val gain | kept |",
             "|---|---|---|---|---:|---|"]
    for name, res in saved.get("results", {}).items():
        if "skipped" in res:
            lines.append(f"| {name} | | skipped: {res['skipped']} | | | |")
            continue
        off, on = res["no mixup"], res["mixup alpha 1"]
        gain = on["val"]["mean"] - off["val"]["mean"]
        spread = on["val"]["std"] + off["val"]["std"]
        verdict = "yes" if res["keep_mixup"] else f"no ({gain:+.3f} is within the spread {spread:.3f})" if abs(gain) <= spread else \
            f"no ({gain:+.3f}: worse beyond the spread {spread:.3f})" if gain < 0 else "no"
        seeds = len(off["val"]["runs"])
        note = f"; {res['note'].rstrip('.')}" if res.get("note") else ""
        lines.append(f"| {name} ({seeds} seeds){note} | `{res.get('command', saved.get('command', ''))}` | {_arm(off)} | {_arm(on)} "
                     f"| {gain:+.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["uclip_pivot", "anchor_bind", "lit_contrastive", "sonar_speech"])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "emoji")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's max_epochs")
    ap.add_argument("--cache", nargs="*", default=[], help="NAME=DIR: a recipe's finished feature cache")
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "mixup.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: a loaded shared CPU stalls multi-threaded small matmuls
    all_setups = setups(args.data)
    for item in args.cache:
        name, _, path = item.partition("=")
        all_setups[name]["cache"] = Path(path)
    results: dict[str, Any] = {}
    for name in args.recipes:
        setup = all_setups[name]
        if not (Path(setup["cache"]) / "train" / "manifest.json").is_file():
            results[name] = {"skipped": f"no finished feature cache at {setup['cache']}"}
            print(f"{name}: skipped ({results[name]['skipped']})", flush=True)
            continue
        t0 = time.time()
        runs: dict[str, list[dict[str, float]]] = {"no mixup": [], "mixup alpha 1": []}
        try:
            for seed in args.seeds:
                for arm, alpha in (("no mixup", None), ("mixup alpha 1", args.alpha)):
                    runs[arm].append(fit_and_score(name, setup, alpha, seed, args.epochs))
                    print(f"{name} seed {seed} {arm}: {runs[arm][-1]}", flush=True)
        except Exception as e:  # a cache that does not match the recipe: reported, not fatal for the others
            results[name] = {"skipped": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name}: skipped ({results[name]['skipped']})", flush=True)
            continue
        results[name] = {**summarise(runs), "cache": str(setup["cache"]), "seconds": round(time.time() - t0),
                         "note": setup.get("note", ""), "epochs": args.epochs,
                         "command": "python -m benchmarks.studies.mixup " + " ".join(argv if argv is not None else sys.argv[1:])}
        print(f"{name}: keep mixup = {results[name]['keep_mixup']}", flush=True)
    meta = {"command": "python -m benchmarks.studies.mixup " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": args.seeds, "alpha": args.alpha, "metric": "val/R@1 and test/R@1 (mean over trained pairs and directions)"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.output.read_text()) if args.output.is_file() else {}
    old.setdefault("results", {}).update(results)
    args.output.write_text(json.dumps({**old, **meta, "results": old["results"]}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
