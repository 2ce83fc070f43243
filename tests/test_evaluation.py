"""Tests of mmalign.evaluation: hand-made similarity matrices with known answers + library cross-checks."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmalign.evaluation import (  # noqa: E402
    DEFAULT_TEMPLATES,
    cross_lingual_retrieval,
    per_language_retrieval,
    retrieval_metrics,
    retrieval_ranks,
    write_report,
    xsim_error_rate,
    xsim_errors,
    zero_shot_accuracy,
    zero_shot_classifier,
)


def sims(matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, gallery) whose raw dot products are exactly ``matrix`` (use normalize=False)."""
    s = torch.tensor(matrix, dtype=torch.float32)
    return s, torch.eye(s.shape[1])


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------


def test_single_positive_known_ranks():
    # Positive of query i is gallery item i; ranks 1, 3, 2.
    q, g = sims([[0.9, 0.1, 0.2], [0.8, 0.3, 0.5], [0.1, 0.9, 0.7]])
    ranks = retrieval_ranks(q, g, [0, 1, 2], [0, 1, 2], normalize=False)
    assert ranks.tolist() == [1.0, 3.0, 2.0]
    m = retrieval_metrics(q, g, [0, 1, 2], [0, 1, 2], ks=(1, 2, 3), normalize=False)
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["medR"] == 2.0
    assert m["meanR"] == pytest.approx(2.0)
    assert m["num_queries"] == 3


def test_ties_conventions():
    # Positive (label "a", item 0) ties with two negatives at 0.5; one negative above it.
    q, g = sims([[0.5, 0.5, 0.5, 0.9, 0.1]])
    q_lab, g_lab = ["a"], ["a", "b", "c", "d", "e"]
    rank = lambda ties: retrieval_ranks(q, g, q_lab, g_lab, normalize=False, ties=ties).item()  # noqa: E731
    assert rank("pessimistic") == 4.0  # 1 + 1 greater + 2 tied
    assert rank("optimistic") == 2.0  # 1 + 1 greater
    assert rank("mean") == 3.0  # 1 + 1 + 2/2
    # A collapsed model (all scores equal) is ranked last by default, not first.
    q2, g2 = torch.ones(3, 4), torch.ones(5, 4)
    assert retrieval_ranks(q2, g2, [0, 1, 2], [0, 1, 2, 3, 4]).tolist() == [5.0, 5.0, 5.0]


def test_multiple_positives_use_best_ranked_positive():
    # Label 7 positives at 0.5 and 0.8; one negative (0.9) above the best one -> rank 2.
    # Tied positives do not push each other down (second query: two positives tied at top -> rank 1).
    q, g = sims([[0.9, 0.5, 0.8, 0.1], [0.2, 0.9, 0.9, 0.3]])
    ranks = retrieval_ranks(q, g, [7, 7], ["x", 7, 7, "y"], normalize=False)
    assert ranks.tolist() == [2.0, 1.0]


def test_query_without_positive_rejected_and_droppable():
    q, g = sims([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"1 of 3 queries have no positive.*#2 \(label 'zebra'\)"):
        retrieval_metrics(q, g, ["cat", "dog", "zebra"], ["cat", "dog"], normalize=False)
    m = retrieval_metrics(q, g, ["cat", "dog", "zebra"], ["cat", "dog"], normalize=False, missing="drop")
    assert m["num_queries"] == 2 and m["R@1"] == 1.0


def test_bad_shapes_and_lengths_rejected():
    with pytest.raises(ValueError, match="query_labels has 2 entries"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="embedding dims differ"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5), [0, 1, 2], [0, 1, 2])


def test_chunked_equals_unchunked_with_ties():
    torch.manual_seed(0)
    # Coarsely quantised embeddings make many exact ties; duplicated labels give multiple positives.
    q = torch.randint(-2, 3, (97, 6)).float()
    g = torch.randint(-2, 3, (53, 6)).float()
    q_lab = torch.randint(0, 20, (97,))
    g_lab = torch.cat([torch.arange(20), torch.randint(0, 20, (33,))])
    for ties in ("pessimistic", "optimistic", "mean"):
        full = retrieval_ranks(q, g, q_lab, g_lab, chunk_size=10_000, ties=ties, normalize=False)
        for chunk in (1, 7, None):
            assert torch.equal(full, retrieval_ranks(q, g, q_lab, g_lab, chunk_size=chunk, ties=ties, normalize=False))
    pess = retrieval_ranks(q, g, q_lab, g_lab, normalize=False)
    opt = retrieval_ranks(q, g, q_lab, g_lab, normalize=False, ties="optimistic")
    assert (pess >= opt).all() and (pess > opt).any()


