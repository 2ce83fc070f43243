"""Every projector in projectors/: output shapes, padding invariance, parameter counts, config round trip.

``CASES`` holds one or more configurations per projector class; a test fails when a Projector class
exported by :mod:`projectors` has none, so a new projector is tested by adding it here.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import projectors
from encoders.base import EncoderOutput
from projectors import AttentionPool, CascadeResidual, FramePoolMLP, Identity, Linear, MLP, Projector, Resampler, TokenMLP, count_parameters

B, T, IN, OUT = 3, 7, 12, 10


def _mlp_block(d: int, h: int, norm: bool = True) -> int:
    """``MLPBlock(d, h)``: norm, ``d -> h``, ``h -> d``."""
    return (2 * d if norm else 0) + (d * h + h) + (h * d + d)


def _cross_block(h: int, kv: int) -> int:
    """``CrossAttentionBlock(h, kv)``: two LayerNorms, attention with ``kdim = vdim = kv``, residual MLP."""
    attention = h * h + 2 * h * kv + 3 * h + (h * h + h)  # q, k, v projections + biases, out projection
    return 2 * h + 2 * kv + attention + _mlp_block(h, 4 * h)


def _encoder_layer(h: int) -> int:
    """``nn.TransformerEncoderLayer(h, heads, 4h)``: self-attention, feed-forward, two LayerNorms."""
    return (3 * h * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 4 * h


#: (id, class, init kwargs beyond in_dim/out_dim, hand-counted parameters, output shape).
CASES = [
    ("identity", Identity, {}, 0, (B, IN)),
    ("linear", Linear, {}, IN * OUT + OUT, (B, OUT)),
    ("linear-nobias", Linear, {"bias": False}, IN * OUT, (B, OUT)),
    ("mlp", MLP, {"hidden_dim": 16, "num_blocks": 2},
     2 * IN + (IN * 16 + 16) + 2 * _mlp_block(16, 32) + (16 * OUT + OUT), (B, OUT)),
    ("mlp-plain", MLP, {"num_blocks": 0, "norm": "none", "input_norm": False},
     (IN * IN + IN) + (IN * OUT + OUT), (B, OUT)),  # hidden_dim defaults to max(in, out)
    ("mlp-batchnorm", MLP, {"hidden_dim": 8, "num_blocks": 1, "norm": "batch"},
     2 * IN + (IN * 8 + 8) + _mlp_block(8, 16) + (8 * OUT + OUT), (B, OUT)),
    ("attention-pool", AttentionPool, {"num_queries": 2, "num_heads": 2, "hidden_dim": 8},
     2 * 8 + _cross_block(8, IN) + 2 * 8 + (8 * OUT + OUT), (B, OUT)),
    ("attention-pool-default", AttentionPool, {"num_heads": 4},  # hidden_dim = in_dim: fused in_proj, same count
     IN + _cross_block(IN, IN) + 2 * IN + (IN * OUT + OUT), (B, OUT)),
    ("resampler", Resampler, {"num_queries": 4, "depth": 2, "hidden_dim": 8, "num_heads": 2},
     4 * 8 + 2 * (_cross_block(8, IN) + _encoder_layer(8)) + 2 * 8 + (8 * OUT + OUT), (B, 4, OUT)),
    ("resampler-pooled", Resampler, {"num_queries": 3, "depth": 1, "hidden_dim": 8, "num_heads": 2, "pool": True},
     3 * 8 + _cross_block(8, IN) + _encoder_layer(8) + 2 * 8 + (8 * OUT + OUT), (B, OUT)),
    ("token-mlp", TokenMLP, {"hidden_dim": 16},
     2 * IN + (IN * 16 + 16) + (16 * OUT + OUT), (B, T, OUT)),
    ("token-mlp-pooled", TokenMLP, {"num_tokens": 2},  # hidden_dim defaults to out_dim
     2 * IN + (IN * OUT + OUT) + (OUT * OUT + OUT), (B, 2, OUT)),
    # the MLP head reads [mean, 2 segment means, 1 attentive mean] = 4 * IN; the scorer: LayerNorm, IN -> 4 -> 1 head
    ("frame-pool-mlp", FramePoolMLP, {"segments": 2, "attention_heads": 1, "attention_dim": 4, "hidden_dim": 8,
                                      "dropout": 0.0},
     2 * 4 * IN + (4 * IN * 8 + 8) + (8 * OUT + OUT) + 2 * IN + (IN * 4 + 4) + (4 * 1 + 1), (B, OUT)),
    ("frame-pool-mean-only", FramePoolMLP, {"segments": 0, "hidden_dim": 8, "dropout": 0.0},
     2 * IN + (IN * 8 + 8) + (8 * OUT + OUT), (B, OUT)),
    # the last OUT input features + a BatchNorm MLP correction: input BatchNorm, IN -> 8 -> OUT
    ("cascade-residual", CascadeResidual, {"hidden_dim": 8, "dropout": 0.0},
     2 * IN + (IN * 8 + 8) + (8 * OUT + OUT), (B, OUT)),
]
IDS = [c[0] for c in CASES]


def _build(cls, kwargs) -> Projector:
    torch.manual_seed(0)
    out_dim = IN if cls is Identity else OUT
    return cls(IN, out_dim, **kwargs).eval()


def _features(lengths=(7, 4, 1), pad_to: int = T, seed: int = 0) -> EncoderOutput:
    """Tokens ``[B, pad_to, IN]`` whose rows hold ``lengths`` real tokens; the rest is padding noise."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), pad_to, IN, generator=g)
    mask = torch.arange(pad_to)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    return EncoderOutput(pooled=torch.randn(len(lengths), IN, generator=g), tokens=tokens, mask=mask)


