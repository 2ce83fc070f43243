"""Centred towers (``Tower(center=True)``, the modality gap): the running mean of the training outputs, centring
outside training only, the mean in checkpoints and exports (format_version 3), the loader's refusals, GradCache and
DDP tracking the same mean as one plain step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import encoders
import projectors
from encoders.base import EncoderOutput
from mmalign import AlignedModel, AlignmentModule, ClipLoss, Objective, Tower
from mmalign.export import CONFIG_NAME, WEIGHTS_NAME, ExportError, export_module
from tests.ddp_utils import finish_worker

D = 16
WORLD, B = 2, 6


def make_module(center=True, grad_cache_chunk=None, momentum=0.01) -> AlignmentModule:
    """Image <-> text and speech <-> text, tiny, the text tower a frozen anchor-like Linear; every tower centred."""
    torch.manual_seed(0)
    kw = dict(normalize=True, center=center, center_momentum=momentum)
    towers = {
        "image": Tower(encoders.TimmImageEncoder("tiny:timm-vit"), "image", projectors.Linear, **kw),
        "speech": Tower(encoders.WhisperSpeechEncoder("tiny:whisper", pad_to_30s=False), "audio", projectors.Linear, **kw),
        "text": Tower(encoders.HFTextEncoder("tiny:bert-text", pooling="mean"), "text", projectors.Linear, **kw),
    }
    objectives = [Objective(ClipLoss(), ["image", "text"]), Objective(ClipLoss(), ["speech", "text"])]
    return AlignmentModule(towers, objectives, embed_dim=D, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                           grad_cache_chunk=grad_cache_chunk)


def cached_batch(module: AlignmentModule, n: int, seed: int = 0, present: dict | None = None) -> dict:
    """A cached-features batch of ``n`` rows (features of the present rows only, as the cached collator makes)."""
    g = torch.Generator().manual_seed(seed)
    present = present or {}
    feats, pres = {}, {}
    for name, tower in module.towers.items():
        mask = present.get(name, torch.ones(n, dtype=torch.bool))
        pres[name] = mask
        feats[name] = EncoderOutput(pooled=torch.randn(n, tower.encoder.output_dim, generator=g)[mask] + 1.0)
    return {"meta": {"id": [f"r{i}" for i in range(n)], "concept": [f"c{i}" for i in range(n)]},
            "features": feats, "present": pres}


def plain_embeds(module: AlignmentModule, batch: dict, name: str) -> torch.Tensor:
    """Tower ``name``'s uncentred outputs of its present rows."""
    tower = module.towers[name]
    return F.normalize(tower.projector(batch["features"][name]), dim=-1).detach()


def test_center_momentum_is_checked():
    enc = encoders.HFTextEncoder("tiny:bert-text", pooling="mean")
    for bad in (0, -0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="center_momentum"):
            Tower(enc, "text", projectors.Linear, normalize=True, center=True, center_momentum=bad)


def test_running_mean_is_the_plain_average_then_an_ema():
    tower = Tower(encoders.HFTextEncoder("tiny:bert-text", pooling="mean"), "text", projectors.Linear,
                  normalize=True, center=True, center_momentum=0.25)
    tower.build(4)
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    tower.track_mean(a)
    torch.testing.assert_close(tower.embedding_mean, a.mean(0))
    tower.track_mean(b)  # 3 rows on 3 seen: weight 1/2 > 0.25, the plain average of the 6 rows
    torch.testing.assert_close(tower.embedding_mean, torch.cat([a, b]).mean(0))
    tower.track_mean(c)  # 3 on 6: 1/3 > 0.25, still the average
    torch.testing.assert_close(tower.embedding_mean, torch.cat([a, b, c]).mean(0))
    before = tower.embedding_mean.clone()
    d = torch.randn(3, 4)
    tower.track_mean(d)  # 3 on 9: 1/4 = momentum: the EMA from here on
    torch.testing.assert_close(tower.embedding_mean, before + 0.25 * (d.mean(0) - before))
    tower.track_mean(d.sum(0), rows=3)  # the summed (all-reduced) form
    assert int(tower.embedding_count) == 15
    tower.track_mean(torch.zeros(4), rows=0)  # a rank's batch without the field: nothing changes
    assert int(tower.embedding_count) == 15


