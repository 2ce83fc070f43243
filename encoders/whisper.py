"""Frozen Whisper speech encoder (the encoder half of OpenAI Whisper, via ``transformers``).

Whisper's encoder was trained on 30 s log-mel windows: 100 mel frames per second, halved by the
strided second convolution to 50 encoder frames per second (1500 frames per window). Clips are padded
to 30 s by the feature extractor; the padding becomes a frame mask so pooling ignores it.

``pad_to_30s=False`` runs the encoder on the real frames only (cropped to the longest clip of the
batch, positional embeddings sliced, padding frames masked out of self-attention). ``transformers``'
own ``WhisperEncoder.forward`` insists on 3000 mel frames, so this module runs the encoder's
sub-modules itself; with ``pad_to_30s=True`` that computation equals ``WhisperEncoder.forward``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from encoders.audio import load_batch
from encoders.base import Encoder, EncoderOutput, Modality
from encoders.tiny import resolve_model_path
from encoders.utils import POOLINGS as _POOLINGS
from encoders.utils import pool_frames, quiet_transformers, torch_dtype


class WhisperSpeechEncoder(Encoder):
    """Whisper encoder states, mean-pooled over the frames of the real audio.

    Args:
        model_name_or_path: Hub id (``openai/whisper-small``), local directory (e.g. one written by
            :func:`encoders.convert_ct2.packaged_whisper_base`) or ``tiny:whisper``.
        pooling: ``"mean"`` (masked mean over real frames) or ``"max"``.
        pad_to_30s: True runs Whisper as trained, on a full 30 s window (padding masked only in
            pooling). False crops the window to the batch's longest clip and masks padding frames out
            of attention too: much faster for short clips, same outputs whatever the batch holds.
        max_seconds: Clips are cut to this length (at most 30 s, one Whisper window).
        layer: Which hidden state to return: ``-1`` the encoder output (after its final LayerNorm),
            ``k >= 0`` the residual stream after ``k`` layers (0 = embeddings), other negatives count
            from the end like ``transformers``' ``hidden_states`` tuple.
        dtype: Weights and compute dtype (``float32``, ``float16``, ``bfloat16``).
        revision: Hub revision, recorded in :meth:`spec`.
    """

    modality = Modality.SPEECH
    has_tokens = True
    sampling_rate = 16_000
    min_audio_samples = 400  # one 25 ms STFT window of the log-mel front end (encoders.audio checks it)

    def __init__(
        self,
        model_name_or_path: str,
        pooling: str = "mean",
        pad_to_30s: bool = True,
        max_seconds: float = 30.0,
        layer: int = -1,
        dtype: str = "float32",
        revision: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import WhisperFeatureExtractor, WhisperForAudioClassification

        if pooling not in _POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {_POOLINGS}")
        if not 0 < max_seconds <= 30.0:
            raise ValueError(f"max_seconds must be in (0, 30] (one Whisper window), got {max_seconds}")
        self.model_name_or_path = model_name_or_path
        self.pooling, self.pad_to_30s, self.max_seconds, self.revision = pooling, pad_to_30s, max_seconds, revision
        path = resolve_model_path(model_name_or_path)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(path, **kwargs)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        with quiet_transformers():
            # The audio-classification class holds only the encoder: the decoder is never loaded.
            full = WhisperForAudioClassification.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
        self.encoder = full.encoder
        del full
        config = self.encoder.config
        n_layers = config.encoder_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer {layer} out of range for a {n_layers}-layer encoder")
        self.layer = layer % (n_layers + 1)  # index into [embeddings, layer 1, ..., final]
        self.output_dim = self.token_dim = int(config.d_model)
        # Mel frames per encoder frame (conv1 stride x conv2 stride = 2).
        self.mel_per_frame = int(self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0])
        self.max_mel_frames = int(config.max_source_positions * self.mel_per_frame)
        if self.feature_extractor.feature_size != config.num_mel_bins:
            raise ValueError(
                f"feature extractor gives {self.feature_extractor.feature_size} mel bins but the model "
                f"expects {config.num_mel_bins} in {model_name_or_path!r}"
            )
        self.freeze()

    def spec(self) -> dict[str, Any]:
        # Every constructor argument changes the outputs, so the recorded arguments are the spec.
        return {**super().spec(), **self._init_args}

    # -- data -----------------------------------------------------------------------------
    def preprocess(self, items: Sequence[Any], sampling_rate: int | None = None) -> dict[str, Tensor]:
        """Decode/resample ``items`` and compute 30 s log-mel windows.

        Args:
            items: Paths or 1-D waveforms (then ``sampling_rate`` is required).
            sampling_rate: Rate of array items.

        Returns:
            ``input_features [B, n_mels, 3000]`` float32 and ``feature_lengths [B]`` (real mel frames).
            Every clip gets its own full window, so tensors collate and features never depend on the batch.
        """
        waves = load_batch(items, self.sampling_rate, sampling_rate=sampling_rate, min_samples=self.min_audio_samples)
        max_samples = int(round(self.max_seconds * self.sampling_rate))
        waves = [w[:max_samples] for w in waves]
        fe = self.feature_extractor
        hop = fe.hop_length
        if self.pad_to_30s:
            feats = fe(waves, sampling_rate=self.sampling_rate, return_tensors="pt", padding="max_length")["input_features"]
        else:
            # Log-mel of the real audio plus a margin of silence (covers the STFT window and the
            # convolutions' edge) instead of 30 s: the frames encode() keeps are the same as with a
            # 30 s window, and the rest is filled with the value silence takes after Whisper's clamp.
            n = min(max(len(w) for w in waves) + fe.n_fft + 4 * hop, fe.n_samples)
            short = fe(waves, sampling_rate=self.sampling_rate, return_tensors="pt", padding="max_length",
                       max_length=n)["input_features"]  # [B, n_mels, n // hop]
            floor = short.amin(dim=(1, 2), keepdim=True)  # [B, 1, 1]: (max - 8 + 4) / 4 on silent frames
            feats = floor.expand(-1, short.shape[1], self.max_mel_frames).clone()
            feats[..., : short.shape[-1]] = short
        # [B, n_mels, 3000]
        lengths = [min(math.ceil(len(w) / hop), feats.shape[-1]) for w in waves]
        return {"input_features": feats.float(), "feature_lengths": torch.tensor(lengths, dtype=torch.long)}

    # -- model ----------------------------------------------------------------------------
    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        enc = self.encoder
        feats = inputs["input_features"].to(self.device, dtype=enc.conv1.weight.dtype)  # [B, M, 3000]
        mel_len = inputs["feature_lengths"].to(self.device)
        frame_len = torch.div(mel_len + self.mel_per_frame - 1, self.mel_per_frame, rounding_mode="floor")
        if feats.shape[-1] != self.max_mel_frames:
            raise ValueError(f"input_features must have {self.max_mel_frames} frames, got {feats.shape[-1]}")
        attn_mask = None
        if not self.pad_to_30s:
            T = int(frame_len.max())
            # Keep one extra frame of context so the convolutions' edge sees the same (silence)
            # features as in a longer batch: outputs then never depend on the batch's longest clip.
            feats = feats[..., : min((T + 1) * self.mel_per_frame, self.max_mel_frames)]
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)  # [B, T', D]
        if not self.pad_to_30s:
            x = x[:, :T]
        T = x.shape[1]
        mask = torch.arange(T, device=x.device)[None, :] < frame_len[:, None]  # [B, T]
        x = x + enc.embed_positions.weight[:T].to(x.dtype)
        if not self.pad_to_30s:
            # Additive key mask [B, 1, T, T]: no frame attends to another clip's padding.
            attn_mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            attn_mask = attn_mask.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :].expand(-1, 1, T, T)
        n_layers = len(enc.layers)
        for i in range(min(self.layer, n_layers)):
            x = enc.layers[i](x, attn_mask)
        if self.layer == n_layers:
            x = enc.layer_norm(x)
        return EncoderOutput(pooled=pool_frames(x, mask, self.pooling), tokens=x, mask=mask)


def build_tiny_whisper(directory: Path) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=128,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=32,
        bos_token_id=1, eos_token_id=1, pad_token_id=1, decoder_start_token_id=2,
        begin_suppress_tokens=None, suppress_tokens=None,
    )
    WhisperForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)


def build_tiny_whisper_asr(directory: Path) -> None:
    """A tiny random Whisper with a byte-level tokenizer and a generation config (``tiny:whisper-asr``).

    Written the way :func:`encoders.convert_ct2.write_generation_files` writes the packaged Whisper base, so
    ``WhisperProcessor``/``generate(language=...)`` work on it (the cascade tower's tests). Its transcripts
    are random bytes, deterministic by seed.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from encoders.convert_ct2 import write_generation_files

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    vocab = alphabet + specials
    ids = {t: i for i, t in enumerate(vocab)}
    directory = Path(directory)
    source = directory / "ct2_like"
    source.mkdir(parents=True, exist_ok=True)
    tok.save(str(source / "tokenizer.json"))
    (source / "vocabulary.json").write_text(json.dumps(vocab))
    (source / "config.json").write_text(json.dumps({"lang_ids": [ids["<|en|>"], ids["<|de|>"]],
                                                    "suppress_ids": [], "suppress_ids_begin": []}))
    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=len(vocab),
        num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=None, suppress_tokens=None,
    )
    WhisperForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)
    write_generation_files(source, directory)


def whisper_reference_forward(encoder: WhisperSpeechEncoder, inputs: dict[str, Tensor]) -> Tensor:
    """``transformers``' own ``WhisperEncoder.forward`` on 30 s windows (for parity checks)."""
    feats = inputs["input_features"].to(encoder.device, dtype=encoder.encoder.conv1.weight.dtype)
    with torch.inference_mode():
        return encoder.encoder(feats).last_hidden_state


__all__ = ["WhisperSpeechEncoder", "build_tiny_whisper", "build_tiny_whisper_asr", "whisper_reference_forward"]
