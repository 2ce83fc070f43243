"""Does hubness reduction at retrieval time close the corpus pivot's out-of-domain gap? (issue 17.1)

Trains the chosen corpus recipe (``benchmarks.studies.pivot_corpus``: cosine LR decay + a bank of 4,096 teacher
negatives) once and scores every held-out set with plain cosine and with CSLS (cross-domain similarity local
scaling, Conneau et al. 2018: ``2 cos(q, g) - r_gallery(q) - r_queries(g)``, ``r`` the mean cosine to the ``k``
nearest neighbours), for the recipe AND for the ceiling (the frozen student's own ``student(L) -> student(en)``
retrieval, scored the same way), so the fraction of the ceiling compares like with like. ``r_queries(g)`` is taken
over the set's own queries of that language (transductive, as in MUSE) and, in the ``ref`` column, over 20,000
projected corpus texts instead (no test queries needed: what a deployed gallery search could use). The ``centred``
columns subtract each side's mean over 20,000 corpus texts first (the modality gap, as ``Tower(center=True)``), the
ceiling's both sides by the frozen student's corpus mean.

Usage (repo root, after ``python -m benchmarks.studies.pivot_corpus encode``):
``python -m benchmarks.studies.pivot_hubness --steps 600 --output docs/results/pivot_hubness.json``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.studies import pivot_corpus as pc


def r1(q: torch.Tensor, g: torch.Tensor, q_labels: list, g_labels: list, k: int = 0,
       ref: torch.Tensor | None = None) -> float:
    """R@1 of ``q`` retrieving the ``g`` row with its label: cosine, or CSLS with ``k`` neighbours."""
    q, g = F.normalize(q.float(), dim=-1), F.normalize(g.float(), dim=-1)
    sim = q @ g.T
    if k:
        r_q = sim.topk(min(k, sim.shape[1]), dim=1).values.mean(1, keepdim=True)
        src = q if ref is None else F.normalize(ref.float(), dim=-1)
        r_g = (src @ g.T).topk(min(k, src.shape[0]), dim=0).values.mean(0, keepdim=True)
        sim = 2 * sim - r_q - r_g
    pos = {c: i for i, c in enumerate(g_labels)}
    return sum(int(sim[i].argmax()) == pos[c] for i, c in enumerate(q_labels)) / len(q_labels)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=pc.ROOT / "docs" / "results" / "pivot_hubness.json")
    a = ap.parse_args(argv)
    args = pc.default_sources()
    torch.set_num_threads(1)
    sets, train, _ = pc.load_features(args, pc.encoders())
    t0 = time.time()
    best = {"schedule": "cosine", "bank": 4096}
    model = pc.fit_features(best, train["student"], train["teacher"], a.steps, a.seed)
    sample = torch.randperm(len(train["student"]), generator=torch.Generator().manual_seed(0))[:20000]
    ref = pc.project(model, "student", train["student"][sample])
    # the modality gap (what ``Tower(center=True)`` removes in the product): each side's mean over the same 20,000
    # corpus texts, the projected student's, the teacher tower's, and the frozen student's own for the ceiling
    mean_s, mean_t = ref.float().mean(0), pc.project(model, "teacher", train["teacher"][sample]).float().mean(0)
    mean_raw = train["student"][sample].float().mean(0)
    out: dict = {"command": "python -m benchmarks.studies.pivot_hubness " + " ".join(sys.argv[1:]),
                 "corpus_rows": len(train["student"]), "variant": best, "steps": a.steps, "k": a.k, "seed": a.seed,
                 "sets": {}}
    for name, s in sets.items():
        ps, pt = pc.project(model, "student", s.student), pc.project(model, "teacher", s.teacher)
        en: dict = {}
        for i, r in enumerate(s.rows):
            if r["lang"] == "en":
                en.setdefault(r["concept"], i)
        g_labels = [c for c in s.concepts if c in en]
        g_idx = [en[c] for c in g_labels]
        rows = {}
        for lang in s.langs:
            idx = [i for i, r in enumerate(s.rows) if r["lang"] == lang]
            labels = [s.rows[i]["concept"] for i in idx]
            qi = [i for i in idx if s.rows[i]["concept"] in en]
            rows[lang] = {
                "recipe": r1(ps[idx], pt, labels, s.concepts),
                "recipe_csls": r1(ps[idx], pt, labels, s.concepts, k=a.k),
                "recipe_csls_ref": r1(ps[idx], pt, labels, s.concepts, k=a.k, ref=ref),
                "ceiling": r1(s.student[qi], s.student[g_idx], [s.rows[i]["concept"] for i in qi], g_labels),
                "ceiling_csls": r1(s.student[qi], s.student[g_idx], [s.rows[i]["concept"] for i in qi], g_labels, k=a.k),
                "recipe_centred": r1(ps[idx].float() - mean_s, pt.float() - mean_t, labels, s.concepts),
                "ceiling_centred": r1(s.student[qi].float() - mean_raw, s.student[g_idx].float() - mean_raw,
                                      [s.rows[i]["concept"] for i in qi], g_labels),
            }
        mean = {key: sum(v[key] for v in rows.values()) / len(rows) for key in next(iter(rows.values()))}
        frac = {"plain": sum(v["recipe"] / v["ceiling"] for v in rows.values()) / len(rows),
                "csls": sum(v["recipe_csls"] / v["ceiling_csls"] for v in rows.values()) / len(rows),
                "csls_ref": sum(v["recipe_csls_ref"] / v["ceiling_csls"] for v in rows.values()) / len(rows),
                "centred": sum(v["recipe_centred"] / v["ceiling_centred"] for v in rows.values()) / len(rows),
                "centred_over_plain_ceiling": sum(v["recipe_centred"] / v["ceiling"] for v in rows.values()) / len(rows)}
        out["sets"][name] = {"per_language": rows, "mean": mean, "fraction_of_ceiling": frac}
        print(f"{name}: " + " ".join(f"{k} {v:.3f}" for k, v in mean.items())
              + " | fraction " + " ".join(f"{k} {v:.2f}" for k, v in frac.items()), flush=True)
    pc.write_result(a.output, out, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
