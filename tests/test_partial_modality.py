"""Partial-modality batches: a row feeds the towers whose fields it has; each objective runs on the rows that hold
both of its towers. A mixed batch gives the same loss per objective as its sub-batches computed apart (raw, cached,
GradCache), rows missing a field no objective needs are not bad input, and evaluation pairs use the rows with both."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import encoders
import projectors
from mmalign import AlignmentModule, ClipLoss, MSELoss, Objective, SigLipLoss, Tower
from mmalign.data import AlignmentDataModule


def make_module(loss=ClipLoss, grad_cache_chunk=None, retrieval=None):
    """Image <-> text (contrastive) and speech -> text (contrastive + MSE): the anchor-bind shape, tiny."""
    torch.manual_seed(0)
    towers = {
        "image": Tower(encoders.TimmImageEncoder("tiny:timm-vit"), field="image", projector=projectors.Linear),
        "speech": Tower(encoders.WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False), field="audio",
                        projector=projectors.Linear),
        "text": Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), field="text", projector=projectors.Linear),
    }
    objectives = [
        Objective(loss(), ["image", "text"]),
        Objective(loss(), ["speech", "text"]),
        Objective(MSELoss(), ["speech", "text"], weight=0.5),
    ]
    return AlignmentModule(towers, objectives, embed_dim=16, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                           grad_cache_chunk=grad_cache_chunk, retrieval=retrieval)


@pytest.fixture(scope="module")
def partial_data(synthetic_data, tmp_path_factory) -> Path:
    """The synthetic rows with audio removed from half of them and images from a quarter (never both)."""
    out = tmp_path_factory.mktemp("partial")
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (synthetic_data / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        for i, row in enumerate(rows):
            for key in ("image", "audio"):
                row[key] = str(synthetic_data / row[key])
            if i % 2 == 0:
                del row["audio"]
            elif i % 4 == 1:
                del row["image"]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _datamodule(root: Path, module, batch_size=12, cache_dir=None) -> AlignmentDataModule:
    data = AlignmentDataModule(train=str(root / "train.jsonl"), val=str(root / "val.jsonl"), batch_size=batch_size,
                               cache_dir=cache_dir)
    data.connect(module)
    data.setup("fit")
    return data


def _losses_apart(module, rows, collate, pairs):
    """Per-objective losses of each sub-batch of ``rows`` that holds both towers of the pair, computed alone."""
    out = {}
    for obj_i, obj in enumerate(module.objectives):
        fields = [module.towers[t].field for t in obj.towers]
        sub = [r for r in rows if all(r.get(f) is not None for f in fields)]
        batch = collate(sub)
        embeds = module(batch)
        out[obj_i] = obj(embeds, None, None)
    return out


def _per_objective(module, batch):
    from mmalign.training.module import both_present

    embeds = module(batch)
    present = batch.get("present")
    return {i: obj(embeds, None, both_present(present, obj.towers)) for i, obj in enumerate(module.objectives)}


@pytest.mark.parametrize("loss", [ClipLoss, SigLipLoss], ids=["clip", "siglip"])
def test_mixed_batch_equals_sub_batches_raw(partial_data, loss):
    module = make_module(loss)
    data = _datamodule(partial_data, module)
    rows = data.datasets["train"].rows[:12]
    collate = data._loader("train", shuffle=False).collate_fn
    batch = collate(rows)
    assert set(batch["present"]) == {"image", "speech"}  # text is in every row
    assert batch["present"]["speech"].sum() == 6 and batch["inputs"]["speech"]["input_features"].shape[0] == 6
    mixed = _per_objective(module, batch)
    apart = _losses_apart(module, rows, collate, None)
    for i in mixed:
        for key, value in mixed[i].items():
            torch.testing.assert_close(value, apart[i][key], atol=1e-5, rtol=1e-5, msg=f"objective {i} {key}")
    # the module sums them and trains on the mixed batch
    losses = module.compute_losses(module(batch), None, batch["present"])
    assert set(losses) == {"image-text/clip_loss" if loss is ClipLoss else "image-text/siglip_loss",
                           "speech-text/clip_loss" if loss is ClipLoss else "speech-text/siglip_loss",
                           "speech-text/mse_loss"}
    torch.stack(list(losses.values())).sum().backward()
    assert module.towers["image"].projector.proj.weight.grad.abs().sum() > 0


def test_mixed_batch_equals_sub_batches_cached(partial_data, tmp_path):
    from mmalign.cache.command import cache

    module = make_module()
    raw = _datamodule(partial_data, module)
    cache(module, raw, output=str(tmp_path / "cache"), progress=False)
    cached = _datamodule(partial_data, make_module(), cache_dir=str(tmp_path / "cache"))
    ds = cached.datasets["train"]
    assert len(ds) == len(raw.datasets["train"])  # no row dropped for a missing field
    batch = ds.__getitems__(list(range(12)))
    assert batch["present"]["speech"].tolist() == [i % 2 == 1 for i in range(12)]
    assert batch["features"]["speech"]["pooled"].shape[0] == 6
    mixed = _per_objective(module, batch)
    # cached features round-trip through fp16: compare against the raw mixed batch and raw sub-batches loosely
    collate = raw._loader("train", shuffle=False).collate_fn
    apart = _losses_apart(module, raw.datasets["train"].rows[:12], collate, None)
    for i in mixed:
        for key, value in mixed[i].items():
            torch.testing.assert_close(value, apart[i][key], atol=2e-3, rtol=2e-3, msg=f"objective {i} {key}")
    # and the cached sub-batches computed apart (exactly the same features)
    for i, obj in enumerate(module.objectives):
        fields = [module.towers[t].field for t in obj.towers]
        keep = [j for j, r in enumerate(ds.rows[:12]) if all(r.get(f) is not None for f in fields)]
        sub = ds.__getitems__(keep)
        for key, value in obj(module(sub)).items():
            torch.testing.assert_close(mixed[i][key], value, atol=1e-5, rtol=1e-5)


def test_grad_cache_on_mixed_batch_equals_plain_step(partial_data):
    plain = make_module()
    chunked = copy.deepcopy(plain)
    chunked.hparams.grad_cache_chunk = 5
    data = _datamodule(partial_data, plain, batch_size=12)
    batch = next(iter(data._loader("train", shuffle=False)))
    losses = plain.compute_losses(plain(batch), None, batch["present"])
    torch.stack(list(losses.values())).sum().backward()
    loss, _, embeds = chunked.grad_cache_step(batch)
    torch.testing.assert_close(loss, sum(losses.values()).detach(), atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(plain.named_parameters(), chunked.named_parameters()):
        if p.requires_grad and p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_rows_missing_an_unneeded_field_are_kept_and_unusable_rows_are_bad(partial_data, tmp_path):
    module = make_module()
    data = _datamodule(partial_data, module)
    assert data.skipped() == {}  # every row holds one objective's pair
    rows = [json.loads(x) for x in (partial_data / "train.jsonl").read_text().splitlines()]
    rows.append({"id": "text-only", "concept": "c", "lang": "en", "text": "only words"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text((partial_data / "val.jsonl").read_text())
    skip = AlignmentDataModule(train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl"), on_error="skip")
    skip.connect(module)
    skip.setup("fit")
    assert skip.skipped()["train"] == {"missing image": 1}
    strict = AlignmentDataModule(train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl"))
    strict.connect(module)
    with pytest.raises(Exception, match="text-only"):
        strict.setup("fit")


def test_fit_and_validation_on_partial_rows(partial_data, tmp_path):
    import lightning as L

    module = make_module(retrieval=[["image", "text"], ["speech", "text"], ["image", "speech"]])
    data = _datamodule(partial_data, module, batch_size=8)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    results = module.last_eval["results"]
    n_val = len(data.datasets["val"])
    # each pair is evaluated on the rows that hold both of its towers
    counts = {pair: per["all"][f"{pair.split('|')[0]}->{pair.split('|')[1]}"]["num_queries"] for pair, per in results.items()}
    rows = data.datasets["val"].rows
    assert counts["image|text"] == sum("image" in r for r in rows) < n_val
    assert counts["speech|text"] == sum("audio" in r for r in rows) < n_val
    assert "image|speech" not in results or counts["image|speech"] == sum("image" in r and "audio" in r for r in rows)


def test_retrieval_names_are_checked_with_a_suggestion():
    with pytest.raises(ValueError, match="'speach'.*did you mean 'speech'"):
        make_module(retrieval=[["image", "speach"]])


def test_every_pair_is_evaluated_by_default_and_labelled():
    module = make_module()
    assert module.retrieval_pairs == [("image", "text"), ("speech", "text"), ("image", "speech")]
    assert module.pair_kinds == {"image|text": "trained", "speech|text": "trained", "image|speech": "emergent"}
    explicit = make_module(retrieval=[["text", "image"], ["speech", "image"]])
    assert explicit.pair_kinds == {"text|image": "trained", "speech|image": "emergent"}


def test_monitor_averages_trained_pairs_only(partial_data, tmp_path):
    import lightning as L

    logged = {}
    for retrieval in (None, [["image", "text"], ["speech", "text"]]):
        module = make_module(retrieval=retrieval)
        data = _datamodule(partial_data, module, batch_size=8)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.validate(module, data, verbose=False)
        logged[retrieval is None] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if retrieval is None:
            assert module.last_eval["kinds"]["image|speech"] == "emergent"
    with_emergent, trained_only = logged[True], logged[False]
    assert "val/emergent/R@1" in with_emergent and "val/emergent/R@1" not in trained_only
    assert with_emergent["val/R@1"] == pytest.approx(trained_only["val/R@1"])
    # the monitor: mean over (trained pair, language, direction) of the per-language rows, never the pooled `all` row
    dirs = ("image->text", "text->image", "speech->text", "text->speech")
    trained = [v for k, v in with_emergent.items() if k.startswith("val/") and k.endswith("/R@1")
               and k.split("/")[1] not in ("all", "mean", "emergent", "R@1") and k.split("/")[2] in dirs]
    assert trained and with_emergent["val/R@1"] == pytest.approx(sum(trained) / len(trained))


def test_cache_of_a_split_where_no_row_has_a_field(partial_data, tmp_path):
    from mmalign.cache.command import cache

    rows = [json.loads(x) for x in (partial_data / "val.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("audio", None)
        r.setdefault("image", next(q["image"] for q in rows if "image" in q))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text((partial_data / "train.jsonl").read_text())
    module = make_module()
    cache(module, _datamodule(tmp_path, module), output=str(tmp_path / "cache"), progress=False)
    cached = _datamodule(tmp_path, make_module(), cache_dir=str(tmp_path / "cache"))
    batch = cached.datasets["val"].__getitems__([0, 1, 2])
    assert "speech" not in batch["features"] and not batch["present"]["speech"].any()
    assert set(module(batch)) == {"image", "speech", "text"}  # speech: zero rows, tied to its parameters
