"""Speech prefix to a frozen LM (issue 20.3): adapter, packing of masked prefixes, target-only loss,
generation, export/reload, WER/CER, configs and CLI, held-out learning on spoken pseudo-words."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query_key_value"]}
CONFIGS = ["configs/speech_prefix.yaml", "configs/tiny/speech_prefix.yaml"]
STEPS = 30  # optimizer steps of the held-out learning test


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    from mmalign.datasets.spoken_words import build_spoken_words

    return build_spoken_words(tmp_path_factory.mktemp("spoken_words"))


@pytest.fixture(scope="module")
def speech_encoder():
    import encoders

    return encoders.WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False)


def make_module(speech_encoder, lm_name: str = "tiny:tiny-causal-lm", lora: dict | None = LORA, seed: int = 0, **kwargs):
    from mmalign.captioning import FrameStackMLP, SpeechPrefixModule
    from mmalign.captioning.lm import FrozenLM

    torch.manual_seed(seed)
    return SpeechPrefixModule(speech_encoder, FrozenLM(lm_name, lora=lora),
                              functools.partial(FrameStackMLP, stack=2, hidden_dim=64), **kwargs)


@pytest.fixture(scope="module")
def causal(speech_encoder):
    return make_module(speech_encoder)


@pytest.fixture(scope="module")
def rows(spoken):
    from mmalign.data.manifest import read_manifest

    rows = read_manifest(spoken / "val.jsonl")
    # clips of 2 and 3 syllables (different lengths: padded batches, masked frames)
    return sorted(rows, key=lambda r: (len(r["text_en"]), r["id"]))[::7][:6]


def make_batch(module, rows):
    from mmalign.captioning import SpeechTextDataModule
    from mmalign.data.collate import TowerCollator

    dm = SpeechTextDataModule()
    dm.connect(module)
    return TowerCollator(dm._towers)(rows)


# -- adapter and layout ----------------------------------------------------------------------------
def test_frame_stack_mlp_downsamples_frames_and_mask_and_ignores_padding():
    from encoders.base import EncoderOutput
    from mmalign.captioning import FrameStackMLP

    torch.manual_seed(0)
    proj = FrameStackMLP(8, 16, stack=3)
    tokens = torch.randn(2, 7, 8)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = proj(EncoderOutput(pooled=None, tokens=tokens, mask=mask))
    assert out.shape == (2, 3, 16)  # ceil(7 / 3) tokens
    assert proj.output_mask(mask).tolist() == [[True] * 3, [True, True, False]]
    # the second clip alone (4 frames) gives the same prefix as inside the padded batch
    alone = proj(EncoderOutput(pooled=None, tokens=tokens[1:, :4], mask=mask[1:, :4]))
    torch.testing.assert_close(alone[0], out[1, :2])
    noisy = tokens.clone()
    noisy[1, 4:] = 1e3  # whatever the padding frames hold
    torch.testing.assert_close(proj(EncoderOutput(pooled=None, tokens=noisy, mask=mask))[1, :2], out[1, :2])


def test_masked_prefix_is_packed_targets_only_and_generation_left_padded():
    from mmalign.captioning import IGNORE, build_lm_inputs

    embed = torch.nn.Embedding(50, 4)
    prefix = torch.randn(2, 3, 4)
    pmask = torch.tensor([[True, True, True], [True, False, False]])  # the second clip is shorter
    out = build_lm_inputs(embed, 0, prefix, pmask, [[5, 6], [7]], [[11, 1], [12, 13, 1]], seq2seq=False)
    # row 1: [p0][7][12 13 1] then padding; the masked prefix slots left the sequence
    assert out.attention_mask.tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert out.labels.tolist() == [[IGNORE] * 5 + [11, 1], [IGNORE] * 2 + [12, 13, 1] + [IGNORE] * 2]
    assert torch.equal(out.inputs_embeds[1, 0], prefix[1, 0])
    assert torch.equal(out.inputs_embeds[1, 1:5], embed(torch.tensor([7, 12, 13, 1])))
    gen = build_lm_inputs(embed, 0, prefix, pmask, [[5, 6], [7]], None, seq2seq=False)
    assert gen.attention_mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]  # every row ends at its last prompt token
    assert torch.equal(gen.inputs_embeds[1, 3], prefix[1, 0]) and torch.equal(gen.inputs_embeds[1, 4], embed.weight[7])


# -- data-level check: the loss covers target tokens only -------------------------------------------
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_loss_covers_target_tokens_only(kind, speech_encoder, causal, rows):
    module = causal if kind == "causal" else make_module(speech_encoder, "tiny:tiny-mt5", {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]})
    batch = make_batch(module, rows)
    features = module.encoder_features(batch)
    assert features.mask.sum(1).unique().numel() > 1  # clips of different lengths in one batch
    targets = module.caption_ids(batch["keys"]["text"])
    inputs = module.lm_inputs(features, batch["meta"]["lang"], batch["keys"]["text"])
    # the labels are exactly each row's target tokens (+ eos), in order: no prefix frame or prompt token
    assert [row[row != -100].tolist() for row in inputs.labels] == targets
    out = module.caption_loss(batch, features)
    assert out.count.tolist() == [len(t) for t in targets]
    hf = module.lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, labels=inputs.labels).loss
    torch.testing.assert_close(out.loss, hf, rtol=1e-5, atol=1e-5)  # parity with transformers' masked loss
    # another prompt or other audio changes the context, never the targets
    other = module.lm_inputs(features[torch.arange(len(rows)).roll(1)], batch["meta"]["lang"],
                             batch["keys"]["text"], prompts=["Write what you hear:"] * len(rows))
    assert [row[row != -100].tolist() for row in other.labels] == targets
    # a row's loss does not depend on the batch it is in (padding and packing)
    alone = module.caption_loss(make_batch(module, rows[:1]))
    torch.testing.assert_close(alone.loss_sum[0], out.loss_sum[0], rtol=1e-4, atol=1e-4)


def test_encoder_and_lm_frozen_only_adapter_and_lora_saved(causal, rows):
    trainable = {n for n, p in causal.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or "lora_" in n for n in trainable)
    assert set(causal.state_dict()) == trainable
    causal.zero_grad()
    causal.caption_loss(make_batch(causal, rows[:2])).loss.backward()
    assert causal.projector.fc1.weight.grad.abs().sum() > 0  # gradients reach the adapter through the frozen LM
    causal.zero_grad()


# -- generation and export --------------------------------------------------------------------------
def test_batched_generation_matches_one_by_one_and_generate_takes_audio(spoken, causal, rows):
    batch = make_batch(causal, rows)
    features = causal.encoder_features(batch)
    langs = [r["lang"] for r in rows]
    together = causal.generate_from_features(features, langs, max_new_tokens=5)
    alone = [causal.generate_from_features(features[i : i + 1], [langs[i]], max_new_tokens=5)[0] for i in range(len(rows))]
    assert together == alone
    assert causal.generate([spoken / r["audio"] for r in rows], lang=langs, max_new_tokens=5) == together
    with pytest.raises(ValueError, match="2 clips but 3 languages"):
        causal.generate([spoken / r["audio"] for r in rows[:2]], lang=["en", "de", "es"])


def test_export_reloads_to_identical_generations_and_loss(spoken, causal, rows, tmp_path):
    import mmalign
    from mmalign.captioning import PrefixCaptioningModule, SpeechPrefixModule
    from mmalign.export import ExportError

    with torch.no_grad():  # move LoRA B off zero so the round trip checks LoRA weights too
        for n, p in causal.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = causal.save_pretrained(tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["module_class"] == "mmalign.captioning.speech.SpeechPrefixModule"
    assert config["speech_encoder"]["cache_key"] == causal.encoder.cache_key and "image_encoder" not in config
    assert config["module"]["prompt"] == causal.prompt and config["module"]["audio_field"] == "audio"
    reloaded = mmalign.load(out)
    assert type(reloaded) is SpeechPrefixModule
    assert type(PrefixCaptioningModule.from_pretrained(out)) is SpeechPrefixModule
    clips, langs = [spoken / r["audio"] for r in rows], [r["lang"] for r in rows]
    assert reloaded.generate(clips, lang=langs, max_new_tokens=6) == causal.generate(clips, lang=langs, max_new_tokens=6)
    batch = make_batch(causal, rows)
    torch.testing.assert_close(reloaded.caption_loss(batch).loss_sum, causal.caption_loss(batch).loss_sum, rtol=0, atol=0)

    # the module class an export names is checked like every class it names
    for recorded, message in [("os.system", "refusing to import"),
                              ("mmalign.captioning.module.PrefixCaptioningModule", "not an argument of PrefixCaptioningModule")]:
        config["module_class"] = recorded
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(ExportError, match=message):
            mmalign.load(out)
    with pytest.raises(ExportError, match="not a mmalign.captioning.speech.SpeechPrefixModule"):
        SpeechPrefixModule.from_pretrained(out)


def test_wer_and_cer():
    from mmalign.captioning import cer, normalize_transcript, wer

    assert normalize_transcript("  Hello,   World! ") == "hello world"
    assert wer(["hello world", "a b c"], ["Hello, world.", "a x c d"]) == pytest.approx(100 * 2 / 6)
    assert cer(["abc"], ["abd"]) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="empty after normalisation"):
        wer(["x"], ["?!"])


# -- learning on held-out words ---------------------------------------------------------------------
def test_training_lowers_held_out_loss(speech_encoder, spoken):
    """Steps on cached features of spoken pseudo-words; val words never occur in training. On these random tiny
    twins the fall is the language prior's (spelling rules per prompt language, the syllable inventory):
    ``python -m benchmarks.studies.speech_prefix`` measures what the audio adds (docs/prefix.md)."""
    import lightning as L

    from mmalign.captioning import SpeechTextDataModule

    module = make_module(speech_encoder, seed=1, eval_max_new_tokens=6)
    dm = SpeechTextDataModule(train=str(spoken / "train.jsonl"), val=str(spoken / "val.jsonl"), batch_size=32)
    dm.connect(module)
    dm.setup()
    torch.manual_seed(0)
    train, val = list(dm.train_dataloader())[:4], list(dm.val_dataloader())[:2]  # 128 train rows, 64 held out
    for b in train + val:  # the frozen encoder runs once
        b["features"] = {"speech": module.encoder_features(b)}

    def held_out() -> float:
        total = count = 0
        with torch.no_grad():
            for b in val:
                out = module.caption_loss(b, b["features"]["speech"])
                total, count = total + float(out.loss_sum.sum()), count + int(out.count.sum())
        return total / count

    module.eval()
    start = held_out()
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=0.01)
    for step in range(STEPS):
        module.train()
        loss = module.caption_loss(train[step % len(train)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    end = held_out()
    assert end < 0.7 * start, (start, end)

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(module, datamodule=dm, verbose=False)
    m = trainer.callback_metrics
    for lang in ("en", "de", "es"):
        assert torch.isclose(m[f"val/{lang}/ppl"], m[f"val/{lang}/loss"].exp(), rtol=1e-4)
        assert 0 <= float(m[f"val/{lang}/chrF"]) <= 100 and float(m[f"val/{lang}/WER"]) >= 0
        assert 0 <= float(m[f"val/{lang}/CER"])
    assert {"val/WER", "val/CER", "val/chrF"} <= set(m)


# -- configs and CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CONFIGS[:1], CONFIGS])
def test_configs_parse_against_signatures(config):
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int)
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False)
    parser.add_subclass_arguments(L.LightningModule, "model", instantiate=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", instantiate=False)
    cfg = parser.parse_args([f"--config={ROOT / c}" for c in config])
    assert cfg.model.class_path == "mmalign.captioning.SpeechPrefixModule"
    assert cfg.model.init_args.speech_encoder.class_path == "encoders.WhisperSpeechEncoder"
    assert cfg.data.class_path == "mmalign.captioning.SpeechTextDataModule"


def test_cli_test_reports_wer_and_predict_writes_transcripts(spoken, tmp_path, monkeypatch, capsys):
    """(``fit`` with the tiny overlay, export included, runs in tests/test_recipes.py.)"""
    from mmalign.cli import main

    monkeypatch.chdir(tmp_path)  # the config's relative outputs/ land here
    config = [a for c in CONFIGS for a in ("--config", str(ROOT / c))]
    data = [f"--data.init_args.{s}={spoken / f'{s}.jsonl'}" for s in ("train", "val", "test")]
    untrained = "--allow_untrained=true"  # the metrics' and writer's plumbing is what is checked here
    main(["test", *config, *data, "--trainer.limit_test_batches=1", untrained])
    printed = capsys.readouterr().out
    assert "test/en/WER" in printed and "test/es/chrF" in printed

    main(["predict", *config, *data, "--trainer.limit_predict_batches=1", untrained])
    rows = [json.loads(line) for line in (tmp_path / "outputs/tiny_speech_prefix/transcripts.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(set(r) == {"id", "lang", "text", "reference", "prompt"} for r in rows)
    assert all(r["prompt"].startswith("Transcribe the ") and r["reference"] for r in rows)
