"""Scale-out: GradCache gives the plain full-batch gradients; distributed configs parse; 2-process DDP fit."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import encoders
import projectors
from mmalign import AlignmentModule, ClipLoss, Objective, SigLipLoss, Tower
from mmalign.data import AlignmentDataModule
from mmalign.training.gradcache import chunk_ranges, slice_rows

ROOT = Path(__file__).resolve().parents[1]


def make_module(loss=None, grad_cache_chunk=None, norm="layer", lr=0.1):
    torch.manual_seed(0)
    image = Tower(encoders.TimmImageEncoder("tiny:timm-vit"), field="image",
                  projector=lambda i, o: projectors.MLP(i, o, num_blocks=1, dropout=0.0, norm=norm))
    text = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), field="text", projector=projectors.Linear)
    return AlignmentModule(
        towers={"image": image, "text": text},
        objectives=[Objective(loss if loss is not None else ClipLoss(), ["image", "text"])],
        embed_dim=32, optimizer=lambda p: torch.optim.SGD(p, lr=lr), grad_cache_chunk=grad_cache_chunk,
    )


@pytest.fixture(scope="module")
def batch(synthetic_data):
    """13 raw training rows of the synthetic dataset."""
    data = AlignmentDataModule(train=str(synthetic_data / "train.jsonl"), batch_size=13)
    data.connect(make_module())
    data.setup("fit")
    return next(iter(data._loader("train", shuffle=False)))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", [ClipLoss, SigLipLoss], ids=["clip", "siglip"])
def test_grad_cache_gives_full_batch_gradients(batch, loss):
    """13 rows in chunks of 5 (last chunk 3): every trainable gradient equals the plain step's to 1e-5."""
    plain = make_module(loss())
    cached = copy.deepcopy(plain)
    cached.hparams.grad_cache_chunk = 5
    losses = plain.compute_losses(plain(batch))
    torch.stack(list(losses.values())).sum().backward()
    loss_value, cached_losses, embeds = cached.grad_cache_step(batch)
    assert torch.allclose(loss_value, sum(losses.values()).detach(), atol=1e-6)
    assert embeds["image"].shape == (13, 32) and not embeds["image"].requires_grad
    g_plain, g_cached = _grads(plain), _grads(cached)
    assert set(g_plain) == set(g_cached) and any("log_scale" in n for n in g_cached)
    for name, g in g_plain.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(g_cached[name], g, rtol=1e-5, atol=1e-5), (name, (g_cached[name] - g).abs().max())


def test_grad_cache_fit_follows_the_plain_fit(synthetic_data, tmp_path):
    """Two Lightning SGD steps with manual optimization (GradCache) land on the automatic run's weights."""
    data = lambda: AlignmentDataModule(train=str(synthetic_data / "train.jsonl"), batch_size=16)  # noqa: E731
    results, initial = [], make_module().state_dict()
    for chunk in (None, 4):
        module = make_module(grad_cache_chunk=chunk)
        assert module.automatic_optimization is (chunk is None)
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        L.seed_everything(0)
        trainer.fit(module, data())
        assert trainer.global_step == 2
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        results.append({k: v.clone() for k, v in module.state_dict().items()})
    moved = False
    for k, v in results[0].items():
        assert torch.allclose(results[1][k], v, rtol=1e-5, atol=1e-5), k
        moved |= not torch.equal(v, initial[k])
    assert moved, "the optimizer never changed the weights"


def test_grad_cache_rejects_batch_norm_and_bad_sizes():
    with pytest.raises(ValueError, match="BatchNorm1d"):
        make_module(grad_cache_chunk=4, norm="batch")
    with pytest.raises(ValueError, match="positive"):
        make_module(grad_cache_chunk=0)
    assert chunk_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    sliced = slice_rows({"x": torch.zeros(7, 2), "sr": 16000, "ids": list("abcdefg")}, 3, 6, 7)
    assert sliced["x"].shape == (3, 2) and sliced["sr"] == 16000 and sliced["ids"] == ["d", "e", "f"]


def test_cropped_whisper_features_equal_the_30s_window():
    """pad_to_30s=False computes log-mels of the real audio only, yet gives the 30 s window's features."""
    import numpy as np

    from encoders.whisper import WhisperSpeechEncoder

    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 20800, 33333)]
    encoder = WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False)
    short = encoder.preprocess(waves, sampling_rate=16000)
    encoder.pad_to_30s = True
    full = encoder.preprocess(waves, sampling_rate=16000)
    encoder.pad_to_30s = False
    assert short["input_features"].shape == full["input_features"].shape == (3, 80, 3000)
    assert torch.equal(short["feature_lengths"], full["feature_lengths"])
    assert torch.allclose(short["input_features"], full["input_features"], atol=1e-5)
    assert torch.allclose(encoder(short).pooled, encoder(full).pooled, atol=1e-5)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "bf16"])
def test_trainer_configs_compose_with_a_recipe(name):
    """configs/trainer/*.yaml hold trainer keys only and type-check when composed after a recipe."""
    from lightning.pytorch.cli import LightningCLI

    class ParseOnlyCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    path = ROOT / "configs" / "trainer" / f"{name}.yaml"
    assert set(yaml.safe_load(path.read_text())) == {"trainer"}, "trainer snippets must not touch the model or data"
    cli = ParseOnlyCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       args=["--config", str(ROOT / "configs/lit_contrastive.yaml"), "--config", str(ROOT / "configs/tiny/lit_contrastive.yaml"), "--config", str(path)],
                       run=False, save_config_callback=None, auto_configure_optimizers=False)
    trainer = cli.config.trainer
    assert trainer.max_epochs == 3, "the recipe's own trainer settings survive the composition"
    if name == "bf16":
        assert trainer.precision == "bf16-mixed"
    else:
        assert trainer.strategy.class_path.endswith("DDPStrategy" if name == "ddp" else "FSDPStrategy")


@pytest.mark.slow
def test_two_process_ddp_fit_via_cli(synthetic_data, tmp_path):
    """``mmalign fit`` of the tiny LiT recipe on 2 CPU processes (gloo), GradCache on, writes a checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mmalign.cli", "fit", "--config", "configs/lit_contrastive.yaml", "--config", "configs/tiny/lit_contrastive.yaml",
            "--config", "configs/trainer/ddp.yaml", "--trainer.devices=2", "--trainer.accelerator=cpu",
            "--trainer.max_epochs=1", "--trainer.limit_val_batches=2", "--model.init_args.grad_cache_chunk=4",
            "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={tmp_path}",
            *[f"--data.init_args.{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")]]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2" in proc.stderr + proc.stdout or "MEMBER: 2/2" in proc.stderr + proc.stdout
    ckpts = list(tmp_path.rglob("epoch=*.ckpt"))  # (+ best.ckpt, a link to it)
    assert len(ckpts) == 1, ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert state["global_step"] > 0 and not any(".encoder." in k for k in state["state_dict"])