def _naive_ranks(q, g, q_lab, g_lab):
    """Reference: full descending sort, rank of the first positive (no ties with random floats)."""
    s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(g, dim=-1).T
    order = s.argsort(dim=1, descending=True)
    pos = torch.as_tensor(g_lab)[order] == torch.as_tensor(q_lab)[:, None]
    return pos.float().argmax(dim=1).float() + 1


def test_agrees_with_torchmetrics_and_naive_sort():
    pytest.importorskip("torchmetrics")
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalRecall

    torch.manual_seed(1)
    nq, ng = 40, 30
    q, g = torch.randn(nq, 16), torch.randn(ng, 16)
    g_lab = torch.arange(ng)
    for q_lab, multi in ((torch.arange(nq) % ng, False), (torch.randint(0, 10, (nq,)), True)):
        gl = g_lab % 10 if multi else g_lab  # multi: every concept has 3 gallery positives
        ours = retrieval_metrics(q, g, q_lab, gl, ks=(1, 5, 10))
        assert torch.equal(retrieval_ranks(q, g, q_lab, gl), _naive_ranks(q, g, q_lab, gl))
        scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(g, dim=-1).T
        # torchmetrics' RetrievalMRR treats a positive with score <= 0 as never retrieved (RR = 0):
        # shift cosines into (0, 3) (same order) so it ranks like we do.
        preds = (scores + 2).flatten()
        target = (q_lab[:, None] == gl[None, :]).flatten()
        indexes = torch.arange(nq)[:, None].expand(nq, ng).flatten()
        # "Any positive in the top k" is HitRate; with one positive per query it equals Recall.
        metric_cls = RetrievalHitRate if multi else RetrievalRecall
        for k in (1, 5, 10):
            ref = metric_cls(top_k=k)(preds, target, indexes=indexes).item()
            assert ours[f"R@{k}"] == pytest.approx(ref, abs=1e-6), (k, multi)
        assert ours["MRR"] == pytest.approx(RetrievalMRR()(preds, target, indexes=indexes).item(), abs=1e-6)


