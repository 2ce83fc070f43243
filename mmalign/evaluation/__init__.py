"""Evaluation as plain functions over embeddings: retrieval, xsim, zero-shot, reports.

Typical use (the LightningModule and ``mmalign eval`` call the same functions)::

    from mmalign.evaluation import per_language_retrieval, write_report
    res = per_language_retrieval(text_embeds, image_embeds, concepts, langs,
                                 b_keys=image_paths, a_name="text", b_name="image")
    write_report({"retrieval": res}, "eval_out", embeddings={"text": text_embeds, "image": image_embeds})
"""

from .report import to_jsonable, write_report
from .retrieval import (
    DEFAULT_KS,
    cross_lingual_retrieval,
    metrics_from_ranks,
    per_language_retrieval,
    retrieval_metrics,
    retrieval_ranks,
)
from .xsim import xsim_error_rate, xsim_errors
from .zeroshot import DEFAULT_TEMPLATES, zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "DEFAULT_KS",
    "DEFAULT_TEMPLATES",
    "cross_lingual_retrieval",
    "metrics_from_ranks",
    "per_language_retrieval",
    "retrieval_metrics",
    "retrieval_ranks",
    "to_jsonable",
    "write_report",
    "xsim_error_rate",
    "xsim_errors",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
