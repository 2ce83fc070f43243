"""Small trainable modules mapping frozen encoder outputs into the shared space."""

from projectors.attention import AttentionPool, Resampler
from projectors.base import Identity, Projector, count_parameters
from projectors.frame_pool import FramePoolMLP
from projectors.linear import Linear
from projectors.mlp import MLP
from projectors.residual import CascadeResidual
from projectors.token_mlp import TokenMLP

__all__ = ["AttentionPool", "CascadeResidual", "FramePoolMLP", "Identity", "Linear", "MLP", "Projector", "Resampler", "TokenMLP", "count_parameters"]