def test_agrees_with_sentence_transformers_ir_evaluator():
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:
        pytest.skip("sentence-transformers not installed")
    torch.manual_seed(2)
    nq, ng = 25, 20
    q, g = torch.randn(nq, 8), torch.randn(ng, 8)
    q_lab, g_lab = torch.randint(0, 8, (nq,)), torch.arange(ng) % 8
    queries = {f"q{i}": f"query {i}" for i in range(nq)}
    corpus = {f"d{j}": f"doc {j}" for j in range(ng)}
    relevant = {f"q{i}": {f"d{j}" for j in range(ng) if g_lab[j] == q_lab[i]} for i in range(nq)}
    ev = InformationRetrievalEvaluator(
        queries, corpus, relevant, accuracy_at_k=[1, 5, 10], mrr_at_k=[ng], precision_recall_at_k=[1],
        ndcg_at_k=[1], map_at_k=[1], write_csv=False,
    )
    scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(g, dim=-1).T
    # Feed our similarity scores to the evaluator's own ranking/metric code.
    results = [[{"corpus_id": f"d{j}", "score": scores[i, j].item()} for j in range(ng)] for i in range(nq)]
    ref = ev.compute_metrics(results)
    ours = retrieval_metrics(q, g, q_lab, g_lab, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert ours[f"R@{k}"] == pytest.approx(ref["accuracy@k"][k])
    assert ours["MRR"] == pytest.approx(ref["mrr@k"][ng])


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss")
    torch.manual_seed(3)
    q, g = torch.randn(60, 12), torch.randn(45, 12)
    q_lab, g_lab = torch.randint(0, 15, (60,)), torch.arange(45) % 15
    exact = retrieval_metrics(q, g, q_lab, g_lab)
    approx = retrieval_metrics(q, g, q_lab, g_lab, backend="faiss", search_k=45, chunk_size=16)
    for key in ("R@1", "R@5", "R@10", "MRR", "medR"):
        assert approx[key] == pytest.approx(exact[key], abs=1e-6), key


# ---------------------------------------------------------------------------------------------
# per-language and cross-lingual
# ---------------------------------------------------------------------------------------------


def _toy_pairs():
    """Text (a) / image (b) pairs: 4 concepts, languages en+es; the image of a concept is shared."""
    torch.manual_seed(4)
    concept_vecs = torch.randn(4, 8)
    rows = [(c, lang) for lang in ("en", "es") for c in range(4)] + [(0, "es"), (1, "es")]  # es repeats 0, 1
    labels = [c for c, _ in rows]
    langs = [lang for _, lang in rows]
    a = concept_vecs[labels] + 0.3 * torch.randn(len(rows), 8)  # noisy texts
    b = concept_vecs[labels]  # identical image rows for the same concept
    b_keys = [f"img{c}.png" for c in labels]
    return a, b, labels, langs, b_keys


def test_per_language_retrieval_dedups_gallery_and_matches_direct_call():
    a, b, labels, langs, b_keys = _toy_pairs()
    res = per_language_retrieval(a, b, labels, langs, b_keys=b_keys, a_name="text", b_name="image")
    assert list(res) == ["en", "es"] and set(res["es"]) == {"text->image", "image->text"}
    es = [i for i, lang in enumerate(langs) if lang == "es"]  # 6 rows, 4 unique images
    first_img = [es[0], es[1], es[2], es[3]]
    direct = retrieval_metrics(a[es], b[first_img], [labels[i] for i in es], [labels[i] for i in first_img])
    assert res["es"]["text->image"] == direct
    assert res["es"]["text->image"]["num_queries"] == 6  # texts not deduplicated (no a_keys)
    assert res["es"]["image->text"]["num_queries"] == 4  # images deduplicated by b_keys
    no_dedup = per_language_retrieval(a, b, labels, langs)
    assert no_dedup["es"]["b->a"]["num_queries"] == 6


def test_dedup_counts_a_repeated_negative_once():
    # Text of concept 1 is closer to the image of concept 0, which is repeated on 3 rows.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels, langs = [0, 0, 0, 1], ["en"] * 4
    b = img[[0, 0, 0, 1]]
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.9, 0.5]])
    keys = ["0.png", "0.png", "0.png", "1.png"]
    dedup = per_language_retrieval(a, b, labels, langs, b_keys=keys, ks=(1,))["en"]["a->b"]
    plain = per_language_retrieval(a, b, labels, langs, ks=(1,))["en"]["a->b"]
    assert dedup["meanR"] == pytest.approx((1 + 1 + 1 + 2) / 4)  # one negative above the positive
    assert plain["meanR"] == pytest.approx((1 + 1 + 1 + 4) / 4)  # the repeated image counted 3 times


def test_per_language_errors():
    a, b, labels, langs, b_keys = _toy_pairs()
    with pytest.raises(ValueError, match=r"requested languages \['xx'\] have no rows"):
        per_language_retrieval(a, b, labels, langs, languages=["en", "xx"])
    with pytest.raises(ValueError, match="no rows"):
        per_language_retrieval(a[:0], b[:0], [], [])
    bad_keys = ["same.png"] * len(labels)
    with pytest.raises(ValueError, match="key 'same.png' has two labels"):
        per_language_retrieval(a, b, labels, langs, b_keys=bad_keys)
    with pytest.raises(ValueError, match="langs has 3 rows"):
        per_language_retrieval(a, b, labels, langs[:3])


def test_cross_lingual_matrix():
    torch.manual_seed(5)
    concept = torch.randn(5, 16)
    labels = list(range(5)) * 3
    langs = ["en"] * 5 + ["es"] * 5 + ["de"] * 5
    embeds = torch.cat([concept, concept + 0.01 * torch.randn(5, 16), torch.randn(5, 16)])  # de is unrelated
    res = cross_lingual_retrieval(embeds, langs, labels)
    assert res["languages"] == ["en", "es", "de"]
    m = res["matrix"]
    assert m[0][0] is None and m[1][1] is None and m[2][2] is None
    assert m[0][1] == 1.0 and m[1][0] == 1.0
    assert res["pairs"]["en->de"]["R@1"] == m[0][2] < 1.0
    with pytest.raises(ValueError, match="at least two languages"):
        cross_lingual_retrieval(embeds[:5], langs[:5], labels[:5])


