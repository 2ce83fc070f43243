"""The training step pays only for what is written: metrics on logging steps and epoch ends, tensors moved alone."""

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from mmalign.data import AlignmentDataModule
from tests.test_module import make_module


def _fit(synthetic_data, tmp_path, log_every: int, batch_size: int = 4, epochs: int = 1, callbacks=None):
    module = make_module()
    logged: list[int] = []
    original = module.log

    def spy(name, value, *args, **kwargs):
        if name == "train/loss":
            logged.append(module.trainer.global_step)
        return original(name, value, *args, **kwargs)

    module.log = spy
    data = AlignmentDataModule(train=str(synthetic_data / "train.jsonl"), val=str(synthetic_data / "train.jsonl"),
                               batch_size=batch_size, train_languages=["en"], eval_languages=["en"])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=log_every,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=callbacks or [])
    trainer.fit(module, data)
    return trainer, logged


def test_train_metrics_are_logged_on_logging_steps_and_the_last_step_only(synthetic_data, tmp_path):
    trainer, logged = _fit(synthetic_data, tmp_path, log_every=4, epochs=2)
    per_epoch = trainer.num_training_batches
    steps = trainer.global_step
    assert per_epoch > 4 and steps == 2 * per_epoch and per_epoch % 4 != 0  # the first epoch end is no logging step
    expected = sorted({s for s in range(steps) if (s + 1) % 4 == 0} | {steps - 1})  # no epoch-end extra: nothing reads it
    assert logged == expected, (logged, expected)
    # what the logger wrote is what was logged: one row per logging step, none lost
    import csv
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    written = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert written == [s for s in range(steps) if (s + 1) % 4 == 0]
    # the fit's end has fresh values (the export and callbacks after the fit read them)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/image->text/inbatch_R@1" in trainer.callback_metrics


def test_epoch_ends_log_when_a_callback_monitors_a_train_metric(synthetic_data, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    stop = EarlyStopping(monitor="train/loss", patience=100, check_on_train_epoch_end=True)
    trainer, logged = _fit(synthetic_data, tmp_path, log_every=4, epochs=2, callbacks=[stop])
    per_epoch, steps = trainer.num_training_batches, trainer.global_step
    expected = sorted({s for s in range(steps) if (s + 1) % 4 == 0} | {per_epoch - 1, steps - 1})
    assert logged == expected, (logged, expected)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and stop.wait_count >= 0


def test_every_step_logs_when_asked(synthetic_data, tmp_path):
    trainer, logged = _fit(synthetic_data, tmp_path, log_every=1)
    assert logged == list(range(trainer.global_step))


def test_batch_transfer_moves_tensors_and_leaves_strings_alone():
    data = AlignmentDataModule()
    batch = {"meta": {"id": ["a", "b"], "concept": ["x", "y"], "lang": ["en", "de"]}, "keys": {"text": ["1", "2"]},
             "features": {"text": {"pooled": torch.zeros(2, 3)}}, "inputs": {"image": {"pixel_values": torch.zeros(2, 1)}}}
    out = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert out["features"]["text"]["pooled"].device.type == "meta"
    assert out["inputs"]["image"]["pixel_values"].device.type == "meta"
    assert out["meta"] is batch["meta"] and out["keys"] is batch["keys"]  # not walked, not copied
    assert batch["features"]["text"]["pooled"].device.type == "cpu"  # the input batch is not modified


def test_batch_transfer_returns_tensors_already_on_the_device_untouched():
    data = AlignmentDataModule()
    pooled, mask = torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool)
    batch = {"meta": {"id": ["a", "b"]}, "keys": {"text": ["1", "2"]},
             "features": {"text": {"pooled": pooled, "masks": [mask, (mask,)]}}, "present": {"text": torch.ones(2)}}
    out = data.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert out["features"]["text"]["pooled"] is pooled  # no copy, no .to() call
    assert out["features"]["text"]["masks"][0] is mask and out["features"]["text"]["masks"][1][0] is mask
    assert isinstance(out["features"]["text"]["masks"][1], tuple)
    moved = data.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["features"]["text"]["masks"][1][0].device.type == "meta" and moved["present"]["text"].device.type == "meta"


def test_plain_attribute_fast_path_keeps_module_semantics():
    module = make_module()
    module._current_fx_name = "training_step"  # an existing plain attribute: stored in __dict__ directly
    assert module.__dict__["_current_fx_name"] == "training_step"
    module._current_fx_name = None
    assert module._current_fx_name is None
    module.register_buffer("scratch", torch.ones(2))
    module.scratch = None  # a registered buffer still goes through nn.Module (stays a buffer name)
    assert "scratch" in module._buffers and module._buffers["scratch"] is None and "scratch" not in module.__dict__
    head = torch.nn.Linear(2, 2)
    module.extra = head  # submodules and parameters too
    assert module._modules["extra"] is head and "extra" not in module.__dict__
    module.flag = 1
    module.flag = torch.nn.Parameter(torch.zeros(1))  # a plain attribute replaced by a parameter: nn.Module's path
    assert "flag" in module._parameters and "flag" not in module.__dict__


def test_fast_attribute_path_trains_bit_identically(synthetic_data, tmp_path, monkeypatch):
    from mmalign.training.base import FrozenBackboneModule

    def run(name):
        L.seed_everything(0)
        trainer, _ = _fit(synthetic_data, tmp_path / name, log_every=2, epochs=2)
        module = trainer.lightning_module
        return trainer.callback_metrics["train/loss"].clone(), [p.detach().clone() for p in module.trainable_parameters()]

    fast = run("fast")
    monkeypatch.setattr(FrozenBackboneModule, "__setattr__", torch.nn.Module.__setattr__)
    slow = run("slow")
    assert torch.equal(fast[0], slow[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))
