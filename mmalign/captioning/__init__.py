"""Prefix LMs: frozen image (mBLIP-style) or speech (S2ST-Omni / SLAM-ASR style) encoder -> projector ->
prefix of a frozen LM.

``module`` holds the LightningModule (image captioning, the base of every prefix recipe), ``speech`` its
speech subclass and DataModule, ``adapter`` the frame-stacking speech adapter, ``layout`` the LM input
layout and target-only loss, ``lm`` the frozen LM wrapper, ``metrics`` loss/perplexity/chrF/WER/CER,
``writer`` the ``predict`` JSONL writer.
"""

from mmalign.captioning.adapter import FrameStackMLP
from mmalign.captioning.lm import FrozenLM
from mmalign.captioning.metrics import caption_metrics, cer, chrf, merge_eval_stores, normalize_transcript, wer
from mmalign.captioning.module import (
    EXPORT_FORMAT,
    IGNORE,
    CaptionLoss,
    LMInputs,
    PrefixCaptioningModule,
    build_lm_inputs,
    caption_token_losses,
)
from mmalign.captioning.speech import SpeechPrefixModule, SpeechTextDataModule
from mmalign.captioning.writer import CaptionWriter
from projectors.token_mlp import TokenMLP

__all__ = [
    "EXPORT_FORMAT", "IGNORE", "CaptionLoss", "CaptionWriter", "FrameStackMLP", "FrozenLM", "LMInputs",
    "PrefixCaptioningModule", "SpeechPrefixModule", "SpeechTextDataModule", "TokenMLP", "build_lm_inputs",
    "caption_metrics", "caption_token_losses", "cer", "chrf", "merge_eval_stores", "normalize_transcript", "wer",
]
