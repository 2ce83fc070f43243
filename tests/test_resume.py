"""Kill-and-resume with real subprocesses and SIGKILL, plus safe checkpoint loading.

``mmalign fit`` on the tiny LiT recipe saves ``last.ckpt`` every 3 steps; one run is SIGKILLed at
step 5 (mid-epoch 2 of 2, 4 steps per epoch) and resumed with ``--ckpt_path``; it must end at the same
step with the same final validation metrics (within tolerance) as an uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs/lit_contrastive.yaml", ROOT / "configs/tiny/lit_contrastive.yaml"]  # recipe + tiny overlay
KILLER = '''
import os, signal
import lightning as L

class KillAt(L.Callback):
    """SIGKILL this process right after optimizer step ``step`` (no cleanup, like an OOM kill or preemption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def _args(data: Path, run: Path) -> list[str]:
    return [
        sys.executable, "-m", "mmalign.cli", "fit", "--config", str(CONFIGS[0]), "--config", str(CONFIGS[1]),
        "--data.init_args.train", str(data / "train.jsonl"), "--data.init_args.val", str(data / "val.jsonl"),
        "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(run),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(run / "ckpt"),
        "--trainer.callbacks.every_n_train_steps", "3", "--trainer.callbacks.save_last", "true",
        "--trainer.callbacks.save_top_k", "0",
        "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(run / "logs"),
        # the recipe's projector dropout stays on: the global RNG is in the checkpoint (mmalign.training.rng)
    ]


def _final_val(run: Path) -> dict[str, float]:
    """The last logged validation metrics of the run's most recent CSV log."""
    logs = sorted((run / "logs/lightning_logs").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(logs[-1].open()))
    last = [r for r in rows if r.get("val/loss")][-1]
    return {k: float(v) for k, v in last.items() if v and (k.startswith("val/") or k in ("epoch", "step"))}


@pytest.fixture(scope="module")
def runs(synthetic_data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "killer.py").write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(ROOT)]), HF_HUB_OFFLINE="1")
    full, killed = tmp / "full", tmp / "killed"
    log = lambda name: (tmp / f"{name}.log").open("w")  # noqa: E731
    # The uninterrupted and the doomed run share the 2 cores.
    p_full = subprocess.Popen(_args(synthetic_data, full), cwd=ROOT, env=env, stdout=log("full"), stderr=subprocess.STDOUT)
    p_kill = subprocess.Popen(_args(synthetic_data, killed) + ["--trainer.callbacks+=killer.KillAt", "--trainer.callbacks.step", "5"],
                              cwd=ROOT, env=env, stdout=log("kill"), stderr=subprocess.STDOUT)
    rc_kill, rc_full = p_kill.wait(timeout=300), p_full.wait(timeout=300)
    # Loadable with weights_only=True: no pickled objects in our checkpoints.
    at_kill = torch.load(killed / "ckpt/last.ckpt", weights_only=True, map_location="cpu")
    resumed = subprocess.run(_args(synthetic_data, killed) + ["--ckpt_path", str(killed / "ckpt/last.ckpt")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return {"rc_full": rc_full, "rc_kill": rc_kill, "at_kill": at_kill, "resumed": resumed, "full": full,
            "killed": killed, "logs": tmp}


def test_kill_and_resume_matches_uninterrupted(runs):
    assert runs["rc_full"] == 0, (runs["logs"] / "full.log").read_text()[-3000:]
    assert runs["rc_kill"] == -signal.SIGKILL, (runs["logs"] / "kill.log").read_text()[-3000:]
    # Killed after step 5: the last checkpoint is step 3, mid-epoch 0 (4 steps per epoch).
    assert runs["at_kill"]["global_step"] == 3 and runs["at_kill"]["epoch"] == 0
    # Frozen encoders are not in the checkpoint; projector weights and optimizer state are.
    keys = runs["at_kill"]["state_dict"].keys()
    assert keys and all(".projector." in k or ".loss." in k for k in keys), sorted(keys)
    assert runs["at_kill"]["optimizer_states"][0]["state"], "AdamW moments must be saved"
    res = runs["resumed"]
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Restored all states from the checkpoint" in res.stdout + res.stderr
    full_ckpt = torch.load(runs["full"] / "ckpt/last.ckpt", weights_only=True)
    resumed_ckpt = torch.load(runs["killed"] / "ckpt/last.ckpt", weights_only=True)
    # 8 steps in all; last.ckpt is written every 3 steps, so both runs' last one is step 6.
    assert resumed_ckpt["global_step"] == full_ckpt["global_step"] == 6
    full, resumed = _final_val(runs["full"]), _final_val(runs["killed"])
    print(f"final val/loss uninterrupted {full['val/loss']:.4f} resumed {resumed['val/loss']:.4f}")
    assert full["epoch"] == resumed["epoch"] == 1 and full["step"] == resumed["step"] == 7  # 0-based step of the last log
    # The training DataLoader is a torchdata StatefulDataLoader, so Lightning restores the sampler position
    # and shuffle state: the resumed run sees exactly the remaining batches, with the same dropout masks.
    assert resumed["val/loss"] == pytest.approx(full["val/loss"], rel=1e-5)
    for name, p in full_ckpt["state_dict"].items():
        torch.testing.assert_close(resumed_ckpt["state_dict"][name], p, atol=1e-6, rtol=1e-5, msg=name)


def test_mismatched_checkpoint_is_refused(runs, tmp_path):
    """A checkpoint whose projector tensors do not have the model's shapes is refused, naming the tensor."""
    from mmalign.recipe import load_recipe

    ckpt = torch.load(runs["full"] / "ckpt/last.ckpt", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if k.endswith("weight") and v.ndim == 2)
    ckpt["state_dict"][name] = ckpt["state_dict"][name][:, :-1].clone()  # one input column short
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    cli = load_recipe(_args(Path(ckpt["datamodule_hyper_parameters"]["train"]).parent, tmp_path / "x")[4:])
    with pytest.raises(RuntimeError, match=rf"size mismatch for {name}.*copying a param with shape"):
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(bad))


# -- resume from a checkpoint taken at an epoch end -------------------------------------------------------------
# Lightning does not checkpoint the global RNG, and a sampler seeded from it once reshuffled a resumed epoch
# differently. The training sampler's order is a function of (seed, epoch) (EpochRandomSampler; the resident
# loader's permutation likewise), so a fit resumed from the epoch-0 checkpoint sees the uninterrupted run's
# epoch-1 batches and ends with bit-identical weights, from raw files, a feature cache and resident features.

class _BatchIds(__import__("lightning").Callback):
    """Records ``(epoch, row ids)`` of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, tuple(batch["meta"]["id"])))


@pytest.fixture(scope="module")
def tiny_cache(synthetic_data, tmp_path_factory) -> Path:
    import yaml

    from mmalign.cli import main
    from mmalign.recipe import load_config

    tmp = tmp_path_factory.mktemp("epoch_resume_cache")
    recipe = tmp / "recipe.yaml"  # the tiny recipe composed into one file, on this session's synthetic data
    recipe.write_text(yaml.safe_dump(load_config("lit_contrastive", variant="tiny")).replace("data/synthetic", str(synthetic_data)))
    main(["cache", "--config", str(recipe), "--output", str(tmp / "cache"),
          "--dtype=float32", "--progress=false"])
    return tmp / "cache"


def _epoch_fit(data: Path, root: Path, extra: list[str], ckpt: Path | None = None) -> tuple[dict, list]:
    from mmalign.recipe import load_recipe

    args = [
        "--config", str(CONFIGS[0]), "--config", str(CONFIGS[1]), "--seed_everything=0",
        "--data.init_args.train", str(data / "train.jsonl"), "--data.init_args.val", str(data / "val.jsonl"),
        "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={root}", "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.every_n_epochs=1",
        *extra,  # dropout on, as in _args
    ]
    cli = load_recipe(args)
    ids = _BatchIds()
    cli.trainer.callbacks.append(ids)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}, ids.seen


@pytest.mark.parametrize("source", ["raw", "cached", "resident"])
def test_resume_at_epoch_end_matches_uninterrupted(source, synthetic_data, tiny_cache, tmp_path):
    extra = {"raw": [], "cached": [f"--data.init_args.cache_dir={tiny_cache}"],
             "resident": [f"--data.init_args.cache_dir={tiny_cache}", "--data.init_args.resident=true"]}[source]
    full_w, full_seen = _epoch_fit(synthetic_data, tmp_path / "full", extra)
    epoch0 = sorted((tmp_path / "full/ckpt").glob("epoch=0-*.ckpt"))
    assert len(epoch0) == 1, sorted((tmp_path / "full/ckpt").iterdir())
    # The resumed run starts from the uninterrupted run's epoch-end checkpoint, in a fresh process state: the
    # recipe seeds the global RNG again, so its state differs from the one the uninterrupted run had after epoch 0.
    start = tmp_path / "resumed/ckpt/start.ckpt"
    start.parent.mkdir(parents=True)
    start.write_bytes(epoch0[0].read_bytes())
    assert torch.load(start, weights_only=True)["epoch"] == 0
    res_w, res_seen = _epoch_fit(synthetic_data, tmp_path / "resumed", extra, ckpt=start)

    first, second = [b for e, b in full_seen if e == 0], [b for e, b in full_seen if e == 1]
    assert len(first) == len(second) == 4 and first != second  # 4 steps an epoch, reshuffled each epoch
    assert [e for e, _ in res_seen] == [1] * 4  # only epoch 1 ran again ...
    assert [b for _, b in res_seen] == second  # ... on exactly the uninterrupted run's batches
    assert full_w.keys() == res_w.keys()
    for name, p in full_w.items():
        assert torch.equal(res_w[name], p), name


# -- the global RNG in checkpoints: dropout and mixup draw the same numbers after a resume ----------------------
# mmalign.training.rng saves every rank's torch/CUDA/numpy/Python state with the checkpoint and restores it, so a
# fit with dropout (or latent mixup) resumed mid-epoch or at an epoch end ends bit-identical to the uninterrupted
# run (without it the resumed process draws from its freshly seeded stream: different masks, different weights).

def _rng_fit(data: Path, root: Path, extra: list[str], ckpt: Path | None = None) -> tuple[dict, list]:
    from mmalign.recipe import load_recipe

    torch.set_num_threads(1)
    args = [
        "--config", str(CONFIGS[0]), "--config", str(CONFIGS[1]), "--seed_everything=0",
        "--data.init_args.train", str(data / "train.jsonl"), "--data.init_args.val", str(data / "val.jsonl"),
        "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'steps'}",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.filename={step}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={root / 'epochs'}",
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.every_n_epochs=1", *extra,
    ]
    cli = load_recipe(args)
    ids = _BatchIds()
    cli.trainer.callbacks.append(ids)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt))
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}, ids.seen


@pytest.mark.parametrize("randomness", ["dropout", "mixup"])
def test_resume_with_dropout_or_mixup_is_bit_identical(randomness, synthetic_data, tiny_cache, tmp_path):
    from mmalign.training.rng import KEY

    extra = {"dropout": [],  # the recipe's projector dropout 0.1
             "mixup": [f"--data.init_args.cache_dir={tiny_cache}", "--model.init_args.mixup_alpha=1.0",
                       "--model.init_args.towers.text.init_args.projector.init_args.dropout=0.0"]}[randomness]
    full_w, full_seen = _rng_fit(synthetic_data, tmp_path / "full", extra)
    mid = torch.load(tmp_path / "full/steps/step=3.ckpt", weights_only=True)  # still loadable without pickles
    end = next((tmp_path / "full/epochs").glob("epoch=0-*.ckpt"))
    assert (mid["epoch"], mid["global_step"]) == (0, 3) and torch.load(end, weights_only=True)["global_step"] == 4
    assert mid[KEY]["world_size"] == 1 and len(mid[KEY]["ranks"]) == 1
    for name, start, steps in (("mid_epoch", tmp_path / "full/steps/step=3.ckpt", 5), ("epoch_end", end, 4)):
        res_w, res_seen = _rng_fit(synthetic_data, tmp_path / name, extra, ckpt=start)
        assert res_seen == full_seen[-steps:], name  # the same remaining batches ...
        for k, p in full_w.items():  # ... and the same masks / mixes: bit-identical weights
            assert torch.equal(res_w[k], p), (name, k)
    # A checkpoint from before the RNG was saved still resumes (the process's own stream: not exact).
    old = torch.load(end, weights_only=True)
    del old[KEY]
    torch.save(old, tmp_path / "old.ckpt")
    old_w, old_seen = _rng_fit(synthetic_data, tmp_path / "old", extra, ckpt=tmp_path / "old.ckpt")
    assert old_seen == full_seen[-4:]
    assert any(not torch.equal(old_w[k], p) for k, p in full_w.items())  # the stream matters: the test can fail
