"""A learned correction on top of an embedding that is already in the shared space (the ASR cascade's)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from encoders.base import EncoderOutput
from projectors.mlp import MLP, Norm


class CascadeResidual(MLP):
    """``pooled[:, -out_dim:] + MLP(pooled)``, the MLP's output layer zero-initialised.

    For encoders whose pooled features END with an embedding that is already in the shared space, e.g.
    :class:`~encoders.cascade.WhisperCascadeEncoder` with ``output="decoder+transcript"``: ``[Whisper decoder state,
    text-encoder embedding of the transcript]``. Training starts exactly at that embedding (the untrained ASR
    cascade) and learns only what it misses from the rest of the features; with a small learning rate it stays near
    the cascade where the training data say nothing (docs/results_speech.md, "Session 11").

    Args:
        in_dim: Encoder feature size (the in-space embedding is its last ``out_dim`` features).
        out_dim: Shared embedding size.
        hidden_dim, num_blocks, dropout, norm, input_norm: The correction MLP's (:class:`~projectors.mlp.MLP`);
            the defaults are the SONAR recipe's BatchNorm head.
        correction_scale: Weight of the learned correction OUTSIDE training (validation, test, embedding, export):
            ``tail + correction_scale * MLP(pooled)``. Training always learns the full correction (scale 1), so the
            scale never changes what is learnt; a value in (0, 1) interpolates between the untrained cascade (0)
            and the trained tower (1), WiSE-FT's weight-space ensemble (Wortsman et al., CVPR 2022), exactly: the
            correction's output layer starts at zero, so scaling the output is scaling that layer's weights.
            Choose it on validation (``benchmarks.studies.trimodal`` reports the VAL choice).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = 1024,
        num_blocks: int = 0,
        dropout: float = 0.5,
        norm: Norm = "batch",
        input_norm: bool = True,
        correction_scale: float = 1.0,
    ) -> None:
        if not math.isfinite(correction_scale) or correction_scale < 0:
            raise ValueError(f"CascadeResidual correction_scale must be a finite number >= 0, got {correction_scale!r}")
        if out_dim > in_dim:
            raise ValueError(f"CascadeResidual needs the encoder's last {out_dim} features to be an embedding of the "
                             f"shared size, but the encoder has only {in_dim}: use an encoder output such as "
                             "WhisperCascadeEncoder(output='decoder+transcript') whose tail is in the shared space")
        super().__init__(in_dim, out_dim, hidden_dim=hidden_dim, num_blocks=num_blocks, dropout=dropout, norm=norm,
                         input_norm=input_norm)
        torch.nn.init.zeros_(self.fc_out.weight)
        torch.nn.init.zeros_(self.fc_out.bias)
        self.correction_scale = float(correction_scale)

    def forward(self, features: EncoderOutput) -> Tensor:
        correction = super().forward(features)
        if not self.training and self.correction_scale != 1.0:
            correction = self.correction_scale * correction
        return features.pooled[:, -self.out_dim:] + correction
