"""Batched sweep (issue 21.4): each member of one vmapped model equals its twin trained alone."""

from __future__ import annotations

import functools

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


def test_batchnorm_members_update_their_own_running_statistics():
    """BatchNorm heads: each member's running statistics and parameters equal its twin trained alone."""
    def make():
        return PairMember(projectors.MLP(12, 8, hidden_dim=16, dropout=0.0, norm="batch"),
                          projectors.MLP(10, 8, hidden_dim=16, dropout=0.0, norm="batch"), ClipLoss())

    seeds, batches = [0, 1], _batches(4)
    sweep = Sweep(build_members(make, seeds), lr=[1e-2, 1e-3])
    assert any("running_mean" in k for k in sweep.buffers) and all(v.shape[0] == 2 for v in sweep.buffers.values())
    for a, b in batches:
        sweep.step(a, b)
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        twin = make()
        opt = torch.optim.AdamW(twin.parameters(), lr=[1e-2, 1e-3][i])
        for a, b in batches:
            loss = twin(a, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = sweep.member_state(i)
        for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
            torch.testing.assert_close(state[name], t.detach(), rtol=1e-4, atol=1e-5, msg=f"{seed} {name}")
    assert not torch.allclose(sweep.buffers["a_proj.input_norm.running_var"][0], sweep.buffers["a_proj.input_norm.running_var"][1]) \
        or not torch.allclose(sweep.buffers["a_proj.blocks.0.norm.running_mean"][0], sweep.buffers["a_proj.blocks.0.norm.running_mean"][1])


def test_norm_members_under_bf16_autocast_compute_in_fp32():
    """vmap's norm rules fail on bf16 activations with fp32 weights; a sweep under bf16-mixed runs its norm members in fp32."""
    def make():
        return PairMember(projectors.MLP(12, 8, hidden_dim=16, dropout=0.0, norm="batch"),
                          projectors.MLP(10, 8, hidden_dim=16, dropout=0.0, norm="layer"), ClipLoss())

    a, b = _batches(1)[0]
    mixed, full = Sweep(build_members(make, [0, 1])), Sweep(build_members(make, [0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixed.step(a, b)
    torch.testing.assert_close(got, full.step(a, b))


def test_dropout_members_draw_their_own_masks_reproducibly():
    def make():
        return PairMember(projectors.MLP(12, 8, hidden_dim=16, dropout=0.5), projectors.MLP(10, 8, hidden_dim=16, dropout=0.5), ClipLoss())

    def run():
        torch.manual_seed(0)
        sweep = Sweep(build_members(make, [0, 0]), lr=1e-2)  # two identical members: only their masks differ
        a, b = _batches(1)[0]
        first = sweep.step(a, b)
        return sweep, first

    sweep, first = run()
    assert sweep.randomness == "different" and not torch.allclose(first[0], first[1])
    again, first_again = run()  # one seeded stream: the same masks again
    torch.testing.assert_close(first, first_again)
    for k in sweep.params:
        torch.testing.assert_close(sweep.params[k], again.params[k])
    sweep.base.eval()  # no dropout in eval mode: the members' losses are their parameters'
    a, b = _batches(1)[0]
    torch.testing.assert_close(sweep.losses(a, b)[0], sweep.member(0).eval()(a, b))


def test_sweep_members_grid_and_names():
    from mmalign.training.sweep import member_name, sweep_members

    members = sweep_members([0, 1], {"lr": [1e-3, 3e-4], "weight_decay": [0.0]})
    assert [(m["seed"], m["lr"]) for m in members] == [(0, 1e-3), (0, 3e-4), (1, 1e-3), (1, 3e-4)]
    assert member_name(members[1]) == "lr-0.0003_weight_decay-0_seed-0" and member_name({"seed": 3}) == "seed-3"
    with pytest.raises(ValueError, match="not 'momentum'"):
        sweep_members([0], {"momentum": [0.9]})
    with pytest.raises(ValueError, match="non-empty"):
        sweep_members([0], {"lr": []})


@functools.lru_cache(maxsize=None)
def _tiny_text_encoder():
    import encoders

    return encoders.HFTextEncoder("tiny:xlmr-text")  # frozen: one instance serves every tower of these modules


def _alignment_module(seed, mixup_alpha):
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower

    encoder = _tiny_text_encoder()
    torch.manual_seed(seed)
    towers = {name: Tower(encoder, field=field, projector=projectors.Linear) for name, field in (("a", "text"), ("b", "text_en"))}
    return AlignmentModule(towers, [Objective(ClipLoss(), ["a", "b"])], embed_dim=8, mixup_alpha=mixup_alpha)


def test_latent_mixup_in_a_sweep_equals_the_lone_mixup_run():
    """``mixup_alpha`` in a sweep: one mix per batch (one lambda, one permutation), drawn from the global stream
    where a lone run of the recipe draws it and shared by every member, so each member equals its lone mixup run
    under the same stream (the recipe's seed: data order and mixes); without mixup the members end elsewhere."""
    from mmalign.training.sweep import SweepModule

    gen = torch.Generator().manual_seed(2)
    batches = [{"meta": {"id": [f"r{i}" for i in range(8)], "concept": [f"c{i}" for i in range(8)]},
                "features": {t: {"pooled": torch.randn(8, 32, generator=gen)} for t in ("a", "b")}} for _ in range(4)]

    def sweep(alpha):
        module = SweepModule([_alignment_module(s, alpha) for s in (0, 3)], seeds=[0, 3])
        torch.manual_seed(11)
        for batch in batches:
            module.training_step(batch, 0)
        return module

    mixed, plain = sweep(1.0), sweep(None)
    for i, seed in enumerate((0, 3)):
        lone = _alignment_module(seed, 1.0)
        opt = lone.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        torch.manual_seed(11)
        for batch in batches:
            loss = lone.training_step(batch, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        member, unmixed = dict(mixed.member(i).named_parameters()), dict(plain.member(i).named_parameters())
        trained = {n: p for n, p in lone.named_parameters() if p.requires_grad}
        for name, p in trained.items():
            torch.testing.assert_close(member[name], p, rtol=1e-4, atol=1e-6, msg=f"{seed} {name}")
        assert any(not torch.allclose(unmixed[n], p, atol=1e-4) for n, p in trained.items()), seed


_SCHEDULE = ["--model.init_args.scheduler.class_path=torch.optim.lr_scheduler.LinearLR",  # warm-up over 3 steps
             "--model.init_args.scheduler.init_args.start_factor=0.1", "--model.init_args.scheduler.init_args.total_iters=3"]


@pytest.fixture(scope="module")
def lit_recipe(synthetic_data, tmp_path_factory):
    """The tiny LiT recipe without dropout (members equal lone fits exactly) and its feature cache."""
    import yaml

    from mmalign.cli import main
    from mmalign.recipe import load_config

    tmp = tmp_path_factory.mktemp("lit_sweep")
    text = yaml.safe_dump(load_config("lit_contrastive", variant="tiny")).replace("data/synthetic", str(synthetic_data))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(text.replace("dropout: 0.1", "dropout: 0.0"))
    main(["cache", "--config", str(recipe), "--output", str(tmp / "cache"), "--progress=false"])
    common = ["fit", "--config", str(recipe), f"--data.init_args.cache_dir={tmp / 'cache'}", "--trainer.limit_val_batches=0",
              "--seed_everything=0", "--trainer.max_epochs=2", *_SCHEDULE]
    return tmp, common


_CKPT = ["--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
         "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1"]


@pytest.fixture(scope="module")
def lit_sweep(lit_recipe):
    """The tiny cached LiT recipe swept over seeds [0, 3] x lr [1e-3, 4e-3] with a warm-up schedule for 2 epochs
    (8 steps), checkpointing every 3 steps (steps 3 and 6 kept) and exporting with two ``ExportOnFitEnd`` callbacks
    (the final members, and ``best``: the members of the best checkpoint, step 6 without a monitor); and the plain
    fit of one member's settings (lr 4e-3, seed 0)."""
    from mmalign.recipe import MMAlignCLI

    tmp, common = lit_recipe
    sweep_args = ["--sweep_seeds=[0,3]", "--sweep={lr: [0.001, 0.004]}", *_CKPT]
    exports = ["--trainer.callbacks+=mmalign.training.callbacks.ExportOnFitEnd", "--trainer.callbacks.best=true",
               f"--trainer.callbacks.output={tmp / 'export_best'}",
               "--trainer.callbacks+=mmalign.training.callbacks.ExportOnFitEnd", f"--trainer.callbacks.output={tmp / 'export'}"]
    sweep = MMAlignCLI(args=common + [f"--trainer.default_root_dir={tmp / 'sweep'}", *sweep_args, *exports])
    plain = MMAlignCLI(args=common + [f"--trainer.default_root_dir={tmp / 'plain'}", "--model.init_args.optimizer.init_args.lr=0.004"])
    return {"tmp": tmp, "common": common, "sweep_args": sweep_args, "sweep": sweep, "plain": plain}


def test_fit_sweep_member_equals_the_plain_fit_with_its_settings_and_schedule(lit_sweep):
    """``mmalign fit --sweep_seeds [0,3] --sweep '{lr: [1e-3, 4e-3]}'`` with a warm-up schedule: member (lr 4e-3, seed 0)
    equals the plain ``mmalign fit`` with that lr (same initialisation, batches, per-step rates); other members differ;
    exports, member checkpoints and the ensemble load."""
    from mmalign.export.model import AlignedModel
    from mmalign.training.sweep import Ensemble, SweepModule

    tmp, sweep, plain = lit_sweep["tmp"], lit_sweep["sweep"], lit_sweep["plain"]
    assert isinstance(sweep.model, SweepModule) and sweep.trainer.global_step == plain.trainer.global_step > 3
    names = sweep.model.names
    assert names == ["lr-0.001_seed-0", "lr-0.004_seed-0", "lr-0.001_seed-3", "lr-0.004_seed-3"]
    trained = {k: v.detach().clone() for k, v in plain.model.named_parameters() if v.requires_grad}
    same = dict(sweep.model.member(names.index("lr-0.004_seed-0")).named_parameters())
    for name, p in trained.items():
        torch.testing.assert_close(same[name], p, rtol=1e-4, atol=1e-5)
    for other in ("lr-0.001_seed-0", "lr-0.004_seed-3"):
        params = dict(sweep.model.member(names.index(other)).named_parameters())
        assert any(not torch.allclose(params[n], p) for n, p in trained.items()), other
    out = next((tmp / "sweep").rglob("ensemble.json")).parent
    assert sorted(p.name for p in out.iterdir()) == sorted(["ensemble.json", *names])
    member_dir = out / "lr-0.004_seed-0"
    state = torch.load(member_dir / "model.ckpt", weights_only=True)["state_dict"]
    plain.model.load_state_dict(state)  # a plain fit's module loads a member's checkpoint (strict)
    for name, p in plain.model.named_parameters():
        if name in trained:
            torch.testing.assert_close(p, trained[name], rtol=1e-4, atol=1e-5)
    assert "lr: 0.004" in (member_dir / "config.yaml").read_text()
    emb = AlignedModel.from_pretrained(str(member_dir)).embed(["a red square"], tower="text")
    ens = Ensemble(out).embed(["a red square", "ein blauer Kreis"], tower="text")
    assert emb.shape[0] == 1 and ens.shape[0] == 2 and torch.allclose(ens.norm(dim=-1), torch.ones(2), atol=1e-5)


def _rows(data, n=6):
    from mmalign.data.manifest import read_manifest

    rows = read_manifest(data / "test.jsonl")[:n]
    return [r["text"] for r in rows], [r["image"] for r in rows]


def test_export_callback_on_a_sweep_writes_every_member(lit_sweep, synthetic_data):
    """``ExportOnFitEnd`` on a sweep: ``<output>/<member>/`` per member and ``<output>/ensemble.json``; each export
    embeds exactly as the member's own ``model.ckpt`` (the sweep's ``<run>/sweep/<member>/``); ``best: true`` holds
    the members of the best checkpoint (step 6 here) and leaves the final weights to the rest."""
    from safetensors.torch import load_file

    from mmalign.export.model import AlignedModel
    from mmalign.training.sweep import Ensemble

    tmp, sweep = lit_sweep["tmp"], lit_sweep["sweep"].model
    texts, images = _rows(synthetic_data)
    run = next((tmp / "sweep").rglob("ensemble.json")).parent
    module = sweep.member(0).eval()
    for folder in ("export", "export_best"):
        assert sorted(p.name for p in (tmp / folder).iterdir()) == sorted(["ensemble.json", *sweep.names])
        assert Ensemble(tmp / folder).embed(texts, tower="text").shape[0] == len(texts)
    best = next(p for p in (tmp / "sweep").rglob("*.ckpt") if "step=6" in p.name)
    best_state = torch.load(best, weights_only=True)["state_dict"]
    for i, name in enumerate(sweep.names):
        module.load_state_dict(torch.load(run / name / "model.ckpt", weights_only=True)["state_dict"])
        aligned = AlignedModel.from_pretrained(str(tmp / "export" / name), device="cpu")
        with torch.no_grad():
            want_t = module.towers["text"](module.towers["text"].encoder.preprocess(texts))
            want_i = module.towers["image"](module.towers["image"].encoder.preprocess(images))
        torch.testing.assert_close(aligned.embed_text(texts, tower="text"), want_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(aligned.embed_image(images, tower="image"), want_i, atol=1e-6, rtol=0)
        final, kept = load_file(str(tmp / "export" / name / "model.safetensors")), load_file(str(tmp / "export_best" / name / "model.safetensors"))
        for k, key in enumerate(sweep._names):  # the stacked tensor of every exported one, member i's slice
            torch.testing.assert_close(kept[key[len("module."):]], best_state[f"sweep_param_{k}"][i])
        assert any(not torch.equal(final[key], kept[key]) for key in final), name  # step 6 is not the final step 8


def test_member_metrics_rename_the_member_keys_and_drop_the_rest():
    from mmalign.training.sweep import _member_metrics

    metrics = {"val/R@1": torch.tensor(0.5), "val/seed-1/R@1": torch.tensor(0.4), "val/seed-10/R@1": 0.7, "train/loss": 1.0}
    assert _member_metrics(metrics, "seed-1") == {"val/R@1": pytest.approx(0.4)}
    assert _member_metrics(None, "seed-1") is None


def test_weights_of_refuses_another_sweeps_checkpoint(lit_sweep):
    sweep = lit_sweep["sweep"].model
    state = {k: v for k, v in sweep.state_dict().items() if k.startswith("sweep_")}
    state["sweep_param_0"] = state["sweep_param_0"][:1]  # one member: not this sweep's
    with pytest.raises(ValueError, match="not a checkpoint of this sweep"):
        with sweep.weights_of(state, "other.ckpt"):
            pass


def test_fit_sweep_resumes_exactly(lit_sweep):
    """The sweep resumed from its step-6 checkpoint (mid-epoch 2 of 4 steps each, ``--ckpt_path``) ends where the
    uninterrupted sweep does: stacked parameters, AdamW moments, the scheduled rates and the sampler position are in
    the checkpoint (the epoch order is a function of (seed, epoch) and the global RNG is checkpointed too:
    mmalign.training.rng)."""
    from mmalign.recipe import MMAlignCLI

    tmp, done = lit_sweep["tmp"], lit_sweep["sweep"]
    assert done.trainer.global_step == 8 and done.trainer.num_training_batches == 4
    ckpt = next(p for p in (tmp / "sweep").rglob("*.ckpt") if "step=6" in p.name)
    resumed = MMAlignCLI(args=lit_sweep["common"] + [f"--trainer.default_root_dir={tmp / 'resume'}", *lit_sweep["sweep_args"],
                                                    f"--ckpt_path={ckpt}"])
    assert resumed.trainer.global_step == done.trainer.global_step
    for (name, a), (_, b) in zip(resumed.model.named_buffers(), done.model.named_buffers()):
        if name.startswith("sweep_"):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fit_sweep_of_the_pivot_recipe_with_batchnorm_and_dropout(synthetic_data, tmp_path):
    """The uCLIP pivot head (BatchNorm + dropout, tiny encoders) sweeps: each member keeps its own running
    statistics, exported with it."""
    import yaml

    from mmalign.cli import main
    from mmalign.export.model import AlignedModel
    from mmalign.recipe import MMAlignCLI, load_config

    config = load_config("uclip_pivot", variant="tiny")
    projector = config["model"]["init_args"]["towers"]["student"]["init_args"]["projector"]["init_args"]
    assert projector["norm"] == "batch" and projector["dropout"] > 0
    recipe = tmp_path / "pivot.yaml"
    recipe.write_text(yaml.safe_dump(config).replace("data/synthetic", str(synthetic_data)))
    main(["cache", "--config", str(recipe), "--output", str(tmp_path / "cache"), "--progress=false"])
    cli = MMAlignCLI(args=["fit", "--config", str(recipe), f"--data.init_args.cache_dir={tmp_path / 'cache'}",
                           "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'run'}", "--sweep_seeds=[0,1]"])
    sweep = cli.model.sweep
    means = {k: v for k, v in sweep.buffers.items() if k.endswith("running_mean")}
    # the input norm sees the same features in both members; the block norm after each member's own layer differs
    assert means and any(not torch.allclose(v[0], v[1]) for v in means.values())
    assert "val/R@1" in cli.trainer.callback_metrics and "val/seed-1/R@1" in cli.trainer.callback_metrics
    out = next((tmp_path / "run").rglob("ensemble.json")).parent
    for i, name in enumerate(cli.model.names):
        state = torch.load(out / name / "model.ckpt", weights_only=True)["state_dict"]
        for key, stacked in means.items():
            torch.testing.assert_close(state[key[len("module."):]], stacked[i], msg=f"{name} {key}")
        AlignedModel.from_pretrained(str(out / name))  # the safe export loader reads the member
