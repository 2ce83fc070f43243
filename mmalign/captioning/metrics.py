"""Caption and transcript evaluation as plain functions: per-language loss, perplexity, chrF, WER and CER."""

from __future__ import annotations

import math
import re
import unicodedata
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


def caption_metrics(store: dict[str, dict[str, Any]], stage: str, error_rates: bool = False) -> dict[str, float]:
    """Caption loss, perplexity and chrF (sacrebleu) per language and overall (+ WER/CER for transcripts).

    ``{stage}/{lang}/loss`` is the mean cross-entropy per caption token (nats), ``ppl`` its exponential;
    ``{stage}/{lang}/chrF`` scores greedy generations against the references (0-100);
    ``{stage}/chrF`` is the mean over languages and ``{stage}/ppl`` the perplexity over all tokens.
    With ``error_rates``, ``{stage}/{lang}/WER`` and ``CER`` (percent, :func:`wer`/:func:`cer` on
    :func:`normalize_transcript` text) and their means over languages, ``{stage}/WER`` and ``{stage}/CER``.
    """
    metrics: dict[str, float] = {}
    chrfs = []
    rates: dict[str, list[float]] = {"WER": [], "CER": []}
    for lang, s in sorted(store.items()):
        loss = s["loss_sum"] / max(s["count"], 1)
        metrics[f"{stage}/{lang}/loss"] = loss
        metrics[f"{stage}/{lang}/ppl"] = math.exp(min(loss, 50.0))
        if s["hyps"]:
            metrics[f"{stage}/{lang}/chrF"] = chrf(s["hyps"], s["refs"])
            chrfs.append(metrics[f"{stage}/{lang}/chrF"])
            if error_rates:
                for name, fn in (("WER", wer), ("CER", cer)):
                    metrics[f"{stage}/{lang}/{name}"] = fn(s["hyps"], s["refs"])
                    rates[name].append(metrics[f"{stage}/{lang}/{name}"])
    total = sum(s["loss_sum"] for s in store.values()) / max(sum(s["count"] for s in store.values()), 1)
    metrics[f"{stage}/ppl"] = math.exp(min(total, 50.0))
    if chrfs:
        metrics[f"{stage}/chrF"] = sum(chrfs) / len(chrfs)
    for name, values in rates.items():
        if values:
            metrics[f"{stage}/{name}"] = sum(values) / len(values)
    return metrics


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (Popović, 2015) of ``hypotheses`` against one reference each, via sacrebleu."""
    try:
        import sacrebleu
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("caption evaluation needs sacrebleu: pip install 'mmalign[generate]'") from e
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def normalize_transcript(text: str) -> str:
    """What WER/CER compare: NFKC, lower case, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def _error_rate(kind: str, hypotheses: Sequence[str], references: Sequence[str]) -> float:
    from torchmetrics.functional.text import char_error_rate, word_error_rate

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    hyps = [normalize_transcript(h) for h in hypotheses]
    refs = [normalize_transcript(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"reference {empty[0]} is empty after normalisation ({references[empty[0]]!r}): "
                         f"{kind} has no words to count errors against")
    fn = word_error_rate if kind == "WER" else char_error_rate
    return 100.0 * float(fn(hyps, refs))


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate in percent: 100 x (substitutions + deletions + insertions) / reference words,
    on :func:`normalize_transcript` text (torchmetrics). Words are whitespace-separated, so for languages
    written without spaces (ja, zh) read :func:`cer` instead."""
    return _error_rate("WER", hypotheses, references)


def cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate in percent (as :func:`wer`, over characters)."""
    return _error_rate("CER", hypotheses, references)

