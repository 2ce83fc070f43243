"""projectors.CascadeResidual: training starts at the in-space tail of the features and learns a correction."""

from __future__ import annotations

import pytest
import torch

from encoders.base import EncoderOutput
from projectors import CascadeResidual


def test_starts_at_the_tail_embedding_and_learns_a_correction():
    torch.manual_seed(0)
    head = CascadeResidual(12, 4, hidden_dim=16)
    x = torch.randn(32, 12)
    head.train()
    torch.testing.assert_close(head(EncoderOutput(pooled=x)), x[:, -4:])  # zero-initialised output layer
    target = x[:, -4:] + 0.5 * x[:, :4]  # what the tail misses is in the other features
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(head(EncoderOutput(pooled=x)), target)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2 * first
    assert head.num_parameters == sum(p.numel() for p in head.parameters())


def test_refuses_features_without_an_in_space_tail():
    with pytest.raises(ValueError, match="last 8 features"):
        CascadeResidual(4, 8)


def test_rebuilds_from_its_config():
    head = CascadeResidual(12, 4, hidden_dim=16, dropout=0.0)
    with torch.no_grad():
        head.fc_out.weight.normal_()
    cfg = head.config()
    assert cfg["class_path"] == "projectors.residual.CascadeResidual"
    again = CascadeResidual(**cfg["init_args"])
    again.load_state_dict(head.state_dict())
    x = EncoderOutput(pooled=torch.randn(3, 12))
    head.eval(), again.eval()
    torch.testing.assert_close(again(x), head(x))


def test_fused_cascade_tower_exports_and_embeds_alike(tmp_path):
    """A speech tower = ASR cascade (decoder+transcript, candidate languages) + CascadeResidual: exported, loaded back
    through the untrusted-export loader, it embeds a clip as the trained module does."""
    import numpy as np

    from mmalign.export import AlignedModel, export_module
    from mmalign.recipe import build, load_config

    cfg = load_config("sonar_speech", variant="tiny")
    speech = cfg["model"]["init_args"]["towers"]["speech"]["init_args"]
    speech["encoder"] = {"class_path": "encoders.cascade.WhisperCascadeEncoder", "init_args": {
        "model_name_or_path": "tiny:whisper-asr", "text_encoder": "encoders.HFTextEncoder",
        "text_encoder_args": {"model_name_or_path": "tiny:bert-text"}, "language": ["en", "de"], "max_new_tokens": 4,
        "pad_seconds": 0.5, "output": "decoder+transcript"}}
    speech["projector"] = {"class_path": "projectors.CascadeResidual", "init_args": {"hidden_dim": 16}}
    speech["lr_scale"] = 0.1
    model, _ = build(cfg, seed=0)
    tower = model.towers["speech"]
    with torch.no_grad():  # a trained-looking correction, so the export must carry real weights
        tower.projector.fc_out.weight.normal_()
    model.eval()
    export_module(model, tmp_path / "export")
    loaded = AlignedModel.from_pretrained(tmp_path / "export")
    sr = 16_000
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    with torch.no_grad():
        want = tower(tower.encoder.preprocess([wave], sampling_rate=sr))
    got = torch.as_tensor(loaded.embed_speech([wave], sampling_rate=sr)).float()
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_correction_scale_interpolates_outside_training_only():
    """``correction_scale`` weighs the learned correction at eval time (WiSE-FT between cascade and tower); training
    always sees the full correction, and the scale travels in the projector's config (so in checkpoints and exports)."""
    torch.manual_seed(0)
    full = CascadeResidual(12, 4, hidden_dim=16, dropout=0.0)
    with torch.no_grad():
        full.fc_out.weight.normal_()
    half = CascadeResidual(**{**full.config()["init_args"], "correction_scale": 0.5})
    half.load_state_dict(full.state_dict())
    x = EncoderOutput(pooled=torch.randn(5, 12))
    tail = x.pooled[:, -4:]
    full.eval(), half.eval()
    torch.testing.assert_close(half(x), tail + 0.5 * (full(x) - tail))
    assert half.config()["init_args"]["correction_scale"] == 0.5
    zero = CascadeResidual(12, 4, hidden_dim=16, dropout=0.0, correction_scale=0.0)
    zero.load_state_dict(full.state_dict())
    zero.eval()
    torch.testing.assert_close(zero(x), tail)  # the untrained cascade
    half.train(), full.train()
    torch.testing.assert_close(half(x), full(x))  # training learns the whole correction
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="correction_scale"):
            CascadeResidual(12, 4, correction_scale=bad)
