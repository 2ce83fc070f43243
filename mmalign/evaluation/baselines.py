"""Baselines every recipe is reported beside: closed-form least-squares maps and plain R@1.

A recipe that does not beat a ridge map fitted on the same frozen training features has learned nothing a
linear layer could not; every report shows both (``docs/results.md``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

#: Ridge strengths tried by :func:`pick_ridge`, relative to the sample count.
RIDGE_LAMBDAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def ridge_fit(x: Tensor, y: Tensor, lam: float) -> Callable[[Tensor], Tensor]:
    """Closed-form ridge regression ``y ~ (x - mx) W + my`` (float64); returns the map.

    Args:
        x: Source features ``[N, Dx]``.
        y: Target features ``[N, Dy]``.
        lam: Ridge strength relative to ``N`` (the penalty is ``lam * N * |W|^2``).
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    w = torch.linalg.solve(xc.T @ xc + lam * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    return lambda z: ((z.double() - mx) @ w + my).float()


def pick_ridge(
    x: Tensor, y: Tensor, score: Callable[[Callable[[Tensor], Tensor]], float], lambdas: Sequence[float] = RIDGE_LAMBDAS,
) -> tuple[Callable[[Tensor], Tensor], float]:
    """Ridge map with the lambda that maximises ``score(map)`` (computed on a validation split)."""
    best = max(((score(ridge_fit(x, y, lam)), lam) for lam in lambdas), key=lambda t: t[0])
    return ridge_fit(x, y, best[1]), best[1]


def r1(query: Tensor, gallery: Tensor, q_labels: Sequence, g_labels: Sequence) -> float:
    """R@1 of ``query`` rows retrieving the ``gallery`` row with the same label (cosine)."""
    from mmalign.evaluation.retrieval import retrieval_metrics

    return retrieval_metrics(query, gallery, list(q_labels), list(g_labels))["R@1"]


# -- ceilings: what the frozen student encoder retrieves by itself ---------------------------------
def student_ceiling(
    features: Tensor,
    langs: Sequence[str],
    concepts: Sequence,
    pivot: str = "en",
    keys: Sequence | None = None,
    languages: Sequence[str] | None = None,
    **metric_kwargs,
) -> dict[str, dict[str, float]]:
    """The frozen student encoder's own cross-lingual retrieval, no projector: ``student(L) -> student(pivot)``.

    This is the ceiling of a pivot (teacher-student) recipe: the projector maps the student's space into the
    teacher's, so a text in language L can retrieve the teacher's English name at best as well as the student
    encoder itself retrieves the English name of the concept from L (e.g. USE-m de -> USE-m en). A report puts
    ``recipe R@1(L) / ceiling R@1(L)`` beside it (:func:`ceiling_rows`): how much of the encoder's cross-lingual
    ability the projector keeps.

    For every language ``L`` (the pivot included), the queries are the rows of ``L`` and the gallery is the rows of
    the pivot language (each side deduplicated by ``keys`` when given, first row kept); a query is a hit when it
    retrieves a pivot row with its concept. Concepts absent from the pivot language are dropped (counted out of
    ``num_queries``). ``pivot -> pivot`` retrieves the query itself, so it is 1.0 unless two concepts share one
    embedding (pessimistic ties): it is reported so every language has a row.

    Args:
        features: ``[N, D]`` frozen student features (the encoder's pooled output, no projector), all languages.
        langs: ``N`` language codes.
        concepts: ``N`` concept labels shared across languages (equal labels are translations of each other).
        pivot: The language of the gallery (the teacher's language; English for uCLIP-style recipes).
        keys: Optional ``N`` item identities (the input strings) for deduplication within a language.
        languages: Query languages to report (default: every language present, in order of first appearance).
        **metric_kwargs: Passed to :func:`mmalign.evaluation.retrieval.retrieval_metrics` (``ks``, ``ties``...).

    Returns:
        ``{lang: {"R@1", "R@5", "R@10", "MRR", "medR", "meanR", "num_queries"}}`` (R@k in [0, 1]).

    Raises:
        ValueError: Lengths disagree, or no row is in the pivot language (or a requested language).

    Example (the corpus-scale pivot study: features of a held-out domain in several languages)::

        ceiling = student_ceiling(use_m_features, langs, concept_ids, pivot="en")
        rows = ceiling_rows({lang: m["R@1"] for lang, m in recipe.items()}, {l: m["R@1"] for l, m in ceiling.items()})
    """
    from mmalign.evaluation.retrieval import as_label_list, retrieval_metrics

    features = torch.as_tensor(features)
    langs, concepts = as_label_list(langs, "langs"), as_label_list(concepts, "concepts")
    keys = None if keys is None else as_label_list(keys, "keys")
    if not (len(features) == len(langs) == len(concepts)) or (keys is not None and len(keys) != len(langs)):
        raise ValueError(f"lengths differ: features {len(features)}, langs {len(langs)}, concepts {len(concepts)}"
                         + ("" if keys is None else f", keys {len(keys)}"))
    rows: dict[str, list[int]] = {}
    seen: set = set()
    for i, (lang, key) in enumerate(zip(langs, keys if keys is not None else range(len(langs)))):
        if (lang, key) not in seen:  # one row per distinct input of a language
            seen.add((lang, key))
            rows.setdefault(lang, []).append(i)
    if pivot not in rows:
        raise ValueError(f"no row in the pivot language {pivot!r} (languages present: {sorted(rows)})")
    wanted = list(rows) if languages is None else list(languages)
    unknown = [lang for lang in wanted if lang not in rows]
    if unknown:
        raise ValueError(f"requested languages {unknown} have no rows (present: {sorted(rows)})")
    metric_kwargs.setdefault("missing", "drop")
    g = torch.as_tensor(rows[pivot])
    g_labels = [concepts[i] for i in rows[pivot]]
    out = {}
    for lang in wanted:
        q = torch.as_tensor(rows[lang])
        out[lang] = retrieval_metrics(features[q], features[g], [concepts[i] for i in rows[lang]], g_labels, **metric_kwargs)
    return out


def ceiling_rows(recipe: dict[str, float], ceiling: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """``{lang: {"recipe", "ceiling", "of_ceiling"}}`` for the languages in both, plus ``"mean"`` (means of the
    per-language recipe and ceiling figures, and their ratio). ``of_ceiling`` is ``recipe / ceiling`` (None when
    the ceiling is 0): 1.0 means the projector keeps all of the frozen encoder's cross-lingual retrieval."""
    langs = [lang for lang in recipe if lang in ceiling and lang != "mean"]
    ratio = lambda r, c: (r / c) if c else None  # noqa: E731
    out: dict[str, dict[str, float | None]] = {
        lang: {"recipe": recipe[lang], "ceiling": ceiling[lang], "of_ceiling": ratio(recipe[lang], ceiling[lang])}
        for lang in langs}
    if langs:
        r = sum(recipe[lang] for lang in langs) / len(langs)
        c = sum(ceiling[lang] for lang in langs) / len(langs)
        out["mean"] = {"recipe": r, "ceiling": c, "of_ceiling": ratio(r, c)}
    return out


@torch.no_grad()
def frozen_features(
    encoder: Callable, inputs: Sequence, batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = False,
) -> Tensor:
    """The frozen encoder's pooled output (no projector) for raw ``inputs`` (texts, image or audio paths), ``[N, D]``
    float32 on CPU; ``encoder`` is an :class:`encoders.base.Encoder` (``preprocess`` then ``forward``). ``progress``:
    a tqdm bar per item (stderr)."""
    from tqdm.auto import tqdm

    chunks = []
    bar = tqdm(total=len(inputs), desc="ceiling: frozen student features", unit="item", disable=not progress)
    for start in range(0, len(inputs), batch_size):
        batch = encoder.preprocess(list(inputs[start : start + batch_size]))
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()} if isinstance(batch, dict) else batch
        chunks.append(encoder(batch).pooled.float().cpu())
        bar.update(len(chunks[-1]))
    bar.close()
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)
