"""Exact resume around a mid-epoch validation (``trainer.val_check_interval`` < 1 epoch).

A validation run during fit opens the validation loader, whose iterator used to draw its base seed from the
global torch RNG, shifting every later dropout mask. A checkpoint written at the end of the training
step that a validation follows (``every_n_train_steps``, saved in ``on_train_batch_end``, before the
validation) holds the stream from before that draw, and Lightning's resume skips the pending validation
("fast forward progress counters to end of validation"), so the resumed run drew other masks than the
uninterrupted one. The evaluation loaders now draw from their own generator (``AlignmentDataModule._loader``),
which keeps validation off the training stream (as Lightning's ``isolate_rng`` does for the sanity check): resumed from either side of a mid-epoch
validation, raw files, a feature cache and resident features give the uninterrupted run's batches, training
losses, later validation losses and weights, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.test_resume import CONFIGS, tiny_cache  # noqa: F401  (tiny_cache: the tiny recipe's feature cache fixture)

STEPS_PER_EPOCH = 4  # 64 synthetic training rows, batch 16, drop_last
VAL_EVERY = 2  # validation after steps 2 and 4 of every epoch: step 2 is mid-epoch


class _Record(L.Callback):
    """Batches, training losses, validation losses and the global torch RNG around validation.

    ``on_validation_start`` sees the state after the validation loader was opened, ``on_train_batch_start`` the
    state the next training step starts from.
    """

    def __init__(self) -> None:
        self.batches: list[tuple[int, tuple[str, ...]]] = []
        self.losses: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.rng: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.global_step, tuple(batch["meta"]["id"])))
        self.rng.setdefault(f"start {trainer.global_step}", torch.get_rng_state())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.global_step, float(outputs["loss"])))
        self.rng.setdefault(f"end {trainer.global_step}", torch.get_rng_state())

    def on_validation_start(self, trainer, pl_module):
        self.rng.setdefault(f"val {trainer.global_step}", torch.get_rng_state())

    def on_validation_end(self, trainer, pl_module):
        self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def _fit(data: Path, root: Path, extra: list[str], ckpt: Path | None = None) -> tuple[dict, _Record]:
    from mmalign.recipe import load_recipe

    torch.set_num_threads(1)
    args = [
        "--config", str(CONFIGS[0]), "--config", str(CONFIGS[1]), "--seed_everything=0",
        "--data.init_args.train", str(data / "train.jsonl"), "--data.init_args.val", str(data / "val.jsonl"),
        "--trainer.max_epochs=2", f"--trainer.val_check_interval={VAL_EVERY}", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        # saved in on_train_batch_end: before the validation that follows the step
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'before_val'}",
        "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.every_n_train_steps={VAL_EVERY}",
        "--trainer.callbacks.filename={step}",
        # monitored: saved at the end of every validation, mid-epoch ones included
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'after_val'}",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.filename={step}",
        *extra,  # the recipe's projector dropout 0.1 stays on: the masks are what a shifted stream changes
    ]
    cli = load_recipe(args)
    record = _Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}, record


@pytest.mark.parametrize("source", ["raw", "cached", "resident"])
def test_resume_after_mid_epoch_validation_matches_uninterrupted(source, synthetic_data, tiny_cache, tmp_path):  # noqa: F811
    extra = {"raw": [], "cached": [f"--data.init_args.cache_dir={tiny_cache}"],
             "resident": [f"--data.init_args.cache_dir={tiny_cache}", "--data.init_args.resident=true"]}[source]
    full_w, full = _fit(synthetic_data, tmp_path / "full", extra)
    assert [s for s, _ in full.val] == [2, 4, 6, 8]  # mid-epoch and epoch-end validations
    assert len(full.batches) == 2 * STEPS_PER_EPOCH
    # The validation loader drew its seed from its own generator, and step 3 starts from the state step 2 ended
    # with: validation is off the training stream. ("start 2": the third batch; after step 4 the next epoch's
    # training loader opens and draws, as in any run)
    for step in (2, 6):
        assert torch.equal(full.rng[f"val {step}"], full.rng[f"end {step}"]), step
        assert torch.equal(full.rng[f"start {step}"], full.rng[f"end {step}"]), step

    for side in ("before_val", "after_val"):
        start = tmp_path / f"full/{side}/step=2.ckpt"
        ckpt = torch.load(start, weights_only=True)
        assert (ckpt["epoch"], ckpt["global_step"]) == (0, 2), side
        done = ckpt["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"]
        assert (done > 0) == (side == "after_val"), (side, done)  # the two checkpoints straddle the validation
        res_w, res = _fit(synthetic_data, tmp_path / f"resumed_{side}", extra, ckpt=start)
        # Lightning does not rerun the validation due after the checkpointed step (from before_val it skips it):
        # the resumed run validates after steps 4, 6 and 8, with the uninterrupted run's losses.
        assert res.val == full.val[1:], side
        assert res.batches == full.batches[2:], side  # the same remaining batches ...
        assert res.losses == full.losses[2:], side  # ... the same dropout masks: the same training losses
        assert res_w.keys() == full_w.keys()
        for name, p in full_w.items():
            assert torch.equal(res_w[name], p), (side, name)
