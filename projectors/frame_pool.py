"""Cheap order- and salience-aware pooling of frame sequences (speech) in front of the MLP head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from encoders.base import EncoderOutput
from projectors.mlp import MLP, Norm


def segment_means(tokens: Tensor, mask: Tensor, segments: int) -> Tensor:
    """Means of the real frames of each clip split into ``segments`` equal spans of its OWN length (padding never
    counts, so a clip's output does not depend on its batch). ``[B, T, D], [B, T] -> [B, segments, D]``.

    A clip with fewer real frames than segments repeats frames (every span holds at least one frame).
    """
    lengths = mask.sum(1).clamp(min=1)  # [B]
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :].float()  # [1, T]
    seg = (pos * segments / lengths[:, None]).floor().long()  # [B, T]: span of each frame
    onehot = (seg[..., None] == torch.arange(segments, device=tokens.device)) & mask[..., None]  # [B, T, S]
    # Spans left empty (clip shorter than segments) take the frame at their start position.
    empty = onehot.sum(1) == 0  # [B, S]
    if empty.any():
        start = (torch.arange(segments, device=tokens.device)[None, :] * lengths[:, None] / segments).long()
        onehot = onehot | (empty[:, None, :] & (pos.long()[..., None] == start[:, None, :]))
    w = onehot.to(tokens.dtype)
    return torch.einsum("bts,btd->bsd", w, tokens) / w.sum(1)[..., None]


class FramePoolMLP(MLP):
    """The :class:`~projectors.mlp.MLP` head over a richer pooling of the encoder's frames.

    The pooled vector concatenates (all masked to the real frames):

    * the mean over all frames (what ``pooling: mean`` gives the plain MLP head),
    * ``segments`` means over consecutive equal spans of the clip (a temporal pyramid: coarse word order),
    * ``attention_heads`` attentive means (weights ``softmax_t(v_h . tanh(W LayerNorm(x_t)))``, one learned
      query per head, ``attention_dim`` wide): the frames that matter, not all frames alike.

    Args:
        in_dim: Frame feature size.
        out_dim: Shared embedding size.
        segments: Spans of the temporal pyramid (0: none).
        attention_heads: Attentive-pooling heads (0: none).
        attention_dim: Width of the attention scorer.
        hidden_dim, num_blocks, dropout, norm, input_norm: The MLP head's (:class:`~projectors.mlp.MLP`).
    """

    uses_tokens = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        segments: int = 3,
        attention_heads: int = 0,
        attention_dim: int = 128,
        hidden_dim: int | None = 1024,
        num_blocks: int = 0,
        dropout: float = 0.5,
        norm: Norm = "batch",
        input_norm: bool = True,
    ) -> None:
        if segments < 0 or attention_heads < 0:
            raise ValueError(f"segments and attention_heads must be >= 0, got {segments} and {attention_heads}")
        pooled_dim = in_dim * (1 + segments + attention_heads)
        super().__init__(pooled_dim, out_dim, hidden_dim=hidden_dim, num_blocks=num_blocks, dropout=dropout,
                         norm=norm, input_norm=input_norm)
        self.in_dim = in_dim  # the frame size (the MLP inside reads the concatenation)
        self.segments, self.attention_heads = segments, attention_heads
        if attention_heads:
            self.score_norm = nn.LayerNorm(in_dim)
            self.score = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, attention_heads))

    def pool(self, features: EncoderOutput) -> Tensor:
        """``[B, in_dim * (1 + segments + attention_heads)]``: the concatenated poolings."""
        if features.tokens is None:
            raise ValueError("FramePoolMLP pools frames but the encoder output has none (an encoder with "
                             "has_tokens=True, or a feature cache that stores tokens)")
        x = features.tokens
        mask = features.mask.bool() if features.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool,
                                                                                     device=x.device)
        m = mask[..., None].to(x.dtype)
        parts = [(x * m).sum(1) / m.sum(1).clamp(min=1)]
        if self.segments:
            parts.append(segment_means(x, mask, self.segments).flatten(1))
        if self.attention_heads:
            logits = self.score(self.score_norm(x)).float()  # [B, T, H]
            logits = logits.masked_fill(~mask[..., None], float("-inf"))
            weights = logits.softmax(1).to(x.dtype)  # [B, T, H]
            parts.append(torch.einsum("bth,btd->bhd", weights, x).flatten(1))
        return torch.cat(parts, dim=1)

    def forward(self, features: EncoderOutput) -> Tensor:
        return super().forward(EncoderOutput(pooled=self.pool(features)))
