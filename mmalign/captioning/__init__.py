"""Visual-prefix captioning (mBLIP-style): frozen image encoder -> projector -> prefix of a frozen LM.

``module`` holds the LightningModule, ``lm`` the frozen LM wrapper, ``metrics`` caption loss/perplexity/chrF,
``writer`` the ``predict`` JSONL writer.
"""

from mmalign.captioning.lm import FrozenLM
from mmalign.captioning.metrics import caption_metrics, chrf, merge_eval_stores
from mmalign.captioning.module import (
    EXPORT_FORMAT,
    IGNORE,
    CaptionLoss,
    LMInputs,
    PrefixCaptioningModule,
    build_lm_inputs,
    caption_token_losses,
)
from mmalign.captioning.writer import CaptionWriter
from projectors.token_mlp import TokenMLP

__all__ = [
    "EXPORT_FORMAT", "IGNORE", "CaptionLoss", "CaptionWriter", "FrozenLM", "LMInputs", "PrefixCaptioningModule",
    "TokenMLP", "build_lm_inputs", "caption_metrics", "caption_token_losses", "chrf", "merge_eval_stores",
]