# ---------------------------------------------------------------------------------------------
# xsim
# ---------------------------------------------------------------------------------------------

# cos(src_i, tgt_j): target 1 is a hub, closer to source 0 (0.90) than source 0's translation (0.80).
HUB = [
    [0.80, 0.90, 0.10, 0.10],
    [0.10, 0.95, 0.10, 0.10],
    [0.10, 0.85, 0.90, 0.10],
    [0.10, 0.85, 0.10, 0.90],
]


def test_xsim_margin_fixes_hub():
    src, tgt = sims(HUB)
    assert xsim_errors(src, tgt, margin=None, normalize=False).tolist() == [True, False, False, False]
    assert xsim_error_rate(src, tgt, margin=None, normalize=False) == 0.25
    # k=2: src0 -> tgt0 margin 0.8 / ((0.85 + 0.45) / 2) = 1.23 beats the hub 0.9 / ((0.85 + 0.925) / 2) = 1.01.
    assert xsim_error_rate(src, tgt, margin="ratio", k=2, normalize=False) == 0.0
    assert xsim_error_rate(src, tgt, margin="distance", k=2, normalize=False) == 0.0
    # k=1: the only cosine candidate of src0 is the hub, so margin cannot fix it (LASER candidate rule).
    assert xsim_errors(src, tgt, margin="ratio", k=1, normalize=False).tolist() == [True, False, False, False]


def test_xsim_identity_collapse_and_chunking():
    torch.manual_seed(6)
    x = torch.randn(50, 8)
    for margin in (None, "ratio", "distance"):
        assert xsim_error_rate(x, x.clone(), margin=margin) == 0.0
        # Collapsed embeddings: everything ties -> every source is an error (pessimistic).
        assert xsim_error_rate(torch.ones(5, 3), torch.ones(5, 3), margin=margin) == 1.0
    y = x + 1.5 * torch.randn(50, 8)
    for margin in (None, "ratio"):
        full = xsim_errors(x, y, margin=margin, chunk_size=1000)
        assert torch.equal(full, xsim_errors(x, y, margin=margin, chunk_size=3))
        assert 0 < full.float().mean() < 1
    with pytest.raises(ValueError, match="same shape"):
        xsim_error_rate(x, y[:10])
    with pytest.raises(ValueError, match="margin must be"):
        xsim_error_rate(x, y, margin="max")


# ---------------------------------------------------------------------------------------------
# zero-shot
# ---------------------------------------------------------------------------------------------


def test_zero_shot_accuracy_known_answers():
    weights = torch.eye(6)  # class c = basis vector c
    images = torch.tensor(
        [
            [1.0, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
            [0.9, 0.5, 0.8, 0.0, 0.0, 0.0],  # label 1: rank 3
            [0.6, 0.5, 0.0, 0.4, 0.3, 0.2],  # label 2: rank 6
        ]
    )
    acc = zero_shot_accuracy(images, [0, 1, 2], weights, ks=(1, 5))
    assert acc == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}
    per_lang = zero_shot_accuracy(images, [0, 1, 2], {"en": weights, "de": weights[[1, 0, 2, 3, 4, 5]]})
    assert per_lang["en"]["top1"] == pytest.approx(1 / 3)
    # Classes 0 and 1 swapped: image 0 drops to rank 2, image 1 rises to rank 1.
    assert per_lang["de"] == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="out of range"):
        zero_shot_accuracy(images, [0, 1, 6], weights)


