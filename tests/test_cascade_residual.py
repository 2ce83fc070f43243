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
