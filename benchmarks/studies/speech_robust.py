"""Speech that holds on real voices (issue 17.3): the SONAR student without vs with robustness data, beside the cascade.

Three ways to put a clip into the frozen USE-m text space, scored by speech -> text R@1:

* **cascade** (``encoders.cascade.WhisperCascadeEncoder``, no training): Whisper base transcribes the clip
  (greedy, the clip's language given as a hint; the window is the clip plus ``--pad-seconds`` of silence, not
  30 s, for cost), USE-m embeds the transcript.
* **student, clean**: the SONAR recipe's head (configs/offline/sonar_speech.yaml: BatchNorm MLP 1024, dropout
  0.5, InfoNCE with masked false negatives, fixed scale 30, AdamW 1e-3) on mean-pooled Whisper base encoder
  states (cropped windows, ``pad_to_30s=False``), trained on espeak-ng names of ``--train-concepts`` training
  concepts in en/de/es (the default voice, as ``data/emoji``).
* **student, robust**: the same plus ``mmalign.datasets.espeak.build_robust_speech`` clips of the same rows:
  ``--variants`` styled names and ``--sentences`` template sentences per row, each by a random espeak-ng voice
  variant, rate and pitch, then speed/pitch perturbation, reverberation and synthetic noise
  (``mmalign.data.augment``) before the encoder.

Test sets (never trained on): held-out espeak names of ``--test-concepts`` concepts of the test split (en/de/es,
default voice; gallery = those concepts' names in the same language) and the real recordings of
``mmalign.datasets.realspeech`` (Debian packages: Asterisk prompts, KTuberling words, ALSA speaker test; gallery =
the English transcripts of the set). Sampling error: the student's spread over ``--seeds`` and the binomial
standard error of each R@1 over its n queries.

Usage (repo root): ``nice -n 5 python -m benchmarks.studies.speech_robust --json docs/results/speech_robust.json``
(features and transcripts cached as ``.npy``/``.json`` under ``--cache``; the real set is fetched with
``apt-get download`` into ``--packages`` the first time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

LANGS = ("en", "de", "es")


def _key(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


def select(root: Path, split: str, n: int, seed: int) -> list[dict]:
    """en/de/es rows with audio of ``n`` concepts of ``split`` (drawn with ``seed`` among those with all three)."""
    by: dict[str, dict[str, dict]] = {}
    for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("lang") in LANGS and r.get("audio"):
            r["audio"] = str(root / r["audio"])
            by.setdefault(r["concept"], {})[r["lang"]] = r
    full = sorted(c for c, d in by.items() if len(d) == len(LANGS))
    pick = sorted(np.random.default_rng(seed).permutation(len(full))[:n])
    return [by[full[i]][lang] for i in pick for lang in LANGS]


def speech_features(rows: list[dict], cache: Path, threads: int) -> np.ndarray:
    """Mean-pooled Whisper base encoder states of each row's ``audio`` (cropped windows), cached per row list."""
    from encoders import WhisperSpeechEncoder

    enc = WhisperSpeechEncoder("packaged:whisper-base", pooling="mean", pad_to_30s=False, dtype="float32")
    out = cache / f"whisper_{_key(enc.cache_key, *[r['audio'] for r in rows])}.npy"
    if out.exists():
        return np.load(out)
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    order = np.argsort([Path(r["audio"]).stat().st_size for r in rows])  # similar lengths share a batch
    x = np.zeros((len(rows), enc.output_dim), np.float32)
    for i in tqdm(range(0, len(rows), 16), desc="whisper states", unit="batch"):
        idx = order[i:i + 16]
        x[idx] = enc(enc.preprocess([rows[k]["audio"] for k in idx])).pooled.float().numpy()
    np.save(out, x)
    return x


def text_features(texts: list[str], cache: Path) -> np.ndarray:
    from encoders import UniversalSentenceEncoderM

    if not texts:
        return np.zeros((0, 512), np.float32)
    out = cache / f"usem_{_key(*texts)}.npy"
    if out.exists():
        return np.load(out)
    enc = UniversalSentenceEncoderM(threads=2)
    y = np.concatenate([enc.encode(enc.preprocess(texts[i:i + 256])).pooled.float().numpy()
                        for i in range(0, len(texts), 256)])
    np.save(out, y)
    return y


