"""Frozen self-supervised speech encoders: wav2vec 2.0, HuBERT, XLS-R (via ``transformers.AutoModel``).

They read raw 16 kHz waveforms and emit one frame per 20 ms (the convolutional feature encoder's
total stride is 320 samples). Padding of a batch becomes a frame mask through the model's own
``_get_feat_extract_output_lengths``.

Two normalisation families exist, and the config says which (``feat_extract_norm``):

* ``"layer"`` (XLS-R, wav2vec2-large-lv60, HuBERT large): trained with an attention mask, so a batch
  is padded and the mask is passed to the model.
* ``"group"`` (wav2vec2-base, HuBERT base): the first convolution's GroupNorm normalises over the whole
  (padded) signal and the model must not get an attention mask, so padding would change every
  frame. These models run clip by clip, which keeps a clip's outputs independent of its batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from encoders.audio import load_batch
from encoders.base import Encoder, EncoderOutput, Modality
from encoders.tiny import resolve_model_path
from encoders.utils import POOLINGS as _POOLINGS
from encoders.utils import pool_frames, quiet_transformers, torch_dtype


class Wav2Vec2SpeechEncoder(Encoder):
    """wav2vec2 / HuBERT / XLS-R hidden states, mean-pooled over real frames.

    Args:
        model_name_or_path: Hub id (``facebook/wav2vec2-xls-r-300m``, ``facebook/hubert-base-ls960``),
            local directory, or ``tiny:wav2vec2`` / ``tiny:hubert``.
        pooling: ``"mean"`` or ``"max"`` over real frames.
        layer: Hidden state to use, indexed like ``transformers``' ``hidden_states`` tuple
            (0 = after the feature projection, ``-1`` = last). Middle layers of these models often
            carry more linguistic content than the last one.
        max_seconds: Clips are cut to this length (bounds memory; attention is quadratic).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        revision: Hub revision, recorded in :meth:`spec`.
    """

    modality = Modality.SPEECH
    has_tokens = True
    min_audio_samples = 400  # receptive field of the conv feature encoder: shorter clips give no frame

    def __init__(
        self,
        model_name_or_path: str,
        pooling: str = "mean",
        layer: int = -1,
        max_seconds: float = 30.0,
        dtype: str = "float32",
        revision: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModel

        if pooling not in _POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {_POOLINGS}")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self.pooling, self.layer, self.max_seconds = pooling, layer, max_seconds
        path = resolve_model_path(model_name_or_path)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(path, **kwargs)
        with quiet_transformers():
            self.model = AutoModel.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
        config = self.model.config
        if not -(config.num_hidden_layers + 1) <= layer <= config.num_hidden_layers:
            raise ValueError(f"layer {layer} out of range for a {config.num_hidden_layers}-layer model")
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        self.output_dim = self.token_dim = int(config.hidden_size)
        # Group-norm feature encoders see the padding: run them one clip at a time (see module doc).
        self.per_clip = getattr(config, "feat_extract_norm", "layer") == "group"
        self.freeze()

    def spec(self) -> dict[str, Any]:
        # Every constructor argument changes the outputs, so the recorded arguments are the spec.
        return {**super().spec(), **self._init_args}

    def preprocess(self, items: Sequence[Any], sampling_rate: int | None = None) -> dict[str, Tensor]:
        """Decode/resample ``items`` and normalise each clip on its own samples.

        Returns:
            ``input_values [B, N_max]`` float32 zero-padded and ``lengths [B]`` (real samples).
        """
        waves = load_batch(items, self.sampling_rate, sampling_rate=sampling_rate, min_samples=self.min_audio_samples)
        max_samples = int(round(self.max_seconds * self.sampling_rate))
        waves = [w[:max_samples] for w in waves]
        # One call per clip: the extractor's zero-mean/unit-variance must not see other clips' padding.
        values = [
            np.asarray(self.feature_extractor(w, sampling_rate=self.sampling_rate)["input_values"][0], np.float32)
            for w in waves
        ]
        lengths = torch.tensor([len(v) for v in values], dtype=torch.long)
        batch = torch.zeros(len(values), int(lengths.max()), dtype=torch.float32)
        for i, v in enumerate(values):
            batch[i, : len(v)] = torch.from_numpy(v)
        return {"input_values": batch, "lengths": lengths}

    def _hidden(self, values: Tensor, sample_mask: Tensor | None) -> Tensor:
        want_all = self.layer != -1
        out = self.model(values, attention_mask=sample_mask, output_hidden_states=want_all)
        return out.hidden_states[self.layer] if want_all else out.last_hidden_state

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        dtype = next(self.model.parameters()).dtype
        values = inputs["input_values"].to(self.device, dtype=dtype)  # [B, N]
        lengths = inputs["lengths"].to(self.device)
        frame_len = self.model._get_feat_extract_output_lengths(lengths).long()  # [B]
        T = int(frame_len.max())
        if self.per_clip:
            tokens = values.new_zeros(values.shape[0], T, self.output_dim)
            for i in range(values.shape[0]):
                h = self._hidden(values[i : i + 1, : int(lengths[i])], None)[0]  # [T_i, D]
                tokens[i, : h.shape[0]] = h
        else:
            sample_mask = (torch.arange(values.shape[1], device=self.device)[None] < lengths[:, None]).long()
            tokens = self._hidden(values, sample_mask)[:, :T]
        mask = torch.arange(tokens.shape[1], device=self.device)[None, :] < frame_len[:, None]  # [B, T]
        return EncoderOutput(pooled=pool_frames(tokens, mask, self.pooling), tokens=tokens, mask=mask)


_TINY_CONV = dict(
    conv_dim=(8,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=16,
)


def _save_extractor(directory: Path, attention_mask: bool) -> None:
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
        return_attention_mask=attention_mask,
    ).save_pretrained(directory)


def build_tiny_wav2vec2(directory: Path) -> None:
    """XLS-R-like twin: layer-norm feature encoder, stable layer norm, attention mask."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(**_TINY_CONV, feat_extract_norm="layer", do_stable_layer_norm=True)
    Wav2Vec2Model(config).save_pretrained(directory, safe_serialization=True)
    _save_extractor(directory, attention_mask=True)


def build_tiny_hubert(directory: Path) -> None:
    """HuBERT-base-like twin: group-norm feature encoder, no attention mask."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(**_TINY_CONV, feat_extract_norm="group", do_stable_layer_norm=False)
    HubertModel(config).save_pretrained(directory, safe_serialization=True)
    _save_extractor(directory, attention_mask=False)
