"""Choose the fused speech tower's objective weights on VAL (issue 15): one trimodal fit per variant, val figures.

    python -m benchmarks.studies.trimodal_select --output runs/trimodal_select --cache_dir runs/cache_fused

Variants, each one overlay composed after ``configs/offline/anchor_bind_fused.yaml``:

- ``infonce``: the fused overlay alone (speech <-> anchor by InfoNCE);
- ``teacher-w<W>``: ``configs/offline/anchor_bind_fused_teacher.yaml`` (cosine distance to the anchor, weight 1) with
  its InfoNCE term at weight ``W`` (``--weights``; 0 drops it);
- ``image-cos<W>``: the shipped teacher overlay plus a cosine-distance term image -> anchor at weight ``W``
  (``--image_cosine``): the image tower pulled onto the anchor's absolute positions as well.

``--after_fused`` overlays go between the fused overlay and the variant's in every variant (e.g.
``configs/offline/anchor_bind_fused_nbest.yaml``, with ``--cache_dir`` pointing at that decoding's cache).

Each variant is one fit of :mod:`benchmarks.studies.trimodal` (seed ``--seed``, the study's full data, the feature
cache shared through ``--cache_dir``). The table reads the VALIDATION scalars logged at each fit's chosen checkpoint
(maximum ``val/R@1``, the trained pairs' mean): that monitor, ``val/emergent/R@1`` (speech<->image, both directions,
7 languages, 138-way) and the per-direction means. Test figures are not read: choose here, then run the trimodal
study with 3 seeds on the chosen overlay. Writes ``<output>/select.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

FUSED = "configs/offline/anchor_bind_fused.yaml"
TEACHER = "configs/offline/anchor_bind_fused_teacher.yaml"


def teacher_overlay(infonce_weight: float | None = None, image_cosine: float | None = None) -> dict[str, Any]:
    """The shipped teacher overlay with its speech InfoNCE weight replaced (0: dropped) and/or an image cosine term."""
    overlay = yaml.safe_load(Path(TEACHER).read_text(encoding="utf-8"))
    objectives = overlay["model"]["init_args"]["objectives"]
    speech_clip = [o for o in objectives if o["init_args"]["towers"] == ["speech", "text"]
                   and o["init_args"]["loss"]["class_path"].endswith("ClipLoss")]
    assert len(speech_clip) == 1, "the teacher overlay has one speech InfoNCE objective"
    if infonce_weight is not None:
        if infonce_weight == 0:
            objectives.remove(speech_clip[0])
        else:
            speech_clip[0]["init_args"]["weight"] = float(infonce_weight)
    if image_cosine:
        objectives.insert(1, {"class_path": "mmalign.Objective", "init_args": {
            "towers": ["image", "text"], "weight": float(image_cosine), "loss": {"class_path": "mmalign.CosineLoss"}}})
    return overlay


def val_at_best(run_dir: Path) -> dict[str, float]:
    """Validation scalars of the last fit under ``run_dir`` at its best ``val/R@1`` (TensorBoard event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(run_dir.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no lightning_logs/version_* under {run_dir}")
    acc = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    series = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t.startswith("val/")}
    monitor = series["val/R@1"]
    step = max(monitor, key=monitor.get)
    keep = ["val/R@1", "val/emergent/R@1"] + sorted(t for t in series if t.startswith("val/mean/") and t.endswith("/R@1"))
    return {"step": step, **{k: series[k][step] for k in keep if step in series.get(k, {})}}


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    out_dir = Path(args.output) / "overlays"
    out_dir.mkdir(parents=True, exist_ok=True)
    fused = [FUSED, *args.after_fused]  # e.g. the n-best decoding overlay
    chosen: dict[str, list[str]] = {"infonce": fused}
    for name, overlay in [(f"teacher-w{w:g}", teacher_overlay(infonce_weight=w)) for w in args.weights] + \
                         [(f"image-cos{w:g}", teacher_overlay(image_cosine=w)) for w in args.image_cosine]:
        path = out_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
        chosen[name] = [*fused, str(path)]
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.studies import trimodal

    results = {}
    for name, overlays in variants(args).items():
        out = Path(args.output) / name
        study = ["--data", args.data, "--output", str(out), "--cache_dir", args.cache_dir, "--train_concepts", "100000",
                 "--speech_concepts", "100000", "--val_concepts", "138", "--test_concepts", "275", "--seeds", str(args.seed),
                 "--doc", str(out / "trimodal.md"), "--overlay", *overlays]
        trimodal.main(study)
        results[name] = {"overlays": overlays, **val_at_best(out / f"seed{args.seed}")}
    command = (f"python -m benchmarks.studies.trimodal_select --output {args.output} --cache_dir {args.cache_dir} --seed {args.seed}"
               f" --weights {' '.join(f'{w:g}' for w in args.weights)} --image_cosine {' '.join(f'{w:g}' for w in args.image_cosine)}"
               + (f" --after_fused {' '.join(args.after_fused)}" if args.after_fused else ""))
    record = {"command": command, "seed": args.seed, "variants": results}
    Path(args.output, "select.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(markdown(record))
    return record


def markdown(record: dict[str, Any]) -> str:
    cols = ["val/R@1", "val/emergent/R@1", "val/mean/speech->image/R@1", "val/mean/speech->text/R@1",
            "val/mean/text->image/R@1"]
    lines = [f"    {record['command']}", "", "| variant | " + " | ".join(c[4:] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, r in record["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--output", default="runs/trimodal_select")
    p.add_argument("--cache_dir", default="runs/cache_fused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.1, 0.3, 1.0],
                   help="speech InfoNCE weights beside the cosine teacher term")
    p.add_argument("--image_cosine", type=float, nargs="*", default=[0.3, 1.0],
                   help="image -> anchor cosine weights added to the shipped teacher overlay")
    p.add_argument("--after_fused", nargs="+", action="extend", default=[],
                   help="overlays composed right after the fused one in every variant (configs/offline/anchor_bind_fused_nbest.yaml)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
