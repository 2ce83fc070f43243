"""Mixed precision (issue 8): speed and agreement of bf16 vs fp32, measured side by side in one run.

1. Frozen encoder forward (EfficientNet-Lite0, real packaged weights, emoji images): fp32 vs bf16
   autocast (``trainer.precision=bf16-mixed``) vs bf16 weights (encoder init arg ``dtype: bfloat16``).
   Figures: samples/s ratio to fp32 and the minimum cosine between bf16 and fp32 pooled features.
2. Projector training on cached-size features (1280-d image + 384-d text features, MLP + Linear
   projectors, CLIP loss, AdamW): steps/s ratio bf16 autocast / fp32 and the relative difference of the
   loss after the same steps from the same seed.

    python benchmarks/perf/bench_precision.py               # writes benchmarks/results/precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def encoder_part(items: int, batch_size: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import encoders
    from benchmarks.bench_encode import unique_rows

    paths = [r["image"] for r in unique_rows("image", items, ROOT / "data" / "emoji" / "train.jsonl")]
    fp32 = encoders.TimmImageEncoder("packaged:efficientnet-lite0")
    bf16 = encoders.TimmImageEncoder("packaged:efficientnet-lite0", dtype="bfloat16")
    batches = [fp32.preprocess(paths[i:i + batch_size]) for i in range(0, items, batch_size)]

    def run(encoder, autocast: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            return torch.cat([encoder(b).pooled.float() for b in batches])

    ref = run(fp32, False)
    out: dict[str, Any] = {"items": items, "batch_size": batch_size}
    t32 = _best_seconds(lambda: run(fp32, False), repeats)
    out["fp32_samples_per_s"] = items / t32
    for name, enc, auto in (("bf16_autocast", fp32, True), ("bf16_weights", bf16, False)):
        t = _best_seconds(lambda: run(enc, auto), repeats)
        cos = F.cosine_similarity(run(enc, auto), ref, dim=-1)
        out[name] = {"samples_per_s": items / t, "speed_ratio": t32 / t, "min_cosine": cos.min().item(),
                     "mean_cosine": cos.mean().item()}
    return out


def projector_part(steps: int, batch_size: int) -> dict[str, Any]:
    import torch

    import projectors
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower

    class Stub(torch.nn.Module):
        """Stands for a frozen encoder whose features come from the cache."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.output_dim = dim

    def make() -> AlignmentModule:
        torch.manual_seed(0)
        towers = {
            "image": Tower(Stub(1280), "image", projector=lambda i, o: projectors.MLP(i, o, num_blocks=2, dropout=0.0)),
            "text": Tower(Stub(384), "text", projector=projectors.Linear),
        }
        return AlignmentModule(towers, [Objective(ClipLoss(), ["image", "text"])], embed_dim=512)

    g = torch.Generator().manual_seed(0)
    concepts = torch.randn(64, 256, generator=g)
    mix_i, mix_t = torch.randn(256, 1280, generator=g), torch.randn(256, 384, generator=g)
    batches = []
    for _ in range(steps):
        c = concepts[torch.randint(0, 64, (batch_size,), generator=g)]
        batches.append({
            "meta": {"id": [str(i) for i in range(batch_size)]},
            "features": {"image": {"pooled": c @ mix_i + 0.1 * torch.randn(batch_size, 1280, generator=g)},
                         "text": {"pooled": c @ mix_t + 0.1 * torch.randn(batch_size, 384, generator=g)}},
        })

    def train(autocast: bool) -> tuple[float, float]:
        module = make()
        opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        start = time.perf_counter()
        for batch in batches:
            with ctx:
                losses = module.compute_losses(module(batch))
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start, loss.item()

    warm, batches = batches, batches[:3]
    train(False), train(True)  # warm-up on a few steps
    batches = warm
    t32, l32 = min(train(False) for _ in range(2))
    t16, l16 = min(train(True) for _ in range(2))
    return {"steps": steps, "batch_size": batch_size, "fp32_steps_per_s": steps / t32, "bf16_steps_per_s": steps / t16,
            "speed_ratio": t32 / t16, "fp32_final_loss": l32, "bf16_final_loss": l16, "loss_rel_diff": abs(l16 - l32) / l32}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--train_batch_size", type=int, default=128)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    a = p.parse_args(argv)
    enc = encoder_part(a.items, a.batch_size, a.repeats)
    for name in ("bf16_autocast", "bf16_weights"):
        r = enc[name]
        print(f"[precision] EfficientNet-Lite0 forward {name} / fp32: speed ratio {r['speed_ratio']:.2f} "
              f"({r['samples_per_s']:.1f} vs {enc['fp32_samples_per_s']:.1f} samples/s); "
              f"cosine to fp32 min {r['min_cosine']:.4f} mean {r['mean_cosine']:.4f}", flush=True)
    proj = projector_part(a.steps, a.train_batch_size)
    print(f"[precision] projector training bf16-mixed / fp32: speed ratio {proj['speed_ratio']:.2f} "
          f"({proj['bf16_steps_per_s']:.1f} vs {proj['fp32_steps_per_s']:.1f} steps/s); final loss "
          f"{proj['bf16_final_loss']:.4f} vs {proj['fp32_final_loss']:.4f} (rel diff {proj['loss_rel_diff']:.4f})", flush=True)
    results = {"encoder": enc, "projector": proj}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
