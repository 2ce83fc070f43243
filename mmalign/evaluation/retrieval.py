"""Retrieval metrics over embeddings: R@k, MRR, median and mean rank.

Over 400 lines on purpose: the exact blocked rank kernels and the per-language wrappers that call them belong
together (one place decides blocks, ties and deduplication).

Everything here is a plain function over embedding tensors and label sequences, so the
LightningModule (validation epoch end) and the ``mmalign eval`` CLI call the same code.

Relevance is defined by labels: a gallery item is a positive of a query when their labels are
equal (labels are any hashable values, e.g. concept ids or strings), so a query may have several
positives. The rank of a query is the rank of its best-ranked positive (1-based).

Tie convention (``ties=``), with ``s*`` the best positive's score and ``N>`` / ``N=`` the number of
*negatives* scoring strictly above / exactly equal to ``s*`` (other positives never push it down):

- ``"pessimistic"`` (default): ``rank = 1 + N> + N=``: every tied negative ranks first. A model
  that collapses all embeddings to one point gets the worst rank, not rank 1.
- ``"optimistic"``: ``rank = 1 + N>``.
- ``"mean"``: ``rank = 1 + N> + N= / 2`` (expected rank under a random tie break; may be fractional).

Ranks are found by counting, not sorting: queries are processed in chunks of ``chunk_size`` rows so
only a ``[chunk, G]`` score block lives in memory at once (a 100k x 100k evaluation needs a few
hundred MB, not 40 GB). Each block is read once by one comparison and one count (pessimistic ties:
``rank = #(scores >= s*) - #(positives >= s*) + 1``; optimistic: ``#(scores > s*)``; only ``"mean"``
needs both), and the automatic chunk keeps blocks near 2**22 scores (cache-sized) with at least 128
rows (matmul efficiency), so the whole evaluation costs about 1.2-1.8x the similarity matmul alone
(``benchmarks/perf/bench_retrieval.py``).
"""

from __future__ import annotations

from typing import Hashable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "cross_lingual_retrieval",
    "encode_labels",
    "metrics_from_ranks",
    "per_language_retrieval",
    "retrieval_metrics",
    "retrieval_ranks",
    "top_k_examples",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
Ties = Literal["pessimistic", "optimistic", "mean"]
Missing = Literal["raise", "drop"]

# Score elements per chunk when ``chunk_size`` is None: 2**24 floats = 64 MiB per [chunk, G] block.
_AUTO_CHUNK_ELEMENTS = 1 << 24
# Ranking blocks: aim at 2**22 scores (16 MiB, stays in cache between the matmul and the count), at
# least _RANK_MIN_ROWS query rows (smaller matmuls lose speed), never over _AUTO_CHUNK_ELEMENTS.
_RANK_CHUNK_ELEMENTS = 1 << 22
_RANK_MIN_ROWS = 128


def as_label_list(labels: Sequence[Hashable] | Tensor, name: str = "labels") -> list:
    """Labels as a list of hashable Python values (tensors/arrays -> ``tolist()``)."""
    if hasattr(labels, "tolist"):
        labels = labels.tolist()
    labels = list(labels)
    for i, lab in enumerate(labels):
        if isinstance(lab, list):
            raise TypeError(f"{name}[{i}] is a list ({lab!r}); labels must be scalars (one label per row)")
    return labels


def encode_labels(*label_lists: Sequence[Hashable] | Tensor) -> list[Tensor]:
    """Map arbitrary hashable labels to shared integer codes (one ``LongTensor`` per input)."""
    codes: dict[Hashable, int] = {}
    out = []
    for labels in label_lists:
        labels = as_label_list(labels)
        out.append(torch.tensor([codes.setdefault(lab, len(codes)) for lab in labels], dtype=torch.long))
    return out


def _check_embeds(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} has non-finite values (rows {bad}...)")
    return x.float()


