"""mBLIP-style visual prefix captioning: masking, loss, freezing, generation, export, CLI, learning."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAUSAL_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query_key_value", "dense_4h_to_h"]}


@pytest.fixture(scope="module")
def image_encoder():
    import encoders

    return encoders.TimmImageEncoder("tiny:timm-vit")


def make_module(image_encoder, lm_name: str, lora: dict | None = None, seed: int = 0, **kwargs):
    from mmalign.captioning.lm import FrozenLM
    from mmalign.captioning import PrefixCaptioningModule
    from projectors import Resampler

    torch.manual_seed(seed)
    lm = FrozenLM(lm_name, lora=lora)
    projector = functools.partial(Resampler, num_queries=4, depth=1, hidden_dim=64, num_heads=4)
    return PrefixCaptioningModule(image_encoder, lm, projector, **kwargs)


@pytest.fixture(scope="module")
def causal(image_encoder):
    return make_module(image_encoder, "tiny:tiny-causal-lm", CAUSAL_LORA)


@pytest.fixture(scope="module")
def seq2seq(image_encoder):
    return make_module(image_encoder, "tiny:tiny-mt5", {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]})


@pytest.fixture(scope="module")
def rows(synthetic_data):
    from mmalign.data.manifest import read_manifest

    return read_manifest(synthetic_data / "train.jsonl")


def make_batch(module, rows):
    from mmalign.data.captions import CaptionDataModule  # noqa: F401  (the collation the datamodule uses)
    from mmalign.data.collate import TowerCollator
    from mmalign.data.captions import keep_strings

    collate = TowerCollator({"image": ("image", module.image_encoder.preprocess), "caption": ("text", keep_strings)})
    return collate(rows)


# -- layout and masking --------------------------------------------------------------------------
def test_causal_training_layout_masks_prefix_prompt_and_padding():
    from mmalign.captioning import IGNORE, build_lm_inputs

    embed = torch.nn.Embedding(50, 8)
    prefix = torch.randn(2, 3, 8)
    prompts, captions = [[5, 6], [7, 8, 9, 10]], [[11, 12, 1], [13, 1]]
    out = build_lm_inputs(embed, 0, prefix, torch.ones(2, 3, dtype=torch.bool), prompts, captions, seq2seq=False)
    assert out.inputs_embeds.shape == (2, 3 + 6, 8) and out.labels.shape == (2, 9)
    assert torch.equal(out.inputs_embeds[:, :3], prefix)  # prefix first
    assert out.labels[0].tolist() == [IGNORE] * 5 + [11, 12, 1] + [IGNORE]  # prefix, prompt, caption, pad
    assert out.labels[1].tolist() == [IGNORE] * 7 + [13, 1]
    assert out.attention_mask.tolist() == [[1] * 8 + [0], [1] * 9]
    assert torch.equal(out.inputs_embeds[0, 3:8], embed(torch.tensor([5, 6, 11, 12, 1])))


def test_causal_generation_layout_is_left_padded():
    from mmalign.captioning import build_lm_inputs

    embed = torch.nn.Embedding(50, 8)
    prefix = torch.randn(2, 3, 8)
    out = build_lm_inputs(embed, 0, prefix, torch.ones(2, 3, dtype=torch.bool), [[5], [7, 8, 9]], None, seq2seq=False)
    assert out.labels is None and out.inputs_embeds.shape == (2, 6, 8)
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    assert torch.equal(out.inputs_embeds[0, 2:5], prefix[0])  # padding, prefix, prompt: prompt ends the row
    assert torch.equal(out.inputs_embeds[0, 5], embed.weight[5])
    assert torch.equal(out.inputs_embeds[1, :3], prefix[1])


def test_seq2seq_layout_puts_caption_in_labels_only():
    from mmalign.captioning import IGNORE, build_lm_inputs

    embed = torch.nn.Embedding(50, 8)
    prefix = torch.randn(2, 4, 8)
    out = build_lm_inputs(embed, 0, prefix, torch.ones(2, 4, dtype=torch.bool), [[5, 1], [6, 7, 1]], [[9, 1], [10, 11, 12, 1]], seq2seq=True)
    assert out.inputs_embeds.shape == (2, 4 + 3, 8)  # prefix + prompt only
    assert out.labels.tolist() == [[9, 1, IGNORE, IGNORE], [10, 11, 12, 1]]
    assert out.attention_mask.tolist() == [[1] * 6 + [0], [1] * 7]


# -- loss ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_loss_matches_transformers_and_covers_caption_tokens_only(kind, request, rows):
    module = request.getfixturevalue(kind)
    batch = make_batch(module, rows[:4])
    features = module.image_features(batch)
    inputs = module.lm_inputs(features, batch["meta"]["lang"], batch["keys"]["text"])
    ours = module.caption_loss(batch, features)
    # Parity with transformers' own label-masked loss (which shifts labels itself for causal LMs).
    hf = module.lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, labels=inputs.labels).loss
    torch.testing.assert_close(ours.loss, hf, rtol=1e-5, atol=1e-5)
    n_caption = [len(ids) for ids in module.caption_ids(batch["keys"]["text"])]
    assert ours.count.tolist() == n_caption  # caption tokens + eos, nothing else

    if kind == "causal":  # gradient w.r.t. logits is zero at prefix, prompt and padding positions
        from mmalign.captioning import caption_token_losses

        logits = module.lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits.detach().requires_grad_()
        caption_token_losses(logits, inputs.labels, shift=True).loss.backward()
        predicts_caption = torch.zeros_like(inputs.labels, dtype=torch.bool)
        predicts_caption[:, :-1] = inputs.labels[:, 1:] != -100  # logit t predicts label t+1
        assert logits.grad[~predicts_caption].abs().max() == 0
        assert (logits.grad[predicts_caption].abs().sum(-1) > 0).all()
        K = module.projector.num_queries
        prompt_lens = [len(p) for p in module.prompt_ids([module.prompt_text(lang) for lang in batch["meta"]["lang"]])]
        for i, p in enumerate(prompt_lens):
            assert not predicts_caption[i, : K + p - 1].any()  # prefix and prompt positions never scored


def test_prompt_changes_context_but_is_never_a_target(causal, rows):
    batch = make_batch(causal, rows[:3])
    features = causal.image_features(batch)
    a = causal.lm_inputs(features, batch["meta"]["lang"], batch["keys"]["text"], prompts=["Caption:"] * 3)
    b = causal.lm_inputs(features, batch["meta"]["lang"], batch["keys"]["text"], prompts=["Describe the picture in words:"] * 3)
    caption_targets = lambda x: [row[row != -100].tolist() for row in x.labels]  # noqa: E731
    assert caption_targets(a) == caption_targets(b)  # the targets are the caption tokens, whatever the prompt


# -- freezing and weights -------------------------------------------------------------------------
def test_lm_and_encoder_frozen_only_projector_and_lora_saved(causal):
    causal.train()
    assert not causal.lm.model.training and not causal.image_encoder.training and causal.projector.training
    trainable = {n for n, p in causal.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert set(causal.state_dict()) == trainable  # no frozen LM or encoder weight in checkpoints
    causal.eval()


def test_gradients_reach_projector_through_frozen_lm(causal, rows):
    causal.zero_grad()
    causal.caption_loss(make_batch(causal, rows[:2])).loss.backward()
    assert causal.projector.queries.grad is not None and causal.projector.queries.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in causal.lm.named_parameters() if not p.requires_grad)
    causal.zero_grad()


# -- generation and export ------------------------------------------------------------------------
def test_batched_generation_matches_one_by_one(causal, rows):
    batch = make_batch(causal, rows[:3])
    features = causal.image_features(batch)
    prompts = ["Caption:", "Caption in German, please:", "Caption in Spanish:"]  # different lengths: padding used
    together = causal.generate_from_features(features, ["en", "de", "es"], prompts, max_new_tokens=6)
    alone = [causal.generate_from_features(features[i : i + 1], ["en"], [prompts[i]], max_new_tokens=6)[0] for i in range(3)]
    assert together == alone


def test_generate_rejects_mismatched_languages(causal, rows):
    with pytest.raises(ValueError, match="2 images but 3 languages"):
        causal.generate([rows[0]["image"], rows[1]["image"]], lang=["en", "de", "es"])


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_export_reload_gives_identical_greedy_captions(kind, request, rows, tmp_path):
    from mmalign.captioning import PrefixCaptioningModule

    module = request.getfixturevalue(kind)
    with torch.no_grad():  # move LoRA B off zero so the round trip also checks LoRA weights
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = module.save_pretrained(tmp_path / "export")
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["image_encoder"]["cache_key"] == module.image_encoder.cache_key
    reloaded = PrefixCaptioningModule.from_pretrained(out)
    for k, v in module.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    images = [r["image"] for r in rows[:4]]
    langs = [r["lang"] for r in rows[:4]]
    assert module.generate(images, lang=langs, max_new_tokens=6) == reloaded.generate(images, lang=langs, max_new_tokens=6)
    # the generic loader dispatches on the export format; the embedding loader names the right one
    import mmalign
    from mmalign.export import AlignedModel, ExportError

    assert isinstance(mmalign.load(out), PrefixCaptioningModule)
    with pytest.raises(ExportError, match="visual-prefix captioner"):
        AlignedModel.from_pretrained(out)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    from mmalign.captioning import PrefixCaptioningModule
    from mmalign.export import ExportError

    # one error type for every export kind (mmalign.export.format)
    with pytest.raises(ExportError, match="not an mmalign export: no config.json"):
        PrefixCaptioningModule.from_pretrained(tmp_path)


# -- learning ---------------------------------------------------------------------------------------
def test_short_fit_lowers_loss_and_captions_depend_on_image(image_encoder, synthetic_data):
    """50 steps on cached features of 72 synthetic image-caption pairs (3 languages)."""
    import lightning as L

    from mmalign.data.captions import CaptionDataModule

    module = make_module(image_encoder, "tiny:tiny-causal-lm", CAUSAL_LORA, seed=1, eval_max_new_tokens=6)
    dm = CaptionDataModule(train=str(synthetic_data / "train.jsonl"), val=str(synthetic_data / "train.jsonl"), batch_size=24)
    dm.connect(module)
    dm.setup()
    # The shuffle must not depend on what earlier tests drew from the global RNG; shuffle seeds 0-4 all give
    # 3-6 distinct captions for the 9 images below (checked when this seed was fixed).
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    for b in batches:  # the frozen encoder runs once
        b["features"] = {"image": module.image_features(b)}
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=0.01)
    module.train()
    losses = []
    for step in range(50):
        loss = module.caption_loss(batches[step % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    module.eval()
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)

    b = batches[0]
    feats = b["features"]["image"][:9]
    captions = module.generate_from_features(feats, ["en"] * 9, max_new_tokens=6)
    assert len(set(captions)) >= 3, captions  # not one caption for every image
    prefix, _ = module.prefix_embeds(feats)
    assert torch.cdist(prefix.flatten(1), prefix.flatten(1)).triu(1).max() > 0

    # Validation metrics per language: loss, perplexity = exp(loss), chrF in [0, 100].
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    trainer.validate(module, datamodule=dm, verbose=False)
    m = trainer.callback_metrics
    for lang in ("en", "de", "es"):
        assert torch.isclose(m[f"val/{lang}/ppl"], m[f"val/{lang}/loss"].exp(), rtol=1e-4)
        assert 0 <= float(m[f"val/{lang}/chrF"]) <= 100
    assert "val/chrF" in m and "val/loss" in m


# -- configs and CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [["configs/mblip_prefix.yaml"], ["configs/mblip_prefix.yaml", "configs/tiny/mblip_prefix.yaml"]])
def test_configs_parse_against_signatures(config):
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)  # the recipe, then its tiny overlay
    parser.add_argument("--seed_everything", type=int)
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False)
    parser.add_subclass_arguments(L.LightningModule, "model", instantiate=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", instantiate=False)
    cfg = parser.parse_args([f"--config={ROOT / c}" for c in config])
    assert cfg.model.class_path == "mmalign.captioning.PrefixCaptioningModule"
    assert cfg.data.class_path == "mmalign.data.captions.CaptionDataModule"


def test_cli_fast_dev_run_exports_and_predict_writes_captions(synthetic_data, tmp_path, monkeypatch):
    from mmalign.cli import main

    monkeypatch.chdir(tmp_path)  # the config's relative outputs/ land here
    config = ["--config", str(ROOT / "configs/mblip_prefix.yaml"), "--config", str(ROOT / "configs/tiny/mblip_prefix.yaml")]
    data = [f"--data.init_args.{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")]
    main(["fit", *config, "--trainer.fast_dev_run=true", *data])
    export = tmp_path / "outputs/tiny_mblip/export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()

    main(["predict", *config, *data, "--trainer.limit_predict_batches=1", "--allow_untrained=true"])  # the writer, not the weights
    lines = (tmp_path / "outputs/tiny_mblip/captions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 16  # one batch
    assert all(set(r) == {"id", "lang", "caption", "reference", "prompt"} for r in rows)
    assert all(isinstance(r["caption"], str) and r["reference"] for r in rows)


def test_fit_export_reloads_in_a_fresh_process_and_captions_like_predict(synthetic_data, tmp_path, monkeypatch):
    """What ``fit`` itself writes (``export_dir`` -> ExportOnFitEnd) loads with ``mmalign.load`` in a new
    interpreter and gives the captions ``predict`` gives with the same weights (its last checkpoint)."""
    import subprocess
    import sys

    from mmalign.cli import main
    from mmalign.data.manifest import read_manifest

    monkeypatch.chdir(tmp_path)  # the config's relative outputs/ land here
    config = ["--config", str(ROOT / "configs/mblip_prefix.yaml"), "--config", str(ROOT / "configs/tiny/mblip_prefix.yaml")]
    data = [f"--data.init_args.{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")]
    main(["fit", *config, *data, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
          "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    (ckpt,) = (tmp_path / "run").rglob("epoch=*.ckpt")  # (+ best.ckpt, a link to it)
    main(["predict", *config, *data, "--trainer.limit_predict_batches=1", f"--ckpt_path={ckpt}"])
    rows = [json.loads(line) for line in (tmp_path / "outputs/tiny_mblip/captions.jsonl").read_text().splitlines()]
    images = {r["id"]: r["image"] for r in read_manifest(synthetic_data / "test.jsonl")}
    job = {"images": [images[r["id"]] for r in rows], "langs": [r["lang"] for r in rows]}
    script = ("import json, sys, mmalign; job = json.loads(sys.argv[2]); model = mmalign.load(sys.argv[1]); "
              "print(json.dumps(model.generate(job['images'], lang=job['langs'], max_new_tokens=8)))")
    export = tmp_path / "outputs/tiny_mblip/export"
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run([sys.executable, "-c", script, str(export), json.dumps(job)], capture_output=True, text=True,
                         cwd=tmp_path, env=env)  # this checkout's mmalign, installed or not
    assert out.returncode == 0, out.stderr[-3000:]
    captions = json.loads(out.stdout.strip().splitlines()[-1])
    assert captions == [r["caption"] for r in rows]


def test_export_cli_handles_captioner_checkpoints(rows, tmp_path, capsys):
    """``mmalign export --ckpt`` of a captioner checkpoint gives the export ``save_pretrained`` would."""
    import yaml

    import mmalign
    from mmalign.cli import main
    from mmalign.export import module_from_recipe

    recipe = {"model": {"class_path": "mmalign.captioning.PrefixCaptioningModule", "init_args": {
        "image_encoder": {"class_path": "encoders.TimmImageEncoder", "init_args": {"model_name": "tiny:timm-vit"}},
        "lm": {"class_path": "mmalign.captioning.lm.FrozenLM", "init_args": {"model_name": "tiny:tiny-causal-lm", "lora": CAUSAL_LORA}},
        "projector": {"class_path": "projectors.Resampler", "init_args": {"num_queries": 4, "depth": 1, "hidden_dim": 64, "num_heads": 4}},
        "prompt": "Describe in {language}:",
    }}}
    module = module_from_recipe(recipe).eval()
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    torch.save({"state_dict": module.state_dict(), "epoch": 2, "global_step": 9}, tmp_path / "last.ckpt")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--config", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "out")])
    assert "exported a captioner" in capsys.readouterr().out
    reloaded = mmalign.load(tmp_path / "out")
    assert reloaded.prompt == "Describe in {language}:"
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in module.state_dict().items())
    images, langs = [r["image"] for r in rows[:3]], [r["lang"] for r in rows[:3]]
    assert reloaded.generate(images, lang=langs, max_new_tokens=5) == module.generate(images, lang=langs, max_new_tokens=5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["provenance"]["global_step"] == 9 and "optimizer" not in config["module"]
