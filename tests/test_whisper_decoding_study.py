"""The decoding study's transcript clean-up (benchmarks/studies/whisper_decoding.py): loops cut, speech kept."""

from benchmarks.studies.whisper_decoding import collapse_repeats, normalise


def test_a_hallucinated_loop_is_cut_to_one_occurrence():
    assert collapse_repeats("bebe bebe bebe bebe bebe") == "bebe"
    assert collapse_repeats("Follow windspoon. Follow windspoon. Follow windspoon. Follow w") == "Follow windspoon."
    assert collapse_repeats("f f f f f f f") == "f"


def test_a_loop_inside_a_sentence_keeps_what_surrounds_it():
    assert collapse_repeats("facci a come soppi soppi soppi e cota") == "facci a come soppi e cota"
    assert collapse_repeats("Punto e coso. Punto e coso. Punto e coso. Punto") == "Punto e coso."


def test_fewer_than_three_repeats_and_plain_text_are_untouched():
    for text in ("bye bye", "very very good", "grinning face with big eyes", ""):
        assert collapse_repeats(text) == text


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  Strahlendes Gesicht,  mit lachenden Augen. ") == "strahlendes gesicht mit lachenden augen"


def test_n_best_variant_returns_the_best_transcripts_and_the_soft_embeddings():
    import numpy as np
    import torch

    from benchmarks.studies.whisper_decoding import n_best, r1
    from encoders.cascade import WhisperCascadeEncoder

    tiny_text = {"text_encoder": "encoders.HFTextEncoder", "text_encoder_args": {"model_name_or_path": "tiny:bert-text"}}
    enc = WhisperCascadeEncoder("tiny:whisper-asr", language="row", max_new_tokens=4, pad_seconds=0.5, num_beams=2,
                                num_hypotheses=2, **tiny_text)
    t = np.arange(16000) / 16000
    waves = [(0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32) for f in (440, 330, 220)]
    texts, emb = n_best(enc, waves, "de", 16000, batch_size=2)  # two batches
    inputs = enc.preprocess(waves, sampling_rate=16000, languages=["de"] * 3)
    assert texts == enc.transcribe_features(inputs) and emb.shape == (3, enc.output_dim)
    torch.testing.assert_close(emb, enc(inputs).pooled, atol=1e-5, rtol=1e-4)
    names = torch.nn.functional.normalize(torch.randn(3, enc.output_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    names[1] = torch.nn.functional.normalize(emb[1], dim=-1)  # clip 1's own embedding as its name: a sure hit
    want = ((torch.nn.functional.normalize(emb, dim=-1) @ names.T).argmax(1) == torch.arange(3)).float().mean()
    assert r1(enc, texts, names, embeddings=emb) == float(want) >= 1 / 3
