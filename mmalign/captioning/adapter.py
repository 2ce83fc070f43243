"""Frame-stacking MLP adapter for speech prefixes (SLAM-ASR / S2ST-Omni style).

Speech encoders give many frames per second (Whisper: 50, wav2vec2: 50); an LM prefix of that length is
slow and long. Stacking ``k`` consecutive frames into one vector and mapping it with a small MLP gives
``T / k`` prefix embeddings (Ma et al., 2024, "An Embarrassingly Simple Approach for LLM with Strong ASR
Capacity": ``k = 5``, Linear-ReLU-Linear; the speech adapters of S2ST-Omni and Qwen-Audio downsample the
same way). The padding mask is downsampled with the tokens, so a batch of clips of different lengths keeps
its per-clip prefix lengths.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import EncoderOutput
from projectors.base import Projector


class FrameStackMLP(Projector):
    """``k`` consecutive frames -> one LM embedding: per-frame LayerNorm, stack, ``Linear-GELU-Linear``.

    Args:
        in_dim: Encoder frame size.
        out_dim: LM hidden size.
        stack: Frames per prefix token (``k``); a clip of ``T`` frames gives ``ceil(T / k)`` tokens.
        hidden_dim: Hidden width (default ``out_dim``).

    ``forward`` returns ``[B, ceil(T / k), out_dim]``; :meth:`output_mask` maps the frame mask ``[B, T]`` to
    the token mask (a token is real when any of its frames is). Padding frames are zeroed before stacking,
    so a clip's prefix never depends on what pads it in a batch.
    """

    uses_tokens = True
    per_token = True  # the prefix has one mask entry per output token (see output_mask)

    def __init__(self, in_dim: int, out_dim: int, stack: int = 4, hidden_dim: int | None = None) -> None:
        super().__init__(in_dim, out_dim)
        if stack < 1:
            raise ValueError(f"stack must be >= 1 frames per token, got {stack}")
        self.stack = stack
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(stack * in_dim, hidden_dim or out_dim)
        self.fc2 = nn.Linear(hidden_dim or out_dim, out_dim)

    def _pad(self, x: Tensor) -> Tensor:
        """Right-pad dim 1 to a multiple of ``stack`` (zeros / False)."""
        extra = -x.shape[1] % self.stack
        if not extra:
            return x
        pad = [0, 0] * (x.dim() - 2) + [0, extra]
        return F.pad(x, pad)

    def output_mask(self, mask: Tensor) -> Tensor:
        """``[B, T]`` bool frame mask -> ``[B, ceil(T / k)]`` token mask."""
        m = self._pad(mask.bool())
        return m.view(m.shape[0], -1, self.stack).any(-1)

    def forward(self, features: EncoderOutput) -> Tensor:
        if features.tokens is None:
            raise ValueError("FrameStackMLP maps encoder frames but the encoder output has no tokens")
        x = self.norm(features.tokens)  # [B, T, D]
        if features.mask is not None:
            x = x * features.mask.to(x.device, x.dtype)[..., None]  # padding frames contribute nothing
        x = self._pad(x)
        B, T, D = x.shape
        x = x.reshape(B, T // self.stack, self.stack * D)  # [B, T/k, k*D]
        return self.fc2(F.gelu(self.fc1(x)))  # [B, T/k, out_dim]


__all__ = ["FrameStackMLP"]