def test_every_projector_has_a_case():
    exported = {getattr(projectors, n) for n in projectors.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, Projector) and c is not Projector}
    assert classes == {c[1] for c in CASES}


@pytest.mark.parametrize("name,cls,kwargs,params,shape", CASES, ids=IDS)
def test_output_shape(name, cls, kwargs, params, shape):
    proj = _build(cls, kwargs)
    out = proj(_features())
    assert out.shape == shape and torch.isfinite(out).all()
    assert proj.uses_tokens == (len(shape) == 3 or cls in (AttentionPool, Resampler, FramePoolMLP))


@pytest.mark.parametrize("name,cls,kwargs,params,shape", CASES, ids=IDS)
def test_parameter_count_matches_hand_formula(name, cls, kwargs, params, shape):
    proj = _build(cls, kwargs)
    assert proj.num_parameters == count_parameters(proj) == params
    assert f"params={params:,}" in repr(proj)


@pytest.mark.parametrize("name,cls,kwargs,params,shape", CASES, ids=IDS)
def test_config_round_trip(name, cls, kwargs, params, shape):
    """``config()`` -> JSON -> rebuild -> same weights loaded -> same outputs."""
    proj = _build(cls, kwargs)
    config = json.loads(json.dumps(proj.config()))  # as an export's config.json holds it
    module, _, qualname = config["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), qualname) is cls
    assert config["init_args"]["in_dim"] == IN and all(config["init_args"][k] == v for k, v in kwargs.items())
    torch.manual_seed(1)  # other initial weights: the loaded state must be what makes outputs equal
    rebuilt = cls(**config["init_args"]).eval()
    rebuilt.load_state_dict(proj.state_dict())
    assert rebuilt.config() == config
    features = _features()
    torch.testing.assert_close(rebuilt(features), proj(features), atol=0, rtol=0)


@pytest.mark.parametrize("name,cls,kwargs,params,shape", [c for c in CASES if c[1] in (AttentionPool, Resampler)],
                         ids=[c[0] for c in CASES if c[1] in (AttentionPool, Resampler)])
def test_attention_pooling_ignores_padding(name, cls, kwargs, params, shape):
    proj = _build(cls, kwargs)
    short = _features(pad_to=T)
    out = proj(short)
    # More padding, filled with other noise: the masked keys never change a row's output.
    longer = _features(pad_to=T + 5, seed=1)
    longer.tokens[:, :T][short.mask] = short.tokens[short.mask]
    torch.testing.assert_close(proj(longer), out, atol=1e-5, rtol=1e-5)
    # Each row alone, cut to its real tokens, gives the same output as inside the padded batch.
    for i, n in enumerate(short.mask.sum(dim=1).tolist()):
        alone = EncoderOutput(pooled=short.pooled[i : i + 1], tokens=short.tokens[i : i + 1, :n],
                              mask=torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(proj(alone)[0], out[i], atol=1e-5, rtol=1e-5)
    # No mask means every token is real.
    full = _features(lengths=(T, T, T))
    torch.testing.assert_close(proj(EncoderOutput(full.pooled, full.tokens, None)), proj(full), atol=1e-6, rtol=1e-6)


def test_token_mlp_is_per_token():
    """Without ``num_tokens`` a token's output depends on that token only (padding rows stay apart);
    with ``num_tokens`` tokens are average-pooled in windows, which assumes unpadded (image) tokens."""
    proj = _build(TokenMLP, {"hidden_dim": 16})
    features = _features()
    out = proj(features)
    other = _features(seed=1)
    other.tokens[features.mask] = features.tokens[features.mask]
    torch.testing.assert_close(proj(other)[features.mask], out[features.mask], atol=0, rtol=0)


@pytest.mark.parametrize("cls,kwargs", [(AttentionPool, {}), (Resampler, {"hidden_dim": 8, "num_heads": 2}),
                                        (TokenMLP, {})])
def test_token_projectors_need_tokens(cls, kwargs):
    proj = _build(cls, kwargs)
    with pytest.raises(ValueError, match="tokens"):
        proj(EncoderOutput(pooled=torch.zeros(2, IN)))
