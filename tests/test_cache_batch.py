"""``mmalign cache`` chooses the encoder forward batch per encoder and device (issue 21.6), not the
recipe's training batch."""

from __future__ import annotations

import torch

import encoders
import projectors
import mmalign.cache.writer as writer
from mmalign import AlignmentModule, ClipLoss, Objective, Tower
from mmalign.cache.command import ENCODE_BATCH, cache, encode_batch_size
from mmalign.data import AlignmentDataModule


def test_batch_by_modality_device_encoder_and_budget():
    image = encoders.TimmImageEncoder("tiny:timm-vit")
    text = encoders.HFTextEncoder("tiny:xlmr-text")
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert encode_batch_size(image, cpu) == ENCODE_BATCH["image"][0]
    assert encode_batch_size(image, gpu) == ENCODE_BATCH["image"][1]
    assert encode_batch_size(text, cpu) == ENCODE_BATCH["text"][0]
    assert encode_batch_size(image, gpu, memory_budget_gb=0.25) == 32  # 8 MB an image
    assert encode_batch_size(image, cpu, memory_budget_gb=1e-9) == 1
    image.cache_batch_size = 5
    assert encode_batch_size(image, cpu) == 5


def test_cache_ignores_the_training_batch(synthetic_data, tmp_path, monkeypatch):
    seen: dict[str, set[int]] = {}
    real = writer.encode_shard

    def spy(plan, k, **kw):
        seen.setdefault(str(plan.encoder.modality), set()).add(kw["batch_size"])
        return real(plan, k, **kw)

    monkeypatch.setattr(writer, "encode_shard", spy)
    towers = {
        "image": Tower(encoders.TimmImageEncoder("tiny:timm-vit"), "image", lambda i, o: projectors.Linear(i, o)),
        "text": Tower(encoders.HFTextEncoder("tiny:xlmr-text"), "text", lambda i, o: projectors.Linear(i, o)),
    }
    model = AlignmentModule(towers, [Objective(ClipLoss(), ["image", "text"])], embed_dim=16)
    manifest = str(synthetic_data / "val.jsonl")
    dm = AlignmentDataModule(train=manifest, val=manifest, batch_size=256, cache_dir=str(tmp_path / "c"))
    cache(model, dm, split="train", shard_size=10, progress=False, device="cpu")
    assert seen == {"image": {ENCODE_BATCH["image"][0]}, "text": {ENCODE_BATCH["text"][0]}}
    seen.clear()
    dm = AlignmentDataModule(train=manifest, val=manifest, batch_size=256, cache_dir=str(tmp_path / "d"))
    cache(model, dm, split="train", batch_size=3, shard_size=10, progress=False, device="cpu")
    assert seen == {"image": {3}, "text": {3}}
