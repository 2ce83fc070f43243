"""AlignmentModule: only projectors train and are saved; retrieval improves well above chance."""

import lightning as L
import torch

import encoders
import projectors
from mmalign import AlignmentModule, ClipLoss, MSELoss, Objective, Tower
from mmalign.data import AlignmentDataModule


def make_module(embed_dim=32):
    image = Tower(encoders.TimmImageEncoder("tiny:timm-vit"), field="image",
                  projector=lambda i, o: projectors.MLP(i, o, num_blocks=1, dropout=0.0))
    text = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), field="text",
                 projector=lambda i, o: projectors.MLP(i, o, num_blocks=1, dropout=0.0))
    return AlignmentModule(
        towers={"image": image, "text": text},
        objectives=[Objective(ClipLoss(), ["image", "text"])],
        embed_dim=embed_dim,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )


def test_only_projectors_are_trainable_and_saved():
    module = make_module()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".projector." in n or n.startswith("objectives.") for n in trainable)
    state = module.state_dict()
    assert not any(".encoder." in k for k in state), "frozen encoder weights leaked into the checkpoint"
    assert set(state) == {n for n, _ in module.named_parameters() if ".encoder." not in n} | {
        k for k in state if "running" in k or "num_batches" in k}
    module.train()
    assert not module.towers["image"].encoder.training and module.towers["image"].projector.training
    # round trip: a fresh module loads the projector-only state dict exactly
    other = make_module()
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])


def test_shared_dim_comes_from_frozen_teacher():
    student = Tower(encoders.HFTextEncoder("tiny:xlmr-text"), field="text", projector=projectors.Linear)
    teacher = Tower(encoders.OpenClipTextEncoder("tiny:open-clip"), field="text")
    module = AlignmentModule({"student": student, "teacher": teacher}, [Objective(MSELoss(), ["student", "teacher"])])
    assert module.embed_dim == teacher.encoder.output_dim == student.out_dim


def test_retrieval_rises_well_above_chance(synthetic_data, tmp_path):
    """Image<->text R@1 on the synthetic training concepts after a short fit, vs the untrained module."""
    torch.manual_seed(0)
    module = make_module()
    data = AlignmentDataModule(train=str(synthetic_data / "train.jsonl"), val=str(synthetic_data / "train.jsonl"),
                               batch_size=24, train_languages=["en"], eval_languages=["en"])
    trainer = L.Trainer(max_epochs=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        check_val_every_n_epoch=1000)
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    n_concepts = len(data.datasets["val"])
    chance = 1 / n_concepts
    assert after["val/en/image->text/R@1"] >= 0.6, after
    assert after["val/en/text->image/R@1"] >= 0.6, after
    assert after["val/R@1"] > before["val/R@1"] + 0.3 and after["val/R@1"] > 10 * chance


def test_all_skipped_batch_is_a_no_op():
    module = make_module()
    empty = {"meta": {"id": [], "concept": [], "lang": []}, "keys": {}, "inputs": {}, "skipped": {"corrupt image": 4}}
    assert module.training_step(empty, 0) is None
    module._eval_step(empty, "val")
    assert not module._eval_store


def test_loss_names_are_prefixed_only_when_objectives_span_several_pairs():
    import torch.nn.functional as F

    module = make_module()
    e = {"image": torch.randn(4, 32), "text": torch.randn(4, 32)}
    assert set(module.compute_losses(e)) == {"clip_loss"}
    module.objectives.append(Objective(MSELoss(), ["image", "text"], weight=2.0))
    losses = module.compute_losses(e)
    assert set(losses) == {"clip_loss", "mse_loss"}
    torch.testing.assert_close(losses["mse_loss"], 2.0 * F.mse_loss(e["image"], e["text"]))
    module.objectives.append(Objective(MSELoss(), ["text", "image"]))
    assert set(module.compute_losses(e)) == {"image-text/clip_loss", "image-text/mse_loss", "text-image/mse_loss"}


def test_masked_false_negatives_use_the_batch_concepts():
    """With ClipLoss(false_negatives="mask") the module groups rows by meta["concept"]; plain CLIP ignores it."""
    torch.manual_seed(0)
    image = Tower(encoders.TimmImageEncoder("tiny:timm-vit"), field="image", projector=projectors.Linear)
    text = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), field="text", projector=projectors.Linear)
    masked = AlignmentModule({"image": image, "text": text},
                             [Objective(ClipLoss(false_negatives="mask"), ["image", "text"])], embed_dim=8)
    embeds = {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
    batch = {"meta": {"id": list("abcd"), "concept": ["cat", "cat", "dog", None], "lang": ["en", "de", "en", "en"]}}
    groups = masked.batch_groups(batch)
    assert groups[0] == groups[1] and len(set(groups.tolist())) == 3
    # a concept-less row is its own group, distinct from another rank's concept-less row at the same position
    other_rank = {"meta": {"id": list("wxyz"), "concept": ["cow", "cat", "pig", None], "lang": ["en"] * 4}}
    assert masked.batch_groups(other_rank)[3] != groups[3]
    got = masked.compute_losses(embeds, groups)["clip_loss"]
    expected = ClipLoss(false_negatives="mask")(embeds["image"], embeds["text"], groups)["clip_loss"]
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, ClipLoss()(embeds["image"], embeds["text"])["clip_loss"])
    plain = make_module(embed_dim=8)
    assert plain.batch_groups(batch) is None  # nothing to compute when no loss masks
