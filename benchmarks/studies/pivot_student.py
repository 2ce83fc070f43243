"""Is another multilingual student a better pivot than USE-m out of domain? (issue 17.1)

The recipe's fraction of the ceiling is a property of the student -> teacher pair as much as of the head. This study
swaps the student encoder for multilingual-e5-small (``encoders.MultilingualE5Small``, the other ~100-language text
encoder the offline packages give) and trains the same head the same way on the same corpus prefix, against the same
frozen all-MiniLM-L6-v2 teacher: the ridge map and the chosen corpus recipe (``pivot_corpus``'s cosine LR decay +
bank of 4,096 teacher negatives), each scored as a fraction of ITS student's own ceiling
(``student(L) -> student(en)``, no projector). Features are cached in the pivot study's cache (mE5 is ~17 s per
1,024 texts here, so ``--max_corpus`` keeps the encode to minutes).

Usage (repo root, after ``python -m benchmarks.studies.pivot_corpus encode``):
``python -m benchmarks.studies.pivot_student --max_corpus 20480 --steps 600 --output docs/results/pivot_student.json``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.studies import pivot_corpus as pc
from benchmarks.studies.pivot_features import encode_chunked

CHOSEN = {"schedule": "cosine", "bank": 4096}


def fractions(scores: dict[str, dict[str, float]], sets: dict[str, pc.EvalSet]) -> dict[str, dict[str, float]]:
    """Mean R@1, mean ceiling and mean per-language fraction of the ceiling of each set."""
    out = {}
    for name, s in sets.items():
        ceiling, r = s.ceiling(), scores[name]
        langs = [lang for lang in s.langs if ceiling.get(lang, 0) > 0]
        out[name] = {"R@1": pc.mean({lang: r[lang] for lang in langs}), "ceiling": pc.mean({lang: ceiling[lang] for lang in langs}),
                     "fraction": sum(r[lang] / ceiling[lang] for lang in langs) / len(langs), "en": r.get("en")}
    return out


def student_sets(enc, sets: dict[str, pc.EvalSet], cache: Path) -> dict[str, pc.EvalSet]:
    """The held-out sets with ``enc``'s features on the student side (the teacher's are unchanged)."""
    out = {}
    for name, s in sets.items():
        feats = encode_chunked(enc, [r["text"] for r in s.rows], pc.feature_dir(cache, name, "student", enc), log=f"{name}/student")
        out[name] = pc.EvalSet(name, {"rows": s.rows, "concepts": s.concepts}, torch.from_numpy(feats), s.teacher)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max_corpus", type=int, default=20480)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--output", type=Path, default=pc.ROOT / "docs" / "results" / "pivot_student.json")
    args = ap.parse_args(argv)
    from encoders import MultilingualE5Small

    torch.set_num_threads(2)
    t0 = time.time()
    src = pc.default_sources()
    src.max_corpus = args.max_corpus
    enc = pc.encoders()
    sets, train, _ = pc.load_features(src, enc)
    n = len(train["student"])
    if n < args.max_corpus:
        sys.exit(f"only {n} corpus texts have USE-m and MiniLM features; run `pivot_corpus encode` first")
    corpus = [line.rstrip("\n") for line in open(src.corpus / "train.txt", encoding="utf-8")]
    e5 = MultilingualE5Small(mode="query", num_threads=2)
    x_e5 = torch.from_numpy(encode_chunked(e5, corpus, pc.feature_dir(src.cache, "corpus", "student", e5), limit=n, log="corpus/e5"))
    students = {"USE-m": (train["student"].float(), sets, None), "multilingual-e5-small": (x_e5.float(), student_sets(e5, sets, src.cache), 384)}
    x_t = train["teacher"].float()
    out: dict = {"corpus_texts": n, "steps": args.steps, "seeds": args.seeds, "variant": CHOSEN, "students": {}}
    for label, (x_s, ss, in_dim) in students.items():
        ridge, lam = pc.ridge_scores(x_s, x_t, ss)
        row = {"ridge": fractions(ridge, ss), "ridge_lambda": lam, "recipe": []}
        for seed in args.seeds:
            model = pc.fit_features({**CHOSEN, "in_dim": in_dim}, x_s, x_t, args.steps, seed)
            row["recipe"].append(fractions(pc.score_model(model, ss), ss))
        out["students"][label] = row
        for name in ss:
            rec = [r[name] for r in row["recipe"]]
            print(f"{label:22s} {name:12s} ceiling {row['ridge'][name]['ceiling']:.3f}  ridge {row['ridge'][name]['fraction']:.3f}"
                  f"  recipe R@1 {pc.mean({str(i): r['R@1'] for i, r in enumerate(rec)}):.3f}"
                  f" fraction {pc.mean({str(i): r['fraction'] for i, r in enumerate(rec)}):.3f}", flush=True)
        pc.write_result(args.output, out, t0)


if __name__ == "__main__":
    main()
