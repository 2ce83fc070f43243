"""Frozen pretrained encoders behind one interface (see :class:`encoders.base.Encoder`).

Families: open_clip image/text towers, timm image models, transformers CLIP/SigLIP vision, transformers
text encoders (XLM-R, LaBSE, mE5, MiniLM...), Whisper, wav2vec2/HuBERT, and the packaged real
encoders of the offline benchmark (USE-m, mE5-small). ``list_encoders()`` lists the families and
``list_models()`` the offline ``tiny:``/``packaged:`` model names (both from :mod:`encoders.registry`).
"""

from encoders.base import Encoder, EncoderOutput, Modality
from encoders.hf_text import HFTextEncoder
from encoders.hf_vision import HFVisionEncoder
from encoders.open_clip_encoders import OpenClipImageEncoder, OpenClipTextEncoder
from encoders.packaged_text import MultilingualE5Small, UniversalSentenceEncoderM
from encoders.registry import EncoderFamily, list_encoders, list_models
from encoders.timm_image import TimmImageEncoder
from encoders.tiny import known_tiny_models, resolve_model_path
from encoders.utils import masked_mean
from encoders.wav2vec2 import Wav2Vec2SpeechEncoder
from encoders.whisper import WhisperSpeechEncoder

__all__ = [
    "Encoder", "EncoderFamily", "EncoderOutput", "HFTextEncoder", "HFVisionEncoder", "Modality", "MultilingualE5Small",
    "OpenClipImageEncoder", "OpenClipTextEncoder", "TimmImageEncoder", "UniversalSentenceEncoderM",
    "Wav2Vec2SpeechEncoder", "WhisperSpeechEncoder", "known_tiny_models", "list_encoders", "list_models", "masked_mean",
    "resolve_model_path",
]
