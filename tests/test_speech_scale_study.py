"""benchmarks/studies/speech_scale.py: the fused head's eval-time correction scale (WiSE-FT, session 15)."""

import numpy as np
import pytest
import torch


def _fused_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n, 2, 512)).astype(np.float32)  # [decoder state, cascade embedding]
    return {"means": means, "offsets": np.arange(n + 1)}, torch.as_tensor(rng.standard_normal((n, 512))).float()


def test_fused_head_correction_scale_zero_is_the_cascade_and_one_is_the_trained_head():
    from benchmarks.studies.speech_scale import train_head

    f, y = _fused_data()
    concepts = [f"c{i % 8}" for i in range(16)]
    spec = {"kind": "fused", "features": "decoder", "lr": 1e-3}
    trained = train_head(f, y, concepts, spec, seed=0, epochs=2, batch=8, threads=torch.get_num_threads())(f)
    cascade = train_head(f, y, concepts, {**spec, "correction_scale": 0.0}, seed=0, epochs=2, batch=8, threads=torch.get_num_threads())(f)
    half = train_head(f, y, concepts, {**spec, "correction_scale": 0.5}, seed=0, epochs=2, batch=8, threads=torch.get_num_threads())(f)
    tail = f["means"][:, 1]
    np.testing.assert_allclose(cascade, tail, atol=1e-6)
    assert np.abs(trained - tail).max() > 1e-3  # the head learnt a correction
    np.testing.assert_allclose(half, tail + 0.5 * (trained - tail), atol=1e-5)  # the same training, scaled at eval


def test_correction_scale_is_refused_on_heads_without_a_cascade():
    from benchmarks.studies.speech_scale import train_head

    f, y = _fused_data()
    with pytest.raises(ValueError, match="correction_scale"):
        train_head(f, y, ["a"] * 16, {"kind": "dec_mlp", "correction_scale": 0.5}, seed=0, epochs=1, threads=torch.get_num_threads())


def test_centred_head_subtracts_its_training_mean_and_carries_the_text_towers():
    from benchmarks.studies.speech_scale import train_head

    f, y = _fused_data()
    concepts = [f"c{i % 8}" for i in range(16)]
    spec = {"kind": "fused", "features": "decoder", "lr": 1e-3}
    plain = train_head(f, y, concepts, spec, seed=0, epochs=2, batch=8, threads=torch.get_num_threads())
    centred = train_head(f, y, concepts, {**spec, "center": True}, seed=0, epochs=2, batch=8, threads=torch.get_num_threads())
    out = centred(f)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)  # on the training rows
    np.testing.assert_allclose(out, plain(f) - plain(f).mean(0), atol=1e-5)  # the same training, shifted at eval
    np.testing.assert_allclose(centred.gallery_shift, y.mean(0).numpy(), atol=1e-6)
    assert not hasattr(plain, "gallery_shift")
