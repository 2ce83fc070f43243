"""The quickstart's printed tables: one row per language (its queries against its own gallery) and the unweighted
mean over the languages, labelled; no pooled ``all`` row (not comparable with the language rows)."""

from __future__ import annotations

import torch

from mmalign.cli.quickstart import trimodal_tables


def _m(r1: float, n: int = 4) -> dict[str, float]:
    return {"R@1": r1, "R@5": min(1.0, 2 * r1), "MRR": r1, "num_queries": n}


def test_tables_print_language_rows_and_their_mean():
    langs, concepts = ["en"] * 4 + ["fr"] * 4, [0, 1, 2, 3] * 2
    collected = {"embeds": {t: torch.zeros(8, 2) for t in ("image", "speech", "text")},
                 "meta": {"lang": langs, "concept": concepts}, "keys": {}, "present": {}}
    results = {pair: {"en": {d: _m(0.5) for d in dirs}, "fr": {d: _m(0.25) for d in dirs}, "all": {d: _m(0.9, 8) for d in dirs}}
               for pair, dirs in (("image|text", ("text->image", "image->text")),
                                  ("image|speech", ("speech->image", "image->speech")))}
    out = trimodal_tables(results, {"image|text": "trained", "image|speech": "emergent"}, collected, heard=("en",))
    assert "text->image (trained)" in out and "speech->image (emergent)" in out
    assert "| all |" not in out and "0.900" not in out
    assert "| mean (2 languages) | 0.375 | 0.750 | 0.375 | 0.250 | 2x | 8 |\n" in out + "\n"  # chance 1/4
    assert "| fr | 0.250 | 0.500 | 0.250 | 0.250 | 1x | 4 | never heard |" in out
    assert out.count("mean (2 languages)") == 2