def cascade(rows: list[dict], cache: Path, threads: int, pad_seconds: float) -> tuple[list[str], np.ndarray]:
    """Cascade-tower transcripts (language hint = the row's language) and their USE-m embeddings, cached."""
    from encoders.cascade import WhisperCascadeEncoder

    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"cascade_{_key('whisper-base', 'hint', pad_seconds, *[r['audio'] for r in rows])}.json"
    if out.exists():
        texts = json.loads(out.read_text())
    else:
        from tqdm.auto import tqdm

        torch.set_num_threads(threads)
        enc = WhisperCascadeEncoder("packaged:whisper-base", language=None, max_new_tokens=48, pad_seconds=pad_seconds)
        texts = [""] * len(rows)
        for i in tqdm(range(len(rows)), desc="cascade transcripts", unit="clip"):
            texts[i] = enc.transcribe([rows[i]["audio"]], language=rows[i]["lang"])[0]
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(texts, ensure_ascii=False))
        tmp.replace(out)
    return texts, text_features([t if t.strip() else "-" for t in texts], cache)


def train_head(x: torch.Tensor, y: torch.Tensor, concepts: list[str], seed: int, epochs: int, batch: int = 128):
    """The SONAR recipe's head and loss (configs/sonar_speech.yaml + offline overlay) on ``x -> y``."""
    from encoders.base import EncoderOutput
    from mmalign.training.losses import ClipLoss, group_ids
    from projectors import MLP

    torch.manual_seed(seed)
    head = MLP(x.shape[1], y.shape[1], hidden_dim=1024, num_blocks=0, dropout=0.5, norm="batch")
    clip = ClipLoss(gather=False, false_negatives="mask", logit_scale=30.0, learnable_scale=False)
    groups = group_ids(concepts)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if len(idx) < 2:
                continue
            loss = clip(head(EncoderOutput(pooled=x[idx])), y[idx], groups[idx])["clip_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return lambda t: head(EncoderOutput(pooled=t)).detach()


def r1(pred: np.ndarray, gallery: np.ndarray, truth: np.ndarray) -> float:
    """R@1 of queries ``pred [n, D]`` against ``gallery [m, D]``; ``truth[i]`` is query i's gallery index."""
    p = torch.nn.functional.normalize(torch.as_tensor(pred).float(), dim=-1)
    g = torch.nn.functional.normalize(torch.as_tensor(gallery).float(), dim=-1)
    return float(((p @ g.T).argmax(1).numpy() == truth).mean())


def test_groups(test_rows: list[dict], real_rows: list[dict]) -> dict[str, tuple[list[int], list[int], list[str]]]:
    """Per evaluation group: (query rows, gallery texts' index per query, gallery texts). Rows index the
    concatenation ``test_rows + real_rows``."""
    groups: dict[str, tuple[list[int], list[int], list[str]]] = {}
    for lang in LANGS:
        q = [i for i, r in enumerate(test_rows) if r["lang"] == lang]
        texts = [test_rows[i]["text"] for i in q]
        groups[f"espeak/{lang}"] = (q, list(range(len(q))), texts)
    off = len(test_rows)
    for key in sorted({(r["set"], r["lang"]) for r in real_rows}):
        q = [off + i for i, r in enumerate(real_rows) if (r["set"], r["lang"]) == key]
        texts = sorted({real_rows[i - off]["text"] for i in q})
        groups[f"{key[0]}/{key[1]}"] = (q, [texts.index(real_rows[i - off]["text"]) for i in q], texts)
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--robust-root", default="data/emoji_robust")
    ap.add_argument("--real-root", default="data/realspeech")
    ap.add_argument("--packages", default="data/realspeech_packages")
    ap.add_argument("--cache", default="outputs/speech_robust_cache")
    ap.add_argument("--train-concepts", type=int, default=150)
    ap.add_argument("--test-concepts", type=int, default=60)
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=1)
    ap.add_argument("--asterisk-per-language", type=int, default=24)
    ap.add_argument("--ktuberling-per-language", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pad-seconds", type=float, default=3.0, help="cascade window: clip + this much silence")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a busy machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root, cache = Path(args.data), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from mmalign.datasets.espeak import build_robust_speech
    from mmalign.datasets.realspeech import build_real_speech, fetch_packages

    train_rows = select(root, "train", args.train_concepts, seed=0)
    test_rows = select(root, "test", args.test_concepts, seed=0)
    held_out = {json.loads(line)["concept"] for s in ("val", "test") for line in (root / f"{s}.jsonl").open()}
    info = build_robust_speech(args.robust_root, train_rows, variants=args.variants, sentences=args.sentences,
                               seed=0, exclude_concepts=held_out)
    robust_rows = [json.loads(line) for line in (Path(args.robust_root) / "train.jsonl").open(encoding="utf-8")]
    for r in robust_rows:
        r["audio"] = str(Path(args.robust_root) / r["audio"])
    prefix = Path(args.packages) / "root"
    if not (prefix / "usr/share/asterisk").is_dir():
        prefix = fetch_packages(args.packages)
    real_info = build_real_speech(args.real_root, prefix=prefix, asterisk_per_language=args.asterisk_per_language,
                                  ktuberling_per_language=args.ktuberling_per_language)
    real_rows = [json.loads(line) for line in (Path(args.real_root) / "test.jsonl").open(encoding="utf-8")]
    for r in real_rows:
        r["audio"] = str(Path(args.real_root) / r["audio"])
    print(f"{len(train_rows)} clean + {len(robust_rows)} robust training clips, {len(test_rows)} held-out espeak, "
          f"{len(real_rows)} real ({real_info['seconds']:.0f} s)", flush=True)

    eval_rows = test_rows + real_rows
    x_train = speech_features(train_rows, cache, args.threads)
    x_robust = speech_features(robust_rows, cache, args.threads)
    x_eval = speech_features(eval_rows, cache, args.threads)
    y_train = text_features([r["text"] for r in train_rows], cache)
    y_robust = text_features([r["text"] for r in robust_rows], cache)
    groups = test_groups(test_rows, real_rows)
    gallery = {name: text_features(texts, cache) for name, (_, _, texts) in groups.items()}

    def score(pred: np.ndarray) -> dict[str, float]:
        return {name: r1(pred[q], gallery[name], np.asarray(t)) for name, (q, t, _) in groups.items()}

    results: dict = {"args": vars(args), "robust_info": {k: v for k, v in info.items() if k != "skipped"},
                     "real_info": real_info, "n": {name: len(q) for name, (q, _, _) in groups.items()},
                     "gallery": {name: len(texts) for name, (_, _, texts) in groups.items()}}
    variants = {"student_clean": (x_train, y_train, [r["concept"] for r in train_rows]),
                "student_robust": (np.concatenate([x_train, x_robust]), np.concatenate([y_train, y_robust]),
                                   [r["concept"] for r in train_rows] + [r["concept"] for r in robust_rows])}
    for label, (x, y, concepts) in variants.items():
        xt, yt = torch.as_tensor(x).float(), torch.as_tensor(y).float()
        runs = [score(train_head(xt, yt, concepts, s, args.epochs)(torch.as_tensor(x_eval).float()).numpy())
                for s in range(args.seeds)]
        results[label] = {name: float(np.mean([r[name] for r in runs])) for name in groups}
        results[label + "_std"] = {name: float(np.std([r[name] for r in runs])) for name in groups}
        print(label, {k: round(v, 3) for k, v in results[label].items()}, flush=True)
    transcripts, x_cascade = cascade(eval_rows, cache, args.threads, args.pad_seconds)
    results["cascade"] = score(x_cascade)
    results["cascade_exact"] = float(np.mean([t.lower().strip(" .!?¿¡") == r["text"].lower().strip(" .!?¿¡")
                                              for t, r in zip(transcripts, eval_rows)]))
    results["transcripts_examples"] = [[eval_rows[i]["text"], transcripts[i]] for i in range(0, len(eval_rows), 20)]
    summary = {}
    for label in ("cascade", "student_clean", "student_robust"):
        s = results[label]
        summary[label] = {
            "espeak": float(np.mean([s[f"espeak/{lang}"] for lang in LANGS])),
            "real": float(np.average([s[g] for g in groups if not g.startswith("espeak/")],
                                     weights=[len(groups[g][0]) for g in groups if not g.startswith("espeak/")])),
        }
    gap = summary["cascade"]["real"] - summary["student_clean"]["real"]
    summary["gap_closed_real"] = (summary["student_robust"]["real"] - summary["student_clean"]["real"]) / gap if gap else None
    results["summary"] = summary
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for g in results["n"]:  # binomial standard error of each R@1 (n queries)
        results.setdefault("binomial_se", {})[g] = {
            k: float(np.sqrt(results[k][g] * (1 - results[k][g]) / results["n"][g]))
            for k in ("cascade", "student_clean", "student_robust")}
    print(f"{'group':16s} {'n':>4s} {'gallery':>7s} {'cascade':>8s} {'clean':>13s} {'robust':>13s}")
    for name in groups:
        n = results["n"][name]
        print(f"{name:16s} {n:4d} {results['gallery'][name]:7d} {results['cascade'][name]:8.3f} "
              f"{results['student_clean'][name]:7.3f}±{results['student_clean_std'][name]:.3f} "
              f"{results['student_robust'][name]:7.3f}±{results['student_robust_std'][name]:.3f}")
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
