"""The checkpoint monitor ``val/R@1`` (mmalign.training.module.monitor_metrics): the mean over trained pairs of
per-language, per-direction R@1, each language's queries against that language's gallery; the pooled ``all`` row
(where a pivot query may hit any of its concept's translations) never enters it."""

from __future__ import annotations

import pytest
import torch

from mmalign.evaluation import per_language_retrieval
from mmalign.training.module import monitor_metrics


def _pivot_results(seed: int = 0):
    """teacher (English text, the same item in every language) -> student (text in 3 languages), pooled as the module
    pools it. Student de is perfect; fr and ja are shuffled, but every English query still finds its concept's de
    item in the pooled gallery: pooled R@1 = 1 while fr and ja are near chance."""
    g = torch.Generator().manual_seed(seed)
    n, d = 12, 32
    teacher = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    rows_t, rows_s, langs, labels = [], [], [], []
    for lang in ("de", "fr", "ja"):
        perm = torch.arange(n) if lang == "de" else torch.randperm(n, generator=g)
        student = teacher[perm] * (1.0 if lang == "de" else 0.5) + 0.01 * torch.randn(n, d, generator=g)
        rows_t.append(teacher)
        rows_s.append(student)
        langs += [lang] * n
        labels += list(range(n))
    a, b = torch.cat(rows_t), torch.cat(rows_s)
    a_keys = [f"en{c}" for c in labels]  # one English item per concept, repeated across languages
    b_keys = [f"{lang}{c}" for lang, c in zip(langs, labels)]
    per_lang = per_language_retrieval(a, b, labels=labels, langs=langs, a_keys=a_keys, b_keys=b_keys,
                                      a_name="teacher", b_name="student")
    per_lang["all"] = per_language_retrieval(a, b, labels=labels, langs=["all"] * len(a), a_keys=a_keys, b_keys=b_keys,
                                             a_name="teacher", b_name="student")["all"]
    return {"teacher|student": per_lang}


def test_monitor_is_the_per_language_mean_not_the_pooled_row():
    results = _pivot_results()
    per_lang = results["teacher|student"]
    assert per_lang["all"]["teacher->student"]["R@1"] == 1.0  # any of 3 translations counts in the pooled row
    flat = monitor_metrics(results, {"teacher|student": "trained"}, "val")
    cells = [per_lang[lang][d]["R@1"] for lang in ("de", "fr", "ja") for d in ("teacher->student", "student->teacher")]
    assert flat["val/R@1"] == pytest.approx(sum(cells) / 6)
    assert flat["val/R@1"] < 0.7  # de is 1.0, fr/ja near chance (1/12): the monitor sees the two bad languages
    assert flat["val/mean/teacher->student/R@1"] == pytest.approx(sum(per_lang[lang]["teacher->student"]["R@1"]
                                                                      for lang in ("de", "fr", "ja")) / 3)
    assert flat["val/all/teacher->student/R@1"] == 1.0 and "val/emergent/R@1" not in flat


def test_an_emergent_pair_never_moves_the_monitor():
    results = _pivot_results()
    trained = monitor_metrics(results, {"teacher|student": "trained"})
    results["image|student"] = {k: {d.replace("teacher", "image"): m for d, m in v.items()}
                                for k, v in _pivot_results(1)["teacher|student"].items()}
    both = monitor_metrics(results, {"teacher|student": "trained", "image|student": "emergent"})
    assert both["val/R@1"] == trained["val/R@1"]
    assert both["val/emergent/R@1"] == pytest.approx(sum(
        m["R@1"] for lang, per in results["image|student"].items() if lang != "all" for m in per.values()) / 6)
