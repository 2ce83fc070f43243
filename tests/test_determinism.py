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


def test_training_order_is_a_function_of_seed_and_epoch():
    """The training sampler's epoch order depends on (seed, epoch) only: not on the global RNG, nor on the epochs
    iterated before (what lets a fit resumed at an epoch end see the same batches: tests/test_resume.py)."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    from mmalign.data.datamodule import EpochRandomSampler

    data = list(range(40))
    run = EpochRandomSampler(data, seed=7)
    orders = []
    for epoch in range(3):
        run.set_epoch(epoch)
        orders.append(list(run))
        torch.rand(5)  # other draws from the global RNG in between change nothing
    assert orders[0] != orders[1] != orders[2] and sorted(orders[2]) == data
    assert list(EpochRandomSampler(data, seed=7, epoch=2)) == orders[2]  # a fresh process at epoch 2
    assert list(EpochRandomSampler(data, seed=8, epoch=2)) != orders[2]
    torch.manual_seed(7)
    assert EpochRandomSampler(data).seed == 7  # default: the run's seed

    # Mid-epoch: the StatefulDataLoader state resumes the epoch's remaining batches, seed included.
    loader = StatefulDataLoader(data, batch_size=4, sampler=EpochRandomSampler(data, seed=3, epoch=1))
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(3)]
    state = loader.state_dict()
    rest = [b.tolist() for b in it]
    again = StatefulDataLoader(data, batch_size=4, sampler=EpochRandomSampler(data, seed=99, epoch=1))
    again.load_state_dict(state)
    assert [b.tolist() for b in again] == rest and len(seen) + len(rest) == 10

    # Lightning sees a shuffled loader, so under DDP it swaps in a shuffling DistributedSampler.
    assert _is_dataloader_shuffled(loader)
    dist = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=0)
    assert isinstance(dist, DistributedSampler) and dist.shuffle
