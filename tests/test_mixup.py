"""Latent mixup (FuseMix) on cached features: one lambda and one partner shared by every tower of a row."""

import pytest
import torch

import encoders
import projectors
from encoders.base import EncoderOutput
from mmalign import AlignmentModule, MSELoss, Objective, Tower
from mmalign.training.mixup import mix_features, mixup_batch, mixup_permutation, sample_beta


def cached_batch(n=8, d_a=5, d_b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_a, generator=g)
    return {"meta": {"id": [f"r{i}" for i in range(n)], "concept": [f"c{i}" for i in range(n)]},
            "features": {"student": {"pooled": a.half()}, "teacher": {"pooled": (a[:, :d_b] * 2).half()}}}


def test_lambda_and_partner_shared_by_both_towers_and_shapes_kept():
    batch = cached_batch()
    out = mixup_batch(batch, alpha=1.0, generator=torch.Generator().manual_seed(3))
    lam = out["mixup_lambda"]
    assert 0.0 < lam < 1.0
    a, b = out["features"]["student"]["pooled"], out["features"]["teacher"]["pooled"]
    assert a.shape == (8, 5) and b.shape == (8, 3)
    # the teacher was 2x the student's first columns: still so after mixing iff lambda and permutation are shared
    torch.testing.assert_close(b, 2 * a[:, :3], rtol=1e-3, atol=1e-3)
    src = batch["features"]["student"]["pooled"].float()
    # every mixed row is lam * row + (1 - lam) * some row of the batch
    partner = (a - lam * src) / (1 - lam)
    assert torch.cdist(partner, src).min(1).values.max() < 1e-2
    assert not torch.allclose(a, src)  # a permutation of 8 rows almost surely moves one
    assert batch["features"]["student"]["pooled"].dtype == torch.float16  # input batch untouched


def test_deterministic_with_seed():
    x = mixup_batch(cached_batch(), 1.0, torch.Generator().manual_seed(7))
    y = mixup_batch(cached_batch(), 1.0, torch.Generator().manual_seed(7))
    z = mixup_batch(cached_batch(), 1.0, torch.Generator().manual_seed(8))
    assert x["mixup_lambda"] == y["mixup_lambda"] != z["mixup_lambda"]
    assert torch.equal(x["features"]["student"]["pooled"], y["features"]["student"]["pooled"])
    torch.manual_seed(0)
    u = mixup_batch(cached_batch(), 1.0)
    torch.manual_seed(0)
    v = mixup_batch(cached_batch(), 1.0)
    assert torch.equal(u["features"]["teacher"]["pooled"], v["features"]["teacher"]["pooled"])


def test_beta_draws_follow_beta_alpha_alpha():
    g = torch.Generator().manual_seed(0)
    one = torch.tensor([sample_beta(1.0, g) for _ in range(3000)])
    assert abs(one.mean() - 0.5) < 0.03 and abs(one.var() - 1 / 12) < 0.01  # Beta(1,1) = U(0,1)
    small = torch.tensor([sample_beta(0.2, g) for _ in range(3000)])
    assert abs(small.var() - 0.25 / 1.4) < 0.03  # Beta(a,a) variance 1 / (4 (2a + 1))


def test_partial_rows_mix_only_with_rows_holding_the_same_towers():
    present = {"image": torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool), "text": torch.ones(6, dtype=torch.bool)}
    perm = mixup_permutation(present, 6, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(6))
    assert all(present["image"][perm[i]] == present["image"][i] for i in range(6))
    img = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 2)  # features of the 3 present image rows
    feats = {"image": EncoderOutput(pooled=img, tokens=img[:, None, :].repeat(1, 4, 1), mask=torch.ones(3, 4, dtype=torch.bool))}
    out = mix_features(feats, 0.25, perm, present)["image"]
    assert out.pooled.shape == (3, 2) and out.tokens.shape == (3, 4, 2)
    rank = {row: k for k, row in enumerate([0, 1, 4])}
    expect = torch.tensor([0.25 * k + 0.75 * rank[int(perm[row])] for k, row in enumerate([0, 1, 4])])
    torch.testing.assert_close(out.pooled[:, 0], expect)


def test_off_by_default_and_needs_cached_features():
    def module(alpha=None):
        torch.manual_seed(0)
        student = Tower(encoders.HFTextEncoder("tiny:xlmr-text"), field="text", projector=projectors.Linear)
        teacher = Tower(encoders.HFTextEncoder("tiny:xlmr-text"), field="text_en")
        return AlignmentModule({"student": student, "teacher": teacher}, [Objective(MSELoss(), ["student", "teacher"])],
                               mixup_alpha=alpha)

    plain = module()
    assert plain.hparams.mixup_alpha is None
    d_s, d_t = plain.towers["student"].encoder.output_dim, plain.towers["teacher"].encoder.output_dim
    g = torch.Generator().manual_seed(0)
    batch = {"meta": {"id": list("abcd"), "concept": list("abcd")},
             "features": {"student": {"pooled": torch.randn(4, d_s, generator=g)}, "teacher": {"pooled": torch.randn(4, d_t, generator=g)}}}
    torch.manual_seed(1)
    off = plain.training_step(batch, 0)
    torch.manual_seed(1)
    assert torch.equal(off, module().training_step(batch, 0))  # mixup off: the plain step
    torch.manual_seed(1)
    mixed = module(1.0).training_step(batch, 0)
    assert not torch.allclose(mixed, off)
    with pytest.raises(ValueError, match="cached features"):
        module(1.0).training_step({"meta": {"id": ["a"]}, "inputs": {}}, 0)


def test_mixup_study_keeps_mixup_only_beyond_the_seed_spread():
    """benchmarks.studies.mixup: the decision and its docs/results.md row (mean ± std, gain, verdict)."""
    from benchmarks.studies.mixup import summarise, table_md

    def arm(vals):
        return [{"val": v, "test": v - 0.1} for v in vals]

    level = summarise({"no mixup": arm([0.50, 0.52, 0.54]), "mixup alpha 1": arm([0.52, 0.54, 0.56])})
    win = summarise({"no mixup": arm([0.50, 0.51, 0.52]), "mixup alpha 1": arm([0.60, 0.61, 0.62])})
    assert not level["keep_mixup"] and win["keep_mixup"]
    md = table_md({"results": {"level": {**level, "command": "cmd A"}, "win": win, "gone": {"skipped": "no cache"}}})
    rows = md.splitlines()[2:]
    assert "0.520 ± 0.020" in rows[0] and "+0.020" in rows[0] and "within the spread 0.040" in rows[0] and "`cmd A`" in rows[0]
    assert rows[1].endswith("| +0.100 | yes |") and "skipped: no cache" in rows[2]