def test_training_outputs_are_plain_and_eval_outputs_centred():
    module = make_module()
    batch = cached_batch(module, 8)
    module.train()
    out = module(batch)
    for name in module.towers:
        plain = plain_embeds(module, batch, name)
        torch.testing.assert_close(out[name].detach(), plain)  # objectives see the plain outputs
        torch.testing.assert_close(module.towers[name].embedding_mean, plain.mean(0))  # first batch: exact mean
    module.eval()
    out = module(batch)
    for name in module.towers:
        plain, mean = plain_embeds(module, batch, name), module.towers[name].embedding_mean
        torch.testing.assert_close(out[name], F.normalize(plain - mean, dim=-1))
        assert out[name].mean(0).norm() < plain.mean(0).norm()  # the cone's offset is gone
    assert int(module.towers["text"].embedding_count) == 8  # eval forwards track nothing


def test_partial_rows_track_only_the_rows_that_hold_the_field():
    module = make_module().train()
    audio = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    batch = cached_batch(module, 8, present={"speech": audio})
    module(batch)
    torch.testing.assert_close(module.towers["speech"].embedding_mean, plain_embeds(module, batch, "speech").mean(0))
    assert int(module.towers["speech"].embedding_count) == 3 and int(module.towers["text"].embedding_count) == 8


def test_grad_cache_tracks_each_row_once_like_the_plain_step():
    plain, cached = make_module(), make_module(grad_cache_chunk=3)
    cached.load_state_dict(plain.state_dict())
    audio = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    batch = cached_batch(plain, 8, present={"speech": audio})
    plain.train()(batch)
    cached.train().grad_cache_step(batch)
    for name in plain.towers:
        torch.testing.assert_close(cached.towers[name].embedding_mean, plain.towers[name].embedding_mean)
        assert int(cached.towers[name].embedding_count) == int(plain.towers[name].embedding_count)


def test_an_unnormalised_tower_centres_without_normalising():
    tower = Tower(encoders.HFTextEncoder("tiny:bert-text", pooling="mean"), "text", projectors.Linear, center=True)
    tower.build(4)
    feats = EncoderOutput(pooled=torch.randn(5, tower.encoder.output_dim))
    tower.track_mean(tower.projector(feats).detach())
    tower.eval()
    with torch.no_grad():
        got, raw = tower.project(feats), tower.projector(feats)
    torch.testing.assert_close(got, raw - raw.mean(0))  # cosine retrieval normalises later, as for the plain tower


def _trained(module: AlignmentModule, steps: int = 3) -> AlignmentModule:
    module.train()
    for s in range(steps):
        module(cached_batch(module, 8, seed=s))
    return module.eval()


