"""mmalign: align frozen image, speech and multilingual text encoders with small projectors."""

from mmalign.losses import ClipLoss, CosineLoss, LogitScale, MSELoss, SigLipLoss
from mmalign.module import AlignmentModule
from mmalign.towers import Objective, Tower

__all__ = ["AlignmentModule", "ClipLoss", "CosineLoss", "LogitScale", "MSELoss", "Objective", "SigLipLoss", "Tower"]
__version__ = "0.1.0"