def test_zero_shot_classifier_averages_normalised_templates():
    vocab = {"cat": 0, "dog": 1, "gato": 0, "perro": 1}
    calls = []

    def encode(texts, lang):
        calls.append((lang, list(texts)))
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            word = next(w for w in vocab if w in t.split(" ") or w + "." in t.split(" "))
            out[i, vocab[word]] = 3.0  # scale is removed by normalisation
            out[i, 2 + (i % 2)] = 1.0  # template-dependent component (two templates)
        return out

    temps = {"en": ["a {}.", "the {}."], "es": ["un {}.", "el {}."]}
    w = zero_shot_classifier(encode, {"en": ["cat", "dog"], "es": ["gato", "perro"]}, temps, batch_size=3)
    assert set(w) == {"en", "es"} and w["en"].shape == (2, 4)
    assert {lang for lang, _ in calls} == {"en", "es"}
    assert calls[0][1] == ["a cat.", "the cat.", "a dog."]
    t0 = torch.nn.functional.normalize(torch.tensor([3.0, 0, 1, 0]), dim=0)
    t1 = torch.nn.functional.normalize(torch.tensor([3.0, 0, 0, 1]), dim=0)
    expected = torch.nn.functional.normalize((t0 + t1) / 2, dim=0)
    assert torch.allclose(w["en"][0], expected, atol=1e-6)
    assert torch.allclose(w["es"], w["en"], atol=1e-6)
    images = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    assert zero_shot_accuracy(images, [0, 1], w, ks=(1,)) == {"en": {"top1": 1.0}, "es": {"top1": 1.0}}


def test_zero_shot_templates_defaults_and_errors():
    langs = "en es ja ko pt it fr de fa id zh ru tr ar".split()
    assert set(DEFAULT_TEMPLATES) == set(langs)
    assert all(t.count("{}") == 1 for ts in DEFAULT_TEMPLATES.values() for t in ts)
    seen = []
    encode = lambda texts: (seen.extend(texts), torch.randn(len(texts), 5))[1]  # noqa: E731  (no lang kwarg)
    w = zero_shot_classifier(encode, {"ja": ["猫", "犬"]})
    assert w["ja"].shape == (2, 5) and "猫の写真。" in seen
    with pytest.raises(ValueError, match="no prompt templates for language 'xx'"):
        zero_shot_classifier(encode, {"xx": ["a"]})
    with pytest.raises(ValueError, match="has no '\\{\\}' placeholder"):
        zero_shot_classifier(encode, {"en": ["a"]}, {"en": ["a photo"]})


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def test_write_report_files(tmp_path):
    a, b, labels, langs, b_keys = _toy_pairs()
    results = {
        "retrieval": per_language_retrieval(a, b, labels, langs, b_keys=b_keys, a_name="text", b_name="image"),
        "cross_lingual": cross_lingual_retrieval(a, langs, labels),
        "xsim": {"es->en": xsim_error_rate(a[4:8], a[:4])},
        "zeroshot": {"en": {"top1": 0.5, "top5": 1.0}},
        "extra": {"tensor": torch.tensor([1.0, float("nan")])},
    }
    paths = write_report(results, tmp_path / "out", embeddings={"text": a, "image": b}, langs={"text": langs, "image": langs})
    assert set(paths) == {"metrics", "report", "recall_at_1", "cross_lingual", "projection"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["metrics"].read_text())
    assert saved["retrieval"]["es"]["text->image"]["R@1"] == results["retrieval"]["es"]["text->image"]["R@1"]
    assert saved["extra"]["tensor"] == [1.0, None] and saved["cross_lingual"]["matrix"][0][0] is None
    md = paths["report"].read_text()
    assert "### text->image" in md and "### image->text" in md
    assert "| lang | R@1 | R@5 | R@10 | MRR | medR |" in md
    assert "| es |" in md and "xsim error rate" in md and "Zero-shot" in md and "(projection.png)" in md
    # Retrieval-only results, no embeddings: just the JSON, the Markdown and the bar chart.
    only = write_report({"retrieval": results["retrieval"]}, tmp_path / "only")
    assert set(only) == {"metrics", "report", "recall_at_1"}


def test_dense_mask_fallback_equals_index_path(monkeypatch):
    import mmalign.evaluation.retrieval as retrieval_mod

    torch.manual_seed(7)
    q, g = torch.randint(-2, 3, (40, 5)).float(), torch.randint(-2, 3, (30, 5)).float()
    q_lab, g_lab = torch.randint(0, 6, (40,)), torch.arange(30) % 6
    fast = retrieval_ranks(q, g, q_lab, g_lab, chunk_size=9)
    # A label with huge positive lists makes the padded index too big -> dense [chunk, G] mask path.
    monkeypatch.setattr(retrieval_mod, "_positive_index", lambda *args, **kwargs: None)
    assert torch.equal(fast, retrieval_ranks(q, g, q_lab, g_lab, chunk_size=9))
