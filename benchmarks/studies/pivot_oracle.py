"""An in-domain oracle for the corpus pivot (issue 17.1): how much of the ceiling does the recipe keep out of domain
when it HAS seen the domain?

For each held-out CLDR domain the concepts are split in two halves (seed 0). The chosen corpus recipe
(``benchmarks.studies.pivot_corpus``: cosine LR decay + a bank of 4,096 teacher negatives) is trained on (a) the
corpus only, (b) the corpus + the first half's English names (student(en) -> teacher(en), as the corpus rows; 50
copies so 600 steps see them), (c) the corpus + the first half's names in every language -> the teacher's English
name (10 copies). All three are scored on the SECOND half only (gallery = its concepts), beside the frozen student's
own ceiling on that half. If (b) and (c) stay far below 0.85 of the ceiling, the goal is out of reach of this encoder
pair with this head, whatever the training texts. (d) bounds every linear map: a ridge map fit on the SCORED half's own
English names (transductive: train = test, lambda the best of a grid on that same score), so English -> English is
~1 and what is left is how much of the student's cross-lingual retrieval any linear map onto the teacher keeps.

Usage (repo root, after ``python -m benchmarks.studies.pivot_corpus encode``):
``python -m benchmarks.studies.pivot_oracle --output docs/results/pivot_oracle.json``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.studies import pivot_corpus as pc

TRANSDUCTIVE = "oracle: ridge map fit on the scored half's own English names"
LAMBDAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0)


class Ridge:
    """A closed-form ridge map student -> teacher (centred, ``lam`` per row); the teacher side stays as it is."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, lam: float) -> None:
        self.mx, self.my = x.mean(0), y.mean(0)
        xc = x - self.mx
        self.w = torch.linalg.solve(xc.T @ xc + lam * len(x) * torch.eye(x.shape[1]), xc.T @ (y - self.my))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mx) @ self.w + self.my


def main(argv=None) -> None:
    from mmalign.evaluation.baselines import r1, student_ceiling

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=pc.ROOT / "docs" / "results" / "pivot_oracle.json")
    a = ap.parse_args(argv)
    args = pc.default_sources()
    torch.set_num_threads(1)
    t0 = time.time()
    sets, train, _ = pc.load_features(args, pc.encoders())
    best = {"schedule": "cosine", "bank": 4096}
    base = pc.fit_features(best, train["student"], train["teacher"], a.steps, a.seed)
    out: dict = {"command": "python -m benchmarks.studies.pivot_oracle " + " ".join(sys.argv[1:]),
                 "corpus_rows": len(train["student"]), "variant": best, "steps": a.steps, "seed": a.seed, "sets": {}}
    for name in pc.DOMAINS:
        s = sets[name]
        perm = torch.randperm(len(s.concepts), generator=torch.Generator().manual_seed(0)).tolist()
        half = {s.concepts[i] for i in perm[: len(perm) // 2]}
        cidx = {c: i for i, c in enumerate(s.concepts)}
        test_c = [c for c in s.concepts if c not in half]
        gallery = s.teacher[[cidx[c] for c in test_c]]

        def score(model) -> dict[str, float]:
            if isinstance(model, Ridge):
                ps, pg = model(s.student), gallery
            else:
                ps, pg = pc.project(model, "student", s.student), pc.project(model, "teacher", gallery)
            res = {}
            for lang in s.langs:
                q = [i for i, r in enumerate(s.rows) if r["lang"] == lang and r["concept"] not in half]
                res[lang] = r1(ps[q], pg, [s.rows[i]["concept"] for i in q], test_c)
            return res

        rows = [i for i, r in enumerate(s.rows) if r["concept"] not in half]
        ceiling = {lang: m["R@1"] for lang, m in student_ceiling(
            s.student[rows], [s.rows[i]["lang"] for i in rows], [s.rows[i]["concept"] for i in rows], pivot="en",
            keys=[s.rows[i]["text"] for i in rows], languages=s.langs).items()}
        results = {"corpus only": score(base)}
        for label, langs, copies in (("corpus + half the domain, English names x50", ("en",), 50),
                                     ("corpus + half the domain, every language x10", tuple(s.langs), 10)):
            idx = [i for i, r in enumerate(s.rows) if r["concept"] in half and r["lang"] in langs]
            xs = torch.cat([train["student"]] + [s.student[idx]] * copies)
            xt = torch.cat([train["teacher"]] + [s.teacher[[cidx[s.rows[i]["concept"]] for i in idx]]] * copies)
            results[label] = score(pc.fit_features(best, xs, xt, a.steps, a.seed))
        en = [i for i, r in enumerate(s.rows) if r["lang"] == "en" and r["concept"] not in half]
        fits = {lam: score(Ridge(s.student[en], s.teacher[[cidx[s.rows[i]["concept"]] for i in en]], lam))
                for lam in LAMBDAS}
        lam = max(fits, key=lambda k: sum(fits[k][lang] / ceiling[lang] for lang in fits[k]))
        results[f"{TRANSDUCTIVE} (lambda={lam:g})"] = fits[lam]
        summary = {label: {"mean": sum(r.values()) / len(r), "en": r["en"],
                           "fraction_of_ceiling": sum(r[lang] / ceiling[lang] for lang in r) / len(r),
                           "min_fraction": min(r[lang] / ceiling[lang] for lang in r)}
                   for label, r in results.items()}
        out["sets"][name] = {"test_concepts": len(test_c), "ceiling": ceiling, "per_language": results, "summary": summary}
        for label, m in summary.items():
            print(f"{name} | {label}: mean R@1 {m['mean']:.3f}, en {m['en']:.3f}, fraction of the ceiling "
                  f"{m['fraction_of_ceiling']:.2f} (lowest language {m['min_fraction']:.2f})", flush=True)
    pc.write_result(a.output, out, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