def test_export_round_trip_keeps_the_mean_and_writes_format_version_3(tmp_path):
    module = _trained(make_module())
    out = export_module(module, tmp_path / "export")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["format_version"] == 3 and all(t["center"] is True for t in config["towers"].values())
    assert set(config["weights"]["tensors"]) >= {f"towers.{n}.embedding_mean" for n in module.towers}
    model = AlignedModel.from_pretrained(out, device="cpu")
    batch = cached_batch(module, 5, seed=9)
    for name in module.towers:
        assert model.towers[name].center
        torch.testing.assert_close(model.towers[name].embedding_mean, module.towers[name].embedding_mean)
        want = module.towers[name].project(batch["features"][name])
        torch.testing.assert_close(model.embed_features(batch["features"][name], name), want)
    again = model.save_pretrained(tmp_path / "again", model_card=False)  # save_pretrained keeps the mean
    model2 = AlignedModel.from_pretrained(again, device="cpu")
    torch.testing.assert_close(model2.towers["image"].embedding_mean, module.towers["image"].embedding_mean)
    # an uncentred module still writes version 2 with no center key
    plain = export_module(make_module(center=False).eval(), tmp_path / "plain")
    cfg = json.loads((plain / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 2 and not any("center" in t for t in cfg["towers"].values())


def test_checkpoint_state_dict_carries_the_mean():
    module = _trained(make_module())
    state = module.state_dict()
    assert "towers.text.embedding_mean" in state and int(state["towers.text.embedding_count"]) == 24
    fresh = make_module()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.towers["text"].embedding_mean, module.towers["text"].embedding_mean)


def test_export_from_a_checkpoint_keeps_the_mean(tmp_path):
    from mmalign.export.checkpoint import load_export_state

    module = _trained(make_module())
    fresh = make_module().eval()  # what `mmalign export --ckpt` rebuilds from the recipe
    load_export_state(fresh, module.state_dict(), "a checkpoint")
    for name in module.towers:
        torch.testing.assert_close(fresh.towers[name].embedding_mean, module.towers[name].embedding_mean)
    assert int(fresh.towers["text"].embedding_count) == 24
    model = AlignedModel.from_pretrained(export_module(fresh, tmp_path / "export"), device="cpu")
    feats = cached_batch(module, 3, seed=4)["features"]["image"]
    torch.testing.assert_close(model.embed_features(feats, "image"), module.towers["image"].project(feats))
    state = {k: v for k, v in module.state_dict().items() if k != "towers.speech.embedding_mean"}
    with pytest.raises(ExportError, match="missing tensors.*towers.speech.embedding_mean"):
        load_export_state(make_module(), state, "an uncentred run's checkpoint")


def test_onnx_graph_centres_like_the_tower(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module = _trained(make_module())
    out = export_module(module, tmp_path / "export", onnx=True)
    info = json.loads((out / CONFIG_NAME).read_text())["onnx"]
    batch = cached_batch(module, 4, seed=5)
    pooled = batch["features"]["text"].pooled
    (got,) = ort.InferenceSession(str(out / info["text"]["file"])).run(None, {"pooled": pooled.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), module.towers["text"].project(batch["features"]["text"]),
                               atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def centred_export(tmp_path_factory) -> Path:
    return export_module(_trained(make_module()), tmp_path_factory.mktemp("centred") / "export")


def _edited(export: Path, tmp_path: Path, tensors=None, config=None) -> Path:
    """A copy of ``export`` with its tensors and/or config.json edited (the checksum re-recorded, as an attacker
    would, so only the structural checks can refuse it)."""
    from safetensors.torch import load_file, save_file

    from mmalign.export.format import sha256_file

    target = tmp_path / "edited"
    shutil.copytree(export, target)
    weights = load_file(str(target / WEIGHTS_NAME))
    if tensors:
        tensors(weights)
        save_file(weights, str(target / WEIGHTS_NAME))
    cfg = json.loads((target / CONFIG_NAME).read_text())
    cfg["weights"]["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                                 for k, v in weights.items()}
    if config:
        config(cfg)
    cfg["weights"]["sha256"] = sha256_file(target / WEIGHTS_NAME)
    cfg["weights"]["num_bytes"] = (target / WEIGHTS_NAME).stat().st_size
    (target / CONFIG_NAME).write_text(json.dumps(cfg))
    return target


def _drop_center(cfg):
    del cfg["towers"]["text"]["center"]


@pytest.mark.parametrize("case, match", [
    ("missing mean", "missing tensor towers.text.embedding_mean"),
    ("oversized mean", "embedding_mean has shape"),
    ("integer mean", "floating point"),
    ("mean without center", "does not centre"),
    ("center not a bool", "must be true or false"),
    ("version 2 with center", "needs format_version 3"),
    ("stray tower tensor", "unexpected tensor towers.text.extra"),
    ("NaN mean", "NaN|non-finite|Inf"),
])
def test_loader_refuses_a_malformed_mean(centred_export, tmp_path, case, match):
    key = "towers.text.embedding_mean"
    edits = {
        "missing mean": dict(tensors=lambda t: t.pop(key)),
        "oversized mean": dict(tensors=lambda t: t.__setitem__(key, torch.zeros(10_000))),
        "integer mean": dict(tensors=lambda t: t.__setitem__(key, torch.zeros(D, dtype=torch.int32))),
        "mean without center": dict(config=_drop_center),
        "center not a bool": dict(config=lambda c: c["towers"]["text"].__setitem__("center", "yes")),
        "version 2 with center": dict(config=lambda c: c.__setitem__("format_version", 2)),
        "stray tower tensor": dict(tensors=lambda t: t.__setitem__("towers.text.extra", torch.zeros(3))),
        "NaN mean": dict(tensors=lambda t: t.__setitem__(key, torch.full((D,), float("nan")))),
    }
    with pytest.raises(ExportError, match=match):
        AlignedModel.from_pretrained(_edited(centred_export, tmp_path, **edits[case]), device="cpu")


def test_an_export_tower_of_a_centred_space_embeds_centred_and_extends_with_its_mean(centred_export, tmp_path):
    from mmalign.export.tower import ExportTower

    model = AlignedModel.from_pretrained(centred_export, device="cpu")
    teacher = ExportTower(str(centred_export), tower="text")
    feats = EncoderOutput(pooled=torch.randn(4, model.towers["text"].encoder.output_dim))
    torch.testing.assert_close(teacher.source.tower.project(feats), model.embed_features(feats, "text"))
    assert teacher.source.spec()["center"] is True
    student = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), "text", projectors.Linear,
                    normalize=True, center=True)
    module = AlignmentModule({"anchor": teacher, "student": student}, [Objective(ClipLoss(), ["student", "anchor"])])
    out = export_module(module.eval(), tmp_path / "grown")
    grown = AlignedModel.from_pretrained(out, device="cpu")
    assert json.loads((out / CONFIG_NAME).read_text())["format_version"] == 3
    torch.testing.assert_close(grown.towers["anchor"].embedding_mean, model.towers["text"].embedding_mean)
    assert grown.towers["student"].center and grown.towers["image"].center


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        module = make_module().train()
        full = cached_batch(module, WORLD * B, present={"speech": _AUDIO})
        rows = slice(rank * B, (rank + 1) * B)
        mine = cached_batch(module, B, present={"speech": _AUDIO[rows]})
        for name in module.towers:  # this rank's rows of the global batch
            lo, hi = int(_AUDIO[:rank * B].sum()), int(_AUDIO[:(rank + 1) * B].sum())
            f = full["features"][name].pooled
            mine["features"][name] = EncoderOutput(pooled=f[lo:hi] if name == "speech" else f[rows])
        module(mine)
        torch.save({n: t.embedding_mean.clone() for n, t in module.towers.items()}, Path(out_dir) / f"rank{rank}.pt")
        finish_worker()
    finally:
        dist.destroy_process_group()


_AUDIO = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)  # 4 rows on rank 0, 1 on rank 1


def test_ddp_ranks_share_the_mean_of_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    module = make_module().train()
    full = cached_batch(module, WORLD * B, present={"speech": _AUDIO})
    module(full)  # one process, the whole batch
    for name in module.towers:
        for r in ranks:
            torch.testing.assert_close(r[name], module.towers[name].embedding_mean, atol=1e-6, rtol=1e-5)


def test_a_sweep_of_a_centred_recipe_keeps_a_mean_per_member(synthetic_data, tmp_path):
    """``--sweep_seeds`` stacks every buffer: each member tracks its own running mean (its own outputs) under vmap."""
    import yaml

    from mmalign.cli import main
    from mmalign.recipe import MMAlignCLI, load_config

    config = load_config("uclip_pivot", variant="tiny")
    for tower in config["model"]["init_args"]["towers"].values():
        tower["init_args"]["center"] = True
    recipe = tmp_path / "pivot.yaml"
    recipe.write_text(yaml.safe_dump(config).replace("data/synthetic", str(synthetic_data)))
    main(["cache", "--config", str(recipe), "--output", str(tmp_path / "cache"), "--progress=false"])
    cli = MMAlignCLI(args=["fit", "--config", str(recipe), f"--data.init_args.cache_dir={tmp_path / 'cache'}",
                           "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'run'}", "--sweep_seeds=[0,1]"])
    buffers = cli.model.sweep.buffers
    student = buffers["module.towers.student.embedding_mean"]  # [members, D]
    assert student.shape[0] == 2 and not torch.allclose(student[0], student[1]) and bool(student.abs().sum() > 0)
    out = next((tmp_path / "run").rglob("ensemble.json")).parent
    for i, name in enumerate(cli.model.names):
        model = AlignedModel.from_pretrained(str(out / name))
        torch.testing.assert_close(model.towers["student"].embedding_mean, student[i])
