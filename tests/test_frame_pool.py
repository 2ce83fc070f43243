"""projectors.FramePoolMLP: mean + temporal-pyramid segment means + attentive means of frames -> MLP head."""

from __future__ import annotations

import pytest
import torch

from encoders.base import EncoderOutput
from projectors import FramePoolMLP
from projectors.frame_pool import segment_means


def _batch(lengths: list[int], dim: int = 8, pad_to: int | None = None, seed: int = 0) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    T = pad_to or max(lengths)
    tokens = torch.randn(len(lengths), T, dim, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return EncoderOutput(pooled=tokens[:, 0], tokens=tokens, mask=mask)


def test_segment_means_are_means_of_equal_spans_of_the_real_frames():
    f = _batch([6, 4], dim=3, pad_to=9)
    out = segment_means(f.tokens, f.mask, 3)  # [2, 3, 3]
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out[0, 1], f.tokens[0, 2:4].mean(0))  # 6 frames -> spans of 2
    torch.testing.assert_close(out[1, 0], f.tokens[1, 0:2].mean(0))  # 4 frames -> spans {0, 1} {2} {3}
    torch.testing.assert_close(out[1, 2], f.tokens[1, 3])
    short = segment_means(f.tokens[:, :2], torch.tensor([[True, False], [True, True]]), 3)
    assert torch.isfinite(short).all()  # fewer frames than spans: no empty span, no NaN
    torch.testing.assert_close(short[0, 2], f.tokens[0, 0])


@pytest.mark.parametrize("segments,heads", [(3, 0), (0, 2), (3, 2), (0, 0)])
def test_output_ignores_padding_and_the_rest_of_the_batch(segments, heads):
    torch.manual_seed(0)
    head = FramePoolMLP(8, 5, segments=segments, attention_heads=heads, hidden_dim=16).eval()
    f = _batch([7, 3, 5])
    out = head(f)
    assert out.shape == (3, 5)
    # the same clip alone, padded differently: same output
    alone = EncoderOutput(pooled=f.pooled[1:2], tokens=torch.cat([f.tokens[1:2, :3], torch.randn(1, 9, 8)], 1),
                          mask=torch.arange(12)[None, :] < 3)
    torch.testing.assert_close(head(alone), out[1:2], rtol=1e-5, atol=1e-5)


def test_trains_and_rebuilds_from_its_config():
    torch.manual_seed(0)
    head = FramePoolMLP(8, 4, segments=2, attention_heads=1, hidden_dim=16)
    f = _batch([5, 6, 4, 7])
    loss = head(f).pow(2).sum()
    loss.backward()
    assert head.score[0].weight.grad is not None and head.fc_in.weight.grad.abs().sum() > 0
    cfg = head.config()
    assert cfg["class_path"] == "projectors.frame_pool.FramePoolMLP"
    again = FramePoolMLP(**cfg["init_args"])
    again.load_state_dict(head.state_dict())
    assert head.uses_tokens and again.in_dim == 8 and again.fc_in.in_features == 8 * 4


def test_clear_errors():
    with pytest.raises(ValueError, match="segments and attention_heads"):
        FramePoolMLP(8, 4, segments=-1)
    with pytest.raises(ValueError, match="pools frames but the encoder output has none"):
        FramePoolMLP(8, 4)(EncoderOutput(pooled=torch.zeros(2, 8)))
