"""ExportTower: an exported tower (frozen encoder + trained projector) as a frozen tower of a new training."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from mmalign.export import AlignedModel, ExportError
from mmalign.export.tower import ExportTower, resolve_export_path


@pytest.fixture(scope="module")
def space() -> Path:
    return resolve_export_path("tiny:space")


@pytest.fixture(scope="module")
def aligned(space) -> AlignedModel:
    return AlignedModel.from_pretrained(space, device="cpu")


def _rows(data: Path, split: str = "val") -> list[dict]:
    from mmalign.data.manifest import read_manifest

    return read_manifest(data / f"{split}.jsonl")[:6]


def test_forward_equals_the_exports_embed(space, aligned, synthetic_data):
    rows = _rows(synthetic_data)
    texts, images, clips = [r["text"] for r in rows], [r["image"] for r in rows], [r["audio"] for r in rows]
    for name, items, embed in (("text", texts, aligned.embed_text), ("image", images, aligned.embed_image),
                               ("speech", clips, aligned.embed_speech)):
        tower = ExportTower(str(space), tower=name)
        with torch.no_grad():
            out = tower(tower.encoder.preprocess(items))
        assert out.shape == (len(items), aligned.embed_dim)
        torch.testing.assert_close(out, embed(items, tower=name), rtol=0, atol=1e-6)
        assert not tower.trainable and not any(p.requires_grad for p in tower.parameters())
        assert tower.state_dict() == {}  # frozen: nothing of it enters a checkpoint


def test_field_defaults_to_the_trained_one_and_can_be_changed(space):
    assert ExportTower(str(space), tower="speech").field == "audio"
    assert ExportTower(str(space), tower="text", field="text_en").field == "text_en"
    with pytest.raises(ExportError, match="name the one to load"):
        ExportTower(str(space))
    with pytest.raises(ExportError, match="no tower 'txt'"):
        ExportTower(str(space), tower="txt")


def test_cache_key_is_keyed_by_the_exports_sha256(space, tmp_path):
    from mmalign.export import export_module

    a, b = ExportTower(str(space), tower="text"), ExportTower(str(space), tower="text", field="text_en")
    assert a.encoder.cache_key == b.encoder.cache_key  # the field read is not the tower's identity
    assert a.encoder.spec()["export_sha256"] == json.loads((space / "config.json").read_text())["weights"]["sha256"]
    assert ExportTower(str(space), tower="image").encoder.cache_key != a.encoder.cache_key
    # the same towers with other weights: another key, so a cache of the first export is never read for it
    model = AlignedModel.from_pretrained(space, device="cpu")
    with torch.no_grad():
        for p in model.towers["text"].projector.parameters():
            p.add_(0.1)
    module = _module_of(model)
    other = export_module(module, tmp_path / "other")
    assert ExportTower(str(other), tower="text").encoder.cache_key != a.encoder.cache_key


def _module_of(model: AlignedModel):
    """An AlignmentModule holding an AlignedModel's towers (to re-export them with edited weights)."""
    from mmalign import AlignmentModule, ClipLoss, Objective

    return AlignmentModule(dict(model.towers.items()), [Objective(ClipLoss(), ["image", "text"])], embed_dim=model.embed_dim)


def test_an_export_naming_export_encoder_is_refused(space, tmp_path):
    """An ExportEncoder never appears in a written export; a config.json naming one (a path to another folder) is
    refused by the loader's class check, so no export makes a reader open files outside its folder."""
    bad = tmp_path / "bad"
    shutil.copytree(space, bad)
    config = json.loads((bad / "config.json").read_text())
    config["towers"]["text"]["encoder"]["class_path"] = "mmalign.export.tower.ExportEncoder"
    config["towers"]["text"]["encoder"]["init_args"] = {"path": "/etc", "tower": "text"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="not a subclass"):
        AlignedModel.from_pretrained(bad, device="cpu")


def test_raw_training_with_an_export_teacher(space, synthetic_data):
    """A new student trained on raw data against an ExportTower teacher: the student moves, the teacher never."""
    import lightning as L

    from encoders.hf_text import HFTextEncoder
    from mmalign import AlignmentModule, ClipLoss, MSELoss, Objective, Tower
    from mmalign.data import AlignmentDataModule
    from projectors import MLP

    torch.manual_seed(0)
    teacher = ExportTower(str(space), tower="text", field="text_en")
    student = Tower(HFTextEncoder("tiny:xlmr-text", pooling="mean"), "text", functools.partial(MLP, hidden_dim=32, num_blocks=0))
    module = AlignmentModule({"student": student, "teacher": teacher},
                             [Objective(ClipLoss(), ["student", "teacher"]), Objective(MSELoss(), ["student", "teacher"])])
    assert module.embed_dim == 16  # implied by the export
    before_teacher = {k: v.clone() for k, v in teacher.source.tower.projector.state_dict().items()}
    before_student = {k: v.clone() for k, v in student.projector.state_dict().items()}
    data = AlignmentDataModule(train=str(synthetic_data / "train.jsonl"), val=str(synthetic_data / "val.jsonl"),
                               batch_size=16, num_workers=0)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        accelerator="cpu", limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.equal(v, teacher.source.tower.projector.state_dict()[k]) for k, v in before_teacher.items())
    assert any(not torch.equal(v, student.projector.state_dict()[k]) for k, v in before_student.items())
