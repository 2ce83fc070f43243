"""Batched sweep (issue 21.4): each member of one vmapped model equals its twin trained alone."""

from __future__ import annotations

import pytest
import torch

import projectors
from mmalign.training.losses import ClipLoss, SigLipLoss
from mmalign.training.sweep import PairMember, Sweep, build_members


def _factory(kind: str, loss_cls=ClipLoss):
    def make():
        if kind == "linear":
            a, b = projectors.Linear(12, 8), projectors.Linear(10, 8)
        else:
            a, b = projectors.MLP(12, 8, hidden_dim=16, dropout=0.0), projectors.MLP(10, 8, hidden_dim=16, dropout=0.0)
        return PairMember(a, b, loss_cls())
    return make


def _batches(steps: int = 6, n: int = 16):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 12, generator=gen), torch.randn(n, 10, generator=gen)) for _ in range(steps)]


@pytest.mark.parametrize("kind,loss_cls", [("linear", ClipLoss), ("mlp", ClipLoss), ("mlp", SigLipLoss)])
def test_each_member_equals_its_sequential_twin(kind, loss_cls):
    seeds, lrs, wds = [0, 1, 2], [1e-2, 3e-3, 1e-3], [0.0, 1e-2, 0.1]
    batches = _batches()
    sweep = Sweep(build_members(_factory(kind, loss_cls), seeds), lr=lrs, weight_decay=wds)
    sweep_losses = torch.stack([sweep.step(a, b) for a, b in batches])  # [steps, N]
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        twin = _factory(kind, loss_cls)()
        opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=lrs[i], weight_decay=wds[i])
        alone = []
        for a, b in batches:
            loss = twin(a, b)
            alone.append(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.allclose(torch.stack(alone), sweep_losses[:, i], rtol=1e-5, atol=1e-6)
        state = sweep.member_state(i)
        for name, p in twin.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p, state[name], rtol=1e-4, atol=1e-6), (seed, name)
        assert torch.allclose(sweep.member(i)(*batches[0]), twin(*batches[0]), atol=1e-5)


def test_members_must_match_and_hyperparameters_per_member():
    members = build_members(_factory("linear"), [0, 1])
    with pytest.raises(ValueError, match="lr"):
        Sweep(members, lr=[1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="same trainable"):
        Sweep([members[0], _factory("mlp")()])
    assert Sweep(members).losses(*_batches(1)[0]).shape == (2,)


def test_fit_sweep_seeds_member_equals_the_plain_fit(synthetic_data, tmp_path):
    """``mmalign fit --sweep_seeds [0,3]`` on the tiny cached LiT recipe: the member of the recipe's own seed equals
    the plain ``mmalign fit`` (same initialisation, same batches), the other differs; exports and the ensemble load."""
    import yaml

    from mmalign.cli import main
    from mmalign.recipe import MMAlignCLI, load_config
    from mmalign.training.sweep import Ensemble, SweepModule

    text = yaml.safe_dump(load_config("lit_contrastive", variant="tiny")).replace("data/synthetic", str(synthetic_data))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("dropout: 0.1", "dropout: 0.0"))  # vmap members draw no randomness
    main(["cache", "--config", str(recipe), "--output", str(tmp_path / "cache"), "--progress=false"])
    common = ["fit", "--config", str(recipe), f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--trainer.max_epochs=2",
              "--trainer.limit_val_batches=0", "--seed_everything=0"]
    sweep = MMAlignCLI(args=common + [f"--trainer.default_root_dir={tmp_path / 'sweep'}", "--sweep_seeds=[0,3]"])
    plain = MMAlignCLI(args=common + [f"--trainer.default_root_dir={tmp_path / 'plain'}"])
    assert isinstance(sweep.model, SweepModule) and sweep.trainer.global_step == plain.trainer.global_step > 0
    trained = {k: v for k, v in plain.model.named_parameters() if v.requires_grad}
    same = dict(sweep.model.member(0).named_parameters())
    other = dict(sweep.model.member(1).named_parameters())
    for name, p in trained.items():
        torch.testing.assert_close(same[name], p, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(other[n], p) for n, p in trained.items())
    out = tmp_path / "sweep" / "sweep"
    assert sorted(p.name for p in out.iterdir()) == ["ensemble.json", "seed-0", "seed-3"]
    emb = Ensemble(out).embed(["a red square", "ein blauer Kreis"], tower="text")
    assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_sweep_module_refuses_dropout_in_projectors():
    from mmalign.training.sweep import SweepModule

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))

    with pytest.raises(ValueError, match="dropout: 0.0"):
        SweepModule([M()], [0])
