"""Same seed and data give the same metrics on CPU: two short fits of the tiny LiT recipe, in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from mmalign.recipe import MMAlignCLI, load_recipe

CONFIGS = [Path(__file__).resolve().parents[1] / f"configs/{v}lit_contrastive.yaml" for v in ("", "tiny/")]  # recipe + tiny overlay


def _cli(data: Path, root: Path, seed: int) -> MMAlignCLI:
    args = [
        "--config", str(CONFIGS[0]), "--config", str(CONFIGS[1]), f"--seed_everything={seed}",
        "--data.init_args.train", str(data / "train.jsonl"), "--data.init_args.val", str(data / "val.jsonl"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(root),
    ]
    return load_recipe(args)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fit(data: Path, root: Path, seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    cli = _cli(data, root, seed)
    cli.trainer.fit(cli.model, cli.datamodule)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return metrics, _weights(cli.model)


def test_same_seed_same_metrics(synthetic_data, tmp_path):
    m1, w1 = _fit(synthetic_data, tmp_path / "a", seed=0)
    m2, w2 = _fit(synthetic_data, tmp_path / "b", seed=0)
    assert "val/loss" in m1 and any(k.endswith("R@1") for k in m1)
    assert m1 == m2  # exactly equal, not approximately
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # The seed does reach the projector init (so the equality above is not vacuous).
    init0, init1 = _weights(_cli(synthetic_data, tmp_path / "c", 0).model), _weights(_cli(synthetic_data, tmp_path / "d", 1).model)
    assert any(not torch.equal(init0[k], init1[k]) for k in init0)
    assert any(not torch.equal(init0[k], w1[k]) for k in init0)  # and training changed the weights