def auto_chunk_size(num_gallery: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit 2**24 score elements."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _AUTO_CHUNK_ELEMENTS // max(1, num_gallery))


def rank_chunk_size(num_gallery: int, chunk_size: int | None) -> int:
    """Query rows per ranking block: ``chunk_size`` if given, else cache-sized (see module docstring)."""
    if chunk_size is not None:
        return auto_chunk_size(num_gallery, chunk_size)
    g = max(1, num_gallery)
    return max(1, min(max(_RANK_MIN_ROWS, _RANK_CHUNK_ELEMENTS // g), _AUTO_CHUNK_ELEMENTS // g))


def _positive_index(g_codes: Tensor, num_labels: int, max_elements: int = 1 << 24) -> Tensor | None:
    """``[num_labels, P]`` gallery columns per label code (padded with -1), or None if too big."""
    counts = torch.bincount(g_codes, minlength=num_labels)
    width = int(counts.max())
    if num_labels * width > max_elements:
        return None
    order = torch.argsort(g_codes, stable=True)
    sorted_codes = g_codes[order]
    starts = torch.cumsum(counts, 0) - counts  # [num_labels]
    slot = torch.arange(len(g_codes), device=g_codes.device) - starts[sorted_codes]
    index = torch.full((num_labels, width), -1, dtype=torch.long, device=g_codes.device)
    index[sorted_codes, slot] = order
    return index


def retrieval_ranks(
    query_embeds: Tensor,
    gallery_embeds: Tensor,
    query_labels: Sequence[Hashable] | Tensor,
    gallery_labels: Sequence[Hashable] | Tensor,
    chunk_size: int | None = None,
    normalize: bool = True,
    ties: Ties = "pessimistic",
    missing: Missing = "raise",
) -> Tensor:
    """1-based rank of each query's best positive in the gallery (see module docstring for ties).

    Args:
        query_embeds: ``[Q, D]`` query embeddings.
        gallery_embeds: ``[G, D]`` gallery embeddings (same device as the queries is used).
        query_labels: ``Q`` hashable labels (ints, strings, a tensor...).
        gallery_labels: ``G`` labels; equal labels mean relevant.
        chunk_size: Queries scored at once (``None``: ~2**24 scores per chunk).
        normalize: L2-normalise both sides first (cosine similarity); else raw dot product.
        ties: ``"pessimistic"`` | ``"optimistic"`` | ``"mean"``.
        missing: What to do with queries that have no positive in the gallery: ``"raise"`` a
            ``ValueError`` naming them, or ``"drop"`` them (their rank is NaN).

    Returns:
        ``[Q]`` float tensor of ranks on CPU (NaN for dropped queries).
    """
    q = _check_embeds(query_embeds, "query_embeds")  # [Q, D]
    g = _check_embeds(gallery_embeds, "gallery_embeds").to(q.device)  # [G, D]
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"embedding dims differ: query_embeds D={q.shape[1]}, gallery_embeds D={g.shape[1]}")
    if len(q) == 0 or len(g) == 0:
        raise ValueError(f"empty retrieval: {len(q)} queries, {len(g)} gallery items")
    if ties not in ("pessimistic", "optimistic", "mean"):
        raise ValueError(f"ties must be 'pessimistic', 'optimistic' or 'mean', got {ties!r}")
    if missing not in ("raise", "drop"):
        raise ValueError(f"missing must be 'raise' or 'drop', got {missing!r}")
    q_lab_list = as_label_list(query_labels, "query_labels")
    g_lab_list = as_label_list(gallery_labels, "gallery_labels")
    if len(q_lab_list) != len(q):
        raise ValueError(f"query_labels has {len(q_lab_list)} entries but query_embeds has {len(q)} rows")
    if len(g_lab_list) != len(g):
        raise ValueError(f"gallery_labels has {len(g_lab_list)} entries but gallery_embeds has {len(g)} rows")
    q_codes, g_codes = encode_labels(q_lab_list, g_lab_list)

    has_pos = torch.isin(q_codes, g_codes)  # [Q]
    if not has_pos.all():
        bad = (~has_pos).nonzero().flatten()
        if missing == "raise":
            shown = ", ".join(f"#{i} (label {q_lab_list[i]!r})" for i in bad[:10].tolist())
            more = "" if len(bad) <= 10 else f" and {len(bad) - 10} more"
            raise ValueError(
                f"{len(bad)} of {len(q)} queries have no positive in the gallery: {shown}{more}. "
                "Fix the labels, or pass missing='drop' to skip them."
            )

    if normalize:
        q = F.normalize(q, dim=-1)
        g = F.normalize(g, dim=-1)
    q_codes, g_codes = q_codes.to(q.device), g_codes.to(q.device)
    pos_index = _positive_index(g_codes, int(max(q_codes.max(), g_codes.max())) + 1)  # [num_labels, P] gallery columns of each label, -1 = pad
    ranks = torch.full((len(q),), float("nan"))
    step = rank_chunk_size(len(g), chunk_size)
    for start in range(0, len(q), step):
        stop = min(start + step, len(q))
        scores = q[start:stop] @ g.T  # [c, G]
        if pos_index is not None:
            # Positive scores gathered from the same matrix, so comparisons below are exact.
            cols = pos_index[q_codes[start:stop]]  # [c, P]
            pos_scores = scores.gather(1, cols.clamp(min=0)).masked_fill(cols < 0, float("-inf"))  # [c, P]
            best = pos_scores.amax(dim=1, keepdim=True)  # [c, 1]
            # No positive scores above the best positive, so every higher score is a negative, and
            # the positives tied with it are exactly the positives >= it.
            pos_ties = (pos_scores == best).sum(dim=1)
        else:  # a label with very many positives: dense mask instead of padded indices
            pos = q_codes[start:stop, None] == g_codes[None, :]  # [c, G]
            best = scores.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
            pos_ties = ((scores == best) & pos).sum(dim=1)
            del pos
        # One pass over the [c, G] block per count (memory-bound: the fewer passes the better).
        if ties == "optimistic":
            rank = 1 + torch.count_nonzero(scores > best, dim=1).float()
        else:
            at_least = torch.count_nonzero(scores >= best, dim=1) - pos_ties  # negatives >= s*
            if ties == "pessimistic":
                rank = 1 + at_least.float()
            else:
                greater = torch.count_nonzero(scores > best, dim=1)
                rank = 1 + greater.float() + (at_least - greater).float() / 2
        ranks[start:stop] = rank.cpu()
    ranks[~has_pos] = float("nan")
    return ranks


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@k (fractions in [0, 1]), MRR, median and mean rank from 1-based ranks (NaN = dropped).

    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ..., "MRR": ..., "medR": ..., "meanR": ...,
        "num_queries": n}`` (``num_queries`` counts the non-dropped queries). ``medR`` is the
        lower median for an even count, like ``torch.median``.
    """
    ranks = ranks[~torch.isnan(ranks)].double()
    if len(ranks) == 0:
        raise ValueError("no queries to score (all were dropped or none were given)")
    out = {f"R@{k}": (ranks <= k).double().mean().item() for k in ks}
    out["MRR"] = (1.0 / ranks).mean().item()
    out["medR"] = ranks.median().item()
    out["meanR"] = ranks.mean().item()
    out["num_queries"] = int(len(ranks))
    return out


def _faiss_ranks(
    q: Tensor, g: Tensor, q_codes: Tensor, g_codes: Tensor, search_k: int, chunk_size: int
) -> Tensor:
    """Ranks within the top ``search_k`` neighbours from a faiss flat inner-product index."""
    import faiss  # optional dependency, imported only when asked for

    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g.cpu().numpy())
    ranks = torch.full((len(q),), float("inf"))
    for start in range(0, len(q), chunk_size):
        _, idx = index.search(q[start : start + chunk_size].cpu().numpy(), search_k)  # [c, K]
        idx = torch.from_numpy(idx)
        hit = g_codes[idx.clamp(min=0)] == q_codes[start : start + chunk_size, None]  # [c, K]
        hit &= idx >= 0
        # Rank = 1 + number of negatives ranked before the first positive (other positives ahead
        # of it are impossible: the first hit is the first positive).
        first = torch.where(hit.any(1), hit.float().argmax(1).float() + 1, torch.tensor(float("inf")))
        ranks[start : start + chunk_size] = first
    return ranks


def retrieval_metrics(
    query_embeds: Tensor,
    gallery_embeds: Tensor,
    query_labels: Sequence[Hashable] | Tensor,
    gallery_labels: Sequence[Hashable] | Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    normalize: bool = True,
    ties: Ties = "pessimistic",
    missing: Missing = "raise",
    backend: Literal["torch", "faiss"] = "torch",
    search_k: int = 100,
) -> dict[str, float]:
    """Recall@k, MRR, median and mean rank of query -> gallery retrieval.

    Args:
        query_embeds: ``[Q, D]``.
        gallery_embeds: ``[G, D]``.
        query_labels: ``Q`` labels (concept ids, strings...).
        gallery_labels: ``G`` labels; every gallery item with the query's label is a positive.
        ks: Cut-offs for ``R@k``.
        chunk_size: Queries per score block (``None``: automatic, ~64 MiB blocks).
        normalize: Cosine similarity (True) or raw dot product (False).
        ties: Tie convention, see the module docstring (default pessimistic).
        missing: ``"raise"`` (default) on queries without a positive, or ``"drop"`` them.
        backend: ``"torch"`` (exact, default) or ``"faiss"`` (needs ``faiss`` installed; exact flat
            inner-product search of the top ``search_k`` neighbours: R@k for ``k <= search_k`` is
            exact, ties follow faiss' order, a query whose first positive is beyond ``search_k``
            gets rank infinity, so ``MRR`` is MRR@search_k and ``medR``/``meanR`` may be inf).
        search_k: Neighbours searched by the faiss backend.

    Returns:
        ``{"R@1", "R@5", "R@10", "MRR", "medR", "meanR", "num_queries"}`` as floats (R@k in [0, 1]).

    Raises:
        ValueError: A query has no positive (with ``missing="raise"``), shapes or lengths disagree.
    """
    if backend == "torch":
        ranks = retrieval_ranks(
            query_embeds, gallery_embeds, query_labels, gallery_labels,
            chunk_size=chunk_size, normalize=normalize, ties=ties, missing=missing,
        )
        return metrics_from_ranks(ranks, ks)
    if backend != "faiss":
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    if max(ks) > search_k:
        raise ValueError(f"faiss backend: max(ks)={max(ks)} exceeds search_k={search_k}")
    q = _check_embeds(query_embeds, "query_embeds")
    g = _check_embeds(gallery_embeds, "gallery_embeds")
    q_lab, g_lab = as_label_list(query_labels), as_label_list(gallery_labels)
    if len(q_lab) != len(q) or len(g_lab) != len(g):
        raise ValueError(f"labels/embeddings length mismatch: {len(q_lab)}/{len(q)} queries, {len(g_lab)}/{len(g)} gallery")
    q_codes, g_codes = encode_labels(q_lab, g_lab)
    has_pos = torch.isin(q_codes, g_codes)
    if not has_pos.all() and missing == "raise":
        bad = (~has_pos).nonzero().flatten()[:10].tolist()
        raise ValueError(f"{int((~has_pos).sum())} of {len(q)} queries have no positive in the gallery (rows {bad}...)")
    if normalize:
        q, g = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
    ranks = _faiss_ranks(q, g, q_codes, g_codes, min(search_k, len(g)), auto_chunk_size(search_k, chunk_size))
    ranks[~has_pos] = float("nan")
    return metrics_from_ranks(ranks, ks)


# ----------------------------------------------------------------------------------------------
# Per-language and cross-lingual helpers over aligned rows.
# ----------------------------------------------------------------------------------------------


def _dedup(keys: list | None, idx: list[int], labels: list, side: str) -> list[int]:
    """Keep the first row of each key among ``idx`` (all rows when ``keys`` is None)."""
    if keys is None:
        return idx
    first: dict[Hashable, int] = {}
    for i in idx:
        j = first.setdefault(keys[i], i)
        if labels[j] != labels[i]:
            raise ValueError(
                f"{side}: key {keys[i]!r} has two labels ({labels[j]!r} at row {j}, {labels[i]!r} "
                f"at row {i}); one gallery item must have one label"
            )
    return list(first.values())


def _language_rows(langs: list, languages: Sequence[str] | None) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, lang in enumerate(langs):
        rows.setdefault(lang, []).append(i)
    if languages is None:
        return rows
    unknown = [lang for lang in languages if lang not in rows]
    if unknown:
        raise ValueError(f"requested languages {unknown} have no rows (present: {sorted(rows, key=str)})")
    return {lang: rows[lang] for lang in languages}


def per_language_retrieval(
    a_embeds: Tensor,
    b_embeds: Tensor,
    labels: Sequence[Hashable] | Tensor,
    langs: Sequence[str],
    a_keys: Sequence[Hashable] | None = None,
    b_keys: Sequence[Hashable] | None = None,
    languages: Sequence[str] | None = None,
    a_name: str = "a",
    b_name: str = "b",
    **metric_kwargs,
) -> dict[str, dict[str, dict[str, float]]]:
    """Retrieval in both directions, separately for each language, over aligned pairs.

    Row ``i`` of ``a_embeds`` pairs with row ``i`` of ``b_embeds``; ``labels[i]`` is their concept
    and ``langs[i]`` their language. Within each language, each side is deduplicated by its keys
    (first occurrence kept), so e.g. the same English caption or the same image repeated over
    many rows appears once, whether it is the query or the gallery.

    Args:
        a_embeds: ``[N, D]`` embeddings of side a (e.g. text).
        b_embeds: ``[N, D]`` embeddings of side b (e.g. image).
        labels: ``N`` concept labels; equal labels are positives of each other.
        langs: ``N`` language codes.
        a_keys: ``N`` identities of side-a items for deduplication (``None``: every row distinct).
        b_keys: Same for side b (e.g. image paths, or the English text).
        languages: Languages to evaluate (default: all, in order of first appearance).
        a_name: Name of side a in the direction keys.
        b_name: Name of side b in the direction keys.
        **metric_kwargs: Passed to :func:`retrieval_metrics` (``ks``, ``chunk_size``, ``ties``...).

    Returns:
        ``{lang: {"a->b": metrics, "b->a": metrics}}`` with the names substituted.

    Raises:
        ValueError: A requested language has no rows, lengths disagree, or a key has two labels.
    """
    n = len(a_embeds)
    labels = as_label_list(labels)
    langs = as_label_list(langs, "langs")
    a_keys = None if a_keys is None else as_label_list(a_keys, "a_keys")
    b_keys = None if b_keys is None else as_label_list(b_keys, "b_keys")
    for name, seq in (("b_embeds", b_embeds), ("labels", labels), ("langs", langs), ("a_keys", a_keys), ("b_keys", b_keys)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} rows but a_embeds has {n}")
    if n == 0:
        raise ValueError("per_language_retrieval got no rows")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lang, idx in _language_rows(langs, languages).items():
        ia = _dedup(a_keys, idx, labels, "a_keys")
        ib = _dedup(b_keys, idx, labels, "b_keys")
        la, lb = [labels[i] for i in ia], [labels[i] for i in ib]
        ta, tb = torch.as_tensor(ia), torch.as_tensor(ib)
        out[lang] = {
            f"{a_name}->{b_name}": retrieval_metrics(a_embeds[ta], b_embeds[tb], la, lb, **metric_kwargs),
            f"{b_name}->{a_name}": retrieval_metrics(b_embeds[tb], a_embeds[ta], lb, la, **metric_kwargs),
        }
    return out


def cross_lingual_retrieval(
    embeds: Tensor,
    langs: Sequence[str],
    labels: Sequence[Hashable] | Tensor,
    keys: Sequence[Hashable] | None = None,
    languages: Sequence[str] | None = None,
    metric: str = "R@1",
    **metric_kwargs,
) -> dict:
    """Text(lang A) -> text(lang B) retrieval for every ordered pair of languages ``A != B``.

    Queries are the rows of language A, the gallery the rows of language B (each deduplicated by
    ``keys`` when given); a query is correct when it retrieves a B row with its label.

    Args:
        embeds: ``[N, D]`` embeddings (all languages stacked).
        langs: ``N`` language codes.
        labels: ``N`` concept labels shared across languages.
        keys: Optional ``N`` item identities for deduplication (first occurrence kept).
        languages: Languages to include (default: all, in order of first appearance).
        metric: Which metric fills ``matrix`` (any key of :func:`retrieval_metrics`).
        **metric_kwargs: Passed to :func:`retrieval_metrics` (e.g. ``missing="drop"`` when not
            every concept exists in every language).

    Returns:
        ``{"languages": [L], "metric": metric, "matrix": [[L x L]] (row = query language,
        column = gallery language, diagonal None), "pairs": {"A->B": metrics}}``, JSON-ready.
    """
    labels = as_label_list(labels)
    langs = as_label_list(langs, "langs")
    keys = None if keys is None else as_label_list(keys, "keys")
    if not (len(embeds) == len(langs) == len(labels)) or (keys is not None and len(keys) != len(langs)):
        raise ValueError(f"lengths differ: embeds {len(embeds)}, langs {len(langs)}, labels {len(labels)}")
    rows = _language_rows(langs, languages)
    if len(rows) < 2:
        raise ValueError(f"cross-lingual retrieval needs at least two languages, got {list(rows)}")
    rows = {lang: torch.as_tensor(_dedup(keys, idx, labels, "keys")) for lang, idx in rows.items()}
    names = list(rows)
    matrix: list[list[float | None]] = [[None] * len(names) for _ in names]
    pairs: dict[str, dict[str, float]] = {}
    for i, src in enumerate(names):
        for j, tgt in enumerate(names):
            if i == j:
                continue
            qi, gi = rows[src], rows[tgt]
            m = retrieval_metrics(
                embeds[qi], embeds[gi], [labels[r] for r in qi.tolist()], [labels[r] for r in gi.tolist()],
                **metric_kwargs,
            )
            pairs[f"{src}->{tgt}"] = m
            matrix[i][j] = m[metric]
    return {"languages": names, "metric": metric, "matrix": matrix, "pairs": pairs}


def top_k_examples(
    query_embeds: Tensor,
    gallery_embeds: Tensor,
    query_labels: Sequence[Hashable],
    gallery_labels: Sequence[Hashable],
    query_items: Sequence[Hashable],
    gallery_items: Sequence[Hashable],
    k: int = 5,
    normalize: bool = True,
) -> list[dict]:
    """The top-``k`` gallery items of each query, for a report a person reads (a retrieval gallery).

    Args:
        query_embeds: ``[Q, D]``.
        gallery_embeds: ``[G, D]``.
        query_labels: ``Q`` concept labels.
        gallery_labels: ``G`` concept labels (equal labels are positives).
        query_items: ``Q`` things to show for the queries (texts, image paths...).
        gallery_items: ``G`` things to show for the gallery items.
        k: Neighbours listed per query.
        normalize: Cosine similarity (True) or raw dot product.

    Returns:
        One dict per query: ``{"query", "label", "rank" (of its best positive, pessimistic ties, None if it has
        none), "gallery_size", "top": [{"item", "label", "score", "hit"}]}`` (JSON-ready).
    """
    q = _check_embeds(query_embeds, "query_embeds")
    g = _check_embeds(gallery_embeds, "gallery_embeds").to(q.device)
    q_lab, g_lab = as_label_list(query_labels, "query_labels"), as_label_list(gallery_labels, "gallery_labels")
    if not (len(q_lab) == len(q) == len(query_items)) or not (len(g_lab) == len(g) == len(gallery_items)):
        raise ValueError(f"lengths differ: {len(q)} queries / {len(q_lab)} labels / {len(query_items)} items, "
                         f"{len(g)} gallery / {len(g_lab)} labels / {len(gallery_items)} items")
    ranks = retrieval_ranks(q, g, q_lab, g_lab, normalize=normalize, missing="drop")
    if normalize:
        q, g = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
    scores = q @ g.T  # [Q, G]
    top = scores.topk(min(k, len(g)), dim=1)
    out = []
    for i in range(len(q)):
        rank = ranks[i].item()
        out.append({
            "query": query_items[i], "label": q_lab[i], "rank": None if rank != rank else rank, "gallery_size": len(g),
            "top": [{"item": gallery_items[j], "label": g_lab[j], "score": float(s), "hit": g_lab[j] == q_lab[i]}
                    for s, j in zip(top.values[i].tolist(), top.indices[i].tolist())],
        })
    return out
