"""Caption evaluation as plain functions: per-language loss, perplexity and chrF."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence


def merge_eval_stores(stores: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Merge per-rank ``{lang: {loss_sum, count, hyps, refs}}`` stores."""
    merged: dict[str, dict[str, Any]] = defaultdict(lambda: {"loss_sum": 0.0, "count": 0, "hyps": [], "refs": []})
    for store in stores:
        for lang, s in store.items():
            m = merged[lang]
            m["loss_sum"] += s["loss_sum"]
            m["count"] += s["count"]
            m["hyps"] += s["hyps"]
            m["refs"] += s["refs"]
    return dict(merged)


def caption_metrics(store: dict[str, dict[str, Any]], stage: str) -> dict[str, float]:
    """Caption loss, perplexity and chrF (sacrebleu) per language and overall.

    ``{stage}/{lang}/loss`` is the mean cross-entropy per caption token (nats), ``ppl`` its exponential;
    ``{stage}/{lang}/chrF`` scores greedy generations against the references (0-100);
    ``{stage}/chrF`` is the mean over languages and ``{stage}/ppl`` the perplexity over all tokens.
    """
    metrics: dict[str, float] = {}
    chrfs = []
    for lang, s in sorted(store.items()):
        loss = s["loss_sum"] / max(s["count"], 1)
        metrics[f"{stage}/{lang}/loss"] = loss
        metrics[f"{stage}/{lang}/ppl"] = math.exp(min(loss, 50.0))
        if s["hyps"]:
            metrics[f"{stage}/{lang}/chrF"] = chrf(s["hyps"], s["refs"])
            chrfs.append(metrics[f"{stage}/{lang}/chrF"])
    total = sum(s["loss_sum"] for s in store.values()) / max(sum(s["count"] for s in store.values()), 1)
    metrics[f"{stage}/ppl"] = math.exp(min(total, 50.0))
    if chrfs:
        metrics[f"{stage}/chrF"] = sum(chrfs) / len(chrfs)
    return metrics


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (Popović, 2015) of ``hypotheses`` against one reference each, via sacrebleu."""
    try:
        import sacrebleu
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("caption evaluation needs sacrebleu: pip install 'mmalign[generate]'") from e
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)
