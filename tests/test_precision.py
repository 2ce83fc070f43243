"""Mixed precision: bf16 autocast (trainer.precision=bf16-mixed) and bf16 encoder weights stay close to fp32."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import encoders
import projectors
from mmalign import AlignmentModule, ClipLoss, Objective, Tower
from mmalign.data import AlignmentDataModule


def make_module(dtype="float32"):
    torch.manual_seed(0)
    image = Tower(encoders.TimmImageEncoder("tiny:timm-vit", dtype=dtype), field="image",
                  projector=lambda i, o: projectors.MLP(i, o, num_blocks=1, dropout=0.0))
    text = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean", dtype=dtype), field="text",
                 projector=projectors.Linear)
    return AlignmentModule(
        towers={"image": image, "text": text}, objectives=[Objective(ClipLoss(), ["image", "text"])],
        embed_dim=32, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )


@pytest.fixture(scope="module")
def data(synthetic_data):
    # Retrieval is scored on the training concepts: the point is that both precisions learn the same thing.
    return AlignmentDataModule(train=str(synthetic_data / "train.jsonl"), val=str(synthetic_data / "train.jsonl"),
                               batch_size=12, train_languages=["en"], eval_languages=["en"])


@pytest.fixture(scope="module")
def batch(data):
    data.connect(make_module())
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def _row_cosine(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def test_bf16_autocast_forward_is_close_to_fp32(batch):
    """Encoders and projectors under CPU bf16 autocast: embeddings cos > 0.99, loss within 2 %."""
    module = make_module().eval()
    with torch.no_grad():
        ref = module(batch)
        ref_loss = module.compute_losses(ref)["clip_loss"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(batch)
            low_loss = module.compute_losses(low)["clip_loss"]
    assert any(v.dtype == torch.bfloat16 for v in low.values()), "autocast did not reach the projectors"
    assert low_loss.dtype == torch.float32, "losses are computed in float32"
    for name in ref:
        assert _row_cosine(ref[name], low[name]).min() > 0.99, name
    assert abs(low_loss.item() - ref_loss.item()) / ref_loss.item() < 0.02


def test_bf16_encoder_weights_are_close_and_change_the_cache_key(batch):
    """The encoders' own ``dtype`` init arg: bf16 weights give pooled features close to fp32, keyed apart."""
    fp32, bf16 = make_module("float32"), make_module("bfloat16")
    for name in ("image", "text"):
        a, b = fp32.towers[name].encoder, bf16.towers[name].encoder
        assert a.cache_key != b.cache_key, "bf16 features must not be served from an fp32 cache"
        inputs = batch["inputs"][name]
        pa, pb = a(inputs).pooled, b(inputs).pooled
        assert pb.dtype == torch.bfloat16
        assert _row_cosine(pa, pb).min() > 0.98, name


def _fit(precision, data, tmp_path):
    L.seed_everything(0)
    module = make_module()
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    trainer.fit(module, data)
    return trainer.callback_metrics["train/loss"].item(), trainer.validate(module, data, verbose=False)[0]


def test_bf16_mixed_fit_matches_fp32(data, tmp_path):
    """Same recipe, same seed, trainer.precision 32-true vs bf16-mixed: losses and R@1 within tolerance."""
    loss32, val32 = _fit("32-true", data, tmp_path)
    loss16, val16 = _fit("bf16-mixed", data, tmp_path)
    assert abs(loss16 - loss32) / loss32 < 0.05, (loss16, loss32)
    assert abs(val16["val/loss"] - val32["val/loss"]) / val32["val/loss"] < 0.05, (val16["val/loss"], val32["val/loss"])
    assert abs(val16["val/R@1"] - val32["val/R@1"]) <= 0.1, (val16["val/R@1"], val32["val/R@1"])
    print(f"fp32 loss {loss32:.4f} R@1 {val32['val/R@1']:.3f}; bf16-mixed loss {loss16:.4f} R@1 {val16['val/R@1']:.3f}")
    assert val32["val/R@1"] > 0.3, "the fp32 reference learned nothing: the comparison would be vacuous"
