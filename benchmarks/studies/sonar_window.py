"""Does Whisper's 30 s window explain the SONAR gap? (issue 9) Controlled comparison on one small subset.

The first ``--concepts`` concepts of ``data/emoji`` (train, val, test files in order) that have speech in
en, de and es are split by concept (seeded) into train / test. Whisper base (``packaged:whisper-base``)
features are mean-pooled over real frames twice: ``pad_to_30s=True`` (the standard 30 s window) and
``pad_to_30s=False`` (cropped input). Each feature set trains the same head against the frozen USE-m
embedding of the spoken text: ``projectors.MLP(512, 512, hidden_dim=1024, num_blocks=0, norm="batch")``
with ``ClipLoss + 10 x MSELoss`` (the SONAR recipe's head and losses, plain torch loop), and a
closed-form ridge map from centred features. Test R@1 per language, speech -> text of the held-out
concepts in the same language (N-way), by :func:`mmalign.evaluation.retrieval_metrics`.

Usage (repo root): ``python -m benchmarks.studies.sonar_window`` (features cached as ``.npy`` under ``--cache``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

LANGS = ("en", "de", "es")


def select_rows(root: Path, n_concepts: int) -> list[dict]:
    """Rows (en/de/es, with audio) of the first ``n_concepts`` concepts that have all three."""
    rows = [json.loads(line) for split in ("train", "val", "test") for line in open(root / f"{split}.jsonl")]
    by_concept: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["lang"] in LANGS and r.get("audio"):
            by_concept.setdefault(r["concept"], {})[r["lang"]] = r
    chosen = [c for c, d in by_concept.items() if len(d) == len(LANGS)][:n_concepts]
    if len(chosen) < n_concepts:
        raise ValueError(f"only {len(chosen)} concepts have audio in {LANGS}, asked for {n_concepts}")
    return [by_concept[c][lang] for c in chosen for lang in LANGS]


def subset_parser(description: str) -> argparse.ArgumentParser:
    """Arguments shared by the studies on this subset (data, subset size, seeds, threads, cache, json)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--concepts", type=int, default=200)
    ap.add_argument("--test-concepts", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/sonar_window")
    ap.add_argument("--json", default=None, help="write results here")
    return ap


def subset_setup(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path, Path, list[dict], np.ndarray]:
    """Parse ``ap``, set torch threads, create the cache folder; ``(args, root, cache, rows, is_test)``."""
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root, cache = Path(args.data), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows, te = subset_split(root, args.concepts, args.test_concepts)
    return args, root, cache, rows, te


def subset_split(root: Path, n_concepts: int, n_test: int) -> tuple[list[dict], np.ndarray]:
    """:func:`select_rows` and a seeded concept split: ``(rows, is_test [N] bool)``."""
    rows = select_rows(root, n_concepts)
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    perm = np.random.default_rng(0).permutation(len(concepts))
    test_c = {concepts[k] for k in perm[:n_test]}
    te = np.array([r["concept"] in test_c for r in rows])
    print(f"{len(rows)} clips, {len(concepts) - len(test_c)} train / {len(test_c)} test concepts", flush=True)
    return rows, te


def encode_speech(rows: list[dict], root: Path, pad: bool, out: Path, batch: int) -> tuple[np.ndarray, float]:
    """Mean-pooled Whisper base features ``[N, 512]`` (cached at ``out``) and the seconds spent."""
    if out.exists():
        return np.load(out), 0.0
    from encoders import WhisperSpeechEncoder

    enc = WhisperSpeechEncoder("packaged:whisper-base", pooling="mean", pad_to_30s=pad)
    paths = [str(root / r["audio"]) for r in rows]
    feats, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            feats.append(enc.encode(enc.preprocess(paths[i : i + batch])).pooled.float().numpy())
            if (i // batch) % 10 == 0:
                print(f"  pad_to_30s={pad}: {i + batch}/{len(paths)} clips, {time.perf_counter() - t0:.0f} s", flush=True)
    x = np.concatenate(feats)
    np.save(out, x)
    return x, time.perf_counter() - t0


def encode_text(rows: list[dict], out: Path) -> np.ndarray:
    """USE-m embeddings ``[N, 512]`` of each row's ``text`` (cached at ``out``)."""
    if out.exists():
        return np.load(out)
    from encoders import UniversalSentenceEncoderM

    enc = UniversalSentenceEncoderM(threads=2)
    with torch.inference_mode():
        y = enc.encode(enc.preprocess([r["text"] for r in rows])).pooled.float().numpy()
    np.save(out, y)
    return y


def train_mlp(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, batch: int = 128, plain: bool = False):
    """Train a head on ``x [N, 512] -> y [N, 512]``; returns ``f(x) -> embeddings``.

    ``plain=False``: the SONAR recipe's head (input BatchNorm, dropout 0.2), InfoNCE + 10 x MSE.
    ``plain=True``: issue 9's reference head: plain ``Linear-GELU-Linear`` (no norm, dropout 0.1) on
    features centred with the training mean, MSE only. AdamW 1e-3 for both.
    """
    from encoders.base import EncoderOutput
    from mmalign.training.losses import ClipLoss, MSELoss
    from projectors import MLP

    torch.manual_seed(seed)
    mu = x.mean(0) if plain else torch.zeros(x.shape[1])
    x = x - mu
    if plain:
        head = MLP(512, y.shape[1], hidden_dim=1024, num_blocks=0, dropout=0.1, norm="none", input_norm=False)
    else:
        head = MLP(512, y.shape[1], hidden_dim=1024, num_blocks=0, dropout=0.2, norm="batch")
    clip, mse = ClipLoss(gather=False), MSELoss()
    opt = torch.optim.AdamW([*head.parameters(), *clip.parameters()], lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch]
        z = head(EncoderOutput(pooled=x[idx]))
        loss = 10.0 * mse(z, y[idx])["mse_loss"]
        if not plain:
            loss = loss + clip(z, y[idx])["clip_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    wrapped = lambda t: head(EncoderOutput(pooled=t - mu))  # noqa: E731
    return wrapped


def ridge(x_tr: np.ndarray, y_tr: np.ndarray, groups: np.ndarray, lams=(0.1, 1, 10, 100, 1000)):
    """Closed-form ridge on standardised features; lambda picked on 20% of the TRAIN concepts."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6

    def fit(xa, ya, lam):
        xs = (xa - mu) / sd
        w = np.linalg.solve(xs.T @ xs + lam * np.eye(xs.shape[1]), xs.T @ (ya - ya.mean(0)))
        return lambda q: ((q - mu) / sd) @ w + ya.mean(0)

    uniq = np.unique(groups)
    rng = np.random.default_rng(0)
    val_c = set(rng.choice(uniq, size=len(uniq) // 5, replace=False))
    is_val = np.array([g in val_c for g in groups])
    best = max(lams, key=lambda lam: _r1(fit(x_tr[~is_val], y_tr[~is_val], lam)(x_tr[is_val]), y_tr[is_val]))
    return fit(x_tr, y_tr, best), best


def _r1(pred: np.ndarray, y: np.ndarray) -> float:
    """Paired R@1 (row i's positive is row i) for lambda selection."""
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = y / np.linalg.norm(y, axis=1, keepdims=True)
    return float(((p @ t.T).argmax(1) == np.arange(len(p))).mean())


def per_lang_r1(pred: np.ndarray, y: np.ndarray, rows: list[dict]) -> dict[str, float]:
    """Speech -> text R@1 per language; gallery = the test concepts' texts in that language."""
    from mmalign.evaluation import retrieval_metrics

    out = {}
    for lang in LANGS:
        i = [k for k, r in enumerate(rows) if r["lang"] == lang]
        labels = [rows[k]["concept"] for k in i]
        m = retrieval_metrics(torch.as_tensor(pred[i]).float(), torch.as_tensor(y[i]).float(), labels, labels)
        out[lang] = m["R@1"]
    return out


def main() -> None:
    ap = subset_parser(__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="clips per Whisper batch")
    args, root, cache, rows, te = subset_setup(ap)
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    test_c = {r["concept"] for r, t in zip(rows, te) if t}

    tag = f"{args.concepts}c"
    y = encode_text(rows, cache / f"use_m_{tag}.npy")
    results: dict = {"clips": len(rows), "train_concepts": len(concepts) - len(test_c), "test_concepts": len(test_c)}
    feats = {}
    for pad in (True, False):
        x, secs = encode_speech(rows, root, pad, cache / f"whisper_base_pad{int(pad)}_{tag}.npy", args.batch)
        feats[pad] = x
        results[f"encode_s_pad{int(pad)}"] = round(secs, 1)
    a, b = feats[True], feats[False]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    results["cos_pad_vs_crop"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    print(f"cosine(30 s window, cropped) per clip: mean {cos.mean():.4f}, min {cos.min():.4f}")

    groups = np.array([r["concept"] for r in rows])
    rows_te = [r for r, t in zip(rows, te) if t]
    for pad, x in feats.items():
        name = "pad_to_30s=True" if pad else "pad_to_30s=False"
        x_tr, x_te = torch.as_tensor(x[~te]).float(), torch.as_tensor(x[te]).float()
        y_tr = torch.as_tensor(y[~te]).float()
        t0 = time.perf_counter()
        res: dict = {}
        for head_name, plain in (("mlp", False), ("plain_mse", True)):
            runs = []
            for seed in range(args.seeds):
                head = train_mlp(x_tr, y_tr, args.steps, seed, plain=plain)
                with torch.no_grad():
                    runs.append(per_lang_r1(head(x_te).numpy(), y[te], rows_te))
            res[head_name] = {lang: float(np.mean([r[lang] for r in runs])) for lang in LANGS}
            res[head_name + "_sd"] = {lang: float(np.std([r[lang] for r in runs])) for lang in LANGS}
        fit, lam = ridge(x[~te], y[~te], groups[~te])
        res["ridge"], res["ridge_lambda"] = per_lang_r1(fit(x[te]), y[te], rows_te), lam
        res["train_s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        for key in ("mlp", "plain_mse", "ridge"):
            sd = res.get(key + "_sd", {})
            print(f"{name} {key}: R@1 " + " ".join(f"{k} {v:.3f}" + (f"±{sd[k]:.3f}" if sd else "")
                                                  for k, v in res[key].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
