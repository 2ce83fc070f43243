"""Exported projector checkpoints: export -> load round trip, refusal of tampered/mismatched exports, CLI."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmalign.export import CONFIG_NAME, WEIGHTS_NAME, ExportError, export_module
from mmalign.export import AlignedModel

ROOT = Path(__file__).resolve().parents[1]


def _rows(data: Path, split: str = "val") -> list[dict]:
    from mmalign.data.manifest import read_manifest

    return read_manifest(data / f"{split}.jsonl")


@pytest.fixture(scope="module")
def lit_module():
    """A tiny LiT-style module (image MLP, text Linear) with non-default weights and temperature."""
    from encoders import TimmImageEncoder
    from encoders.hf_text import HFTextEncoder
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from projectors import MLP, Linear

    torch.manual_seed(1)
    towers = {
        "image": Tower(TimmImageEncoder("tiny:timm-vit"), "image", functools.partial(MLP, num_blocks=1, dropout=0.1)),
        "text": Tower(HFTextEncoder("tiny:bert-text", pooling="mean"), "text", Linear, normalize=True),
    }
    module = AlignmentModule(towers, [Objective(ClipLoss(logit_scale=20.0), ["image", "text"])], embed_dim=16)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def exported(lit_module, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "lit"
    return export_module(lit_module, out, languages=["en", "de", "es"], recipe={"model": {"note": "unit test"}},
                         metrics={"val/R@1": 0.5}, epoch=3, global_step=12)


@pytest.fixture(scope="module")
def aligned(exported) -> AlignedModel:
    return AlignedModel.from_pretrained(exported, device="cpu")


def _tampered_copy(exported: Path, tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    target = tmp_path / "tampered"
    shutil.copytree(exported, target)
    tensors = load_file(str(target / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(target / WEIGHTS_NAME))
    return target


def test_roundtrip_gives_identical_embeddings(lit_module, aligned, synthetic_data):
    rows = _rows(synthetic_data)[:12]
    texts, images = [r["text"] for r in rows], [r["image"] for r in rows]
    with torch.no_grad():
        want_t = lit_module.towers["text"](lit_module.towers["text"].encoder.preprocess(texts))
        want_i = lit_module.towers["image"](lit_module.towers["image"].encoder.preprocess(images))
    got_t = aligned.embed_text(texts, lang=[r["lang"] for r in rows], batch_size=5)  # several batches
    got_i = aligned.embed_image(images, batch_size=4)
    assert got_t.shape == (12, 16) and got_i.shape == (12, 16)
    torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_i, want_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_t.norm(dim=-1), torch.ones(12))  # the text tower normalises
    sim = aligned.similarity(got_t, got_i)
    assert sim.shape == (12, 12)
    torch.testing.assert_close(sim[3, 5], torch.nn.functional.cosine_similarity(got_t[3], got_i[5], dim=0))
    assert aligned.logit_scale == pytest.approx(lit_module.objectives[0].loss.logit_scale().item(), rel=1e-6)


def test_export_holds_only_projector_weights(lit_module, exported):
    from safetensors import safe_open

    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(str(exported / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    assert all(k.startswith(("towers.image.projector.", "towers.text.projector.", "objectives.0.")) for k in keys)
    trainable = sum(p.numel() for p in lit_module.trainable_parameters())
    frozen = sum(p.numel() for t in lit_module.towers.values() for p in t.encoder.parameters())
    assert stored == trainable  # projectors + temperature, no encoder weight
    assert frozen > 0 and not any("encoder" in k for k in keys)
    assert (exported / WEIGHTS_NAME).stat().st_size < 4 * trainable + 16_384  # fp32 tensors + a small header


def test_config_json_is_plain_and_complete(lit_module, exported):
    raw = (exported / CONFIG_NAME).read_text()
    config = json.loads(raw)

    def walk(x, where="config"):  # only JSON types all the way down: nothing to unpickle
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, str)
                walk(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        else:
            assert x is None or isinstance(x, (str, int, float, bool)), where

    walk(config)
    assert (exported / WEIGHTS_NAME).read_bytes()[:1] != b"\x80"  # not a pickle stream
    text = config["towers"]["text"]
    assert text["encoder"]["class_path"] == "encoders.hf_text.HFTextEncoder"
    assert text["encoder"]["cache_key"] == lit_module.towers["text"].encoder.cache_key
    assert text["encoder"]["init_args"]["pooling"] == "mean"
    assert text["projector"] == {"class_path": "projectors.linear.Linear", "init_args": {"in_dim": 32, "out_dim": 16, "bias": True},
                                 "num_parameters": 32 * 16 + 16}
    assert (text["field"], text["modality"], text["normalize"]) == ("text", "text", True)
    assert config["towers"]["image"]["projector"]["init_args"]["dropout"] == 0.1
    assert config["embed_dim"] == 16 and config["languages"] == ["de", "en", "es"]
    scale = config["objectives"][0]["loss"]["logit_scale"]
    assert scale == pytest.approx(lit_module.objectives[0].loss.logit_scale().item()) and scale != pytest.approx(1 / 0.07)
    prov = config["provenance"]
    assert prov["torch_version"] == torch.__version__ and prov["metrics"] == {"val/R@1": 0.5}
    assert (prov["epoch"], prov["global_step"], prov["recipe"]) == (3, 12, {"model": {"note": "unit test"}})


def test_changed_shape_refused(exported, tmp_path):
    def edit(t):
        t["towers.text.projector.proj.weight"] = t["towers.text.projector.proj.weight"][:8].contiguous()

    with pytest.raises(ExportError, match=r"tower 'text': tensor towers.text.projector.proj.weight has shape \(8, 32\)"):
        AlignedModel.from_pretrained(_tampered_copy(exported, tmp_path, edit), device="cpu")


def test_missing_key_refused(exported, tmp_path):
    with pytest.raises(ExportError, match=r"tower 'image': missing tensor towers.image.projector.fc_out.bias"):
        AlignedModel.from_pretrained(_tampered_copy(exported, tmp_path, lambda t: t.pop("towers.image.projector.fc_out.bias")))


def test_modified_values_refused_by_checksum(exported, tmp_path):
    def edit(t):
        t["towers.text.projector.proj.bias"] = t["towers.text.projector.proj.bias"] + 1.0

    with pytest.raises(ExportError, match="sha256 differs"):
        AlignedModel.from_pretrained(_tampered_copy(exported, tmp_path, edit), device="cpu")


def test_mismatched_encoder_refused(exported, tmp_path):
    target = tmp_path / "mismatch"
    shutil.copytree(exported, target)
    config = json.loads((target / CONFIG_NAME).read_text())
    config["towers"]["text"]["encoder"]["init_args"]["pooling"] = "cls"  # a different encoder than trained
    (target / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ExportError) as err:
        AlignedModel.from_pretrained(target, device="cpu")
    msg = str(err.value)
    assert "tower 'text'" in msg and "cache_key" in msg and "pooling: recorded 'mean', rebuilt 'cls'" in msg


def test_encoder_override_needs_strict_false(exported):
    with pytest.raises(ExportError, match="max_length: recorded 256, rebuilt 64"):
        AlignedModel.from_pretrained(exported, device="cpu", towers=["text"], encoder_overrides={"text": {"max_length": 64}})
    with pytest.warns(UserWarning, match="tower 'text'"):
        model = AlignedModel.from_pretrained(exported, device="cpu", towers=["text"],
                                             encoder_overrides={"text": {"max_length": 64}}, strict=False)
    assert list(model.towers) == ["text"] and model.embed_text(["ein Hund"]).shape == (1, 16)


def test_dtype_and_tower_subset(aligned, exported):
    texts = ["ein Hund", "un perro", "a dog"]
    half = AlignedModel.from_pretrained(exported, device="cpu", dtype="bfloat16", towers=["text"])
    assert list(half.towers) == ["text"] and next(half.towers["text"].projector.parameters()).dtype == torch.bfloat16
    got, want = half.embed_text(texts), aligned.embed_text(texts)
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=0)


def test_tower_choice_and_bad_input_errors(aligned, synthetic_data):
    with pytest.raises(ValueError, match="no tower for speech"):
        aligned.embed_speech([np.zeros(1600, np.float32)], sampling_rate=16000)
    with pytest.raises(ValueError, match="several towers match"):
        aligned.embed(["a"])
    with pytest.raises(ValueError, match="tower 'image' embeds image, not text"):
        aligned.embed_text(["a"], tower="image")
    with pytest.raises(TypeError, match="wrap it in a list"):
        aligned.embed_text("a dog")
    with pytest.raises(ValueError, match=r"item 3 \(''\) could not be preprocessed"):
        aligned.embed_text(["a", "b", "c", "", "e"], batch_size=2)
    with pytest.warns(UserWarning, match=r"\['fr'\] were not seen in training"):
        aligned.embed_text(["un chien"], lang="fr")


def test_language_problem_names_what_the_encoder_does_not_cover(aligned, monkeypatch):
    name = aligned.select_tower(modality="text", tower="text")
    assert aligned.language_problem("en", tower=name) is None
    assert "did you mean" in aligned.language_problem("english", tower=name)

    def only_en(langs, n):
        if any(c not in ("en", None) for c in langs):
            raise ValueError("covers only ['en']")

    monkeypatch.setattr(aligned.towers[name].encoder, "check_languages", only_en, raising=False)
    assert aligned.language_problem("en", tower=name) is None
    assert aligned.language_problem("de", tower=name) == f"tower {name!r}: covers only ['en']"


def test_not_an_export_refused(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        AlignedModel.from_pretrained(tmp_path)
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not an mmalign export"):
        export_module(torch.nn.Module(), tmp_path)


def test_onnx_projectors_match(lit_module, tmp_path, synthetic_data):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from projectors import AttentionPool

    # Token-pooling text projector (token axis must stay dynamic) next to the pooled MLP image tower.
    text = Tower(lit_module.towers["text"].encoder, "text", functools.partial(AttentionPool, num_heads=2), normalize=True)
    image = Tower(lit_module.towers["image"].encoder, "image", lambda i, o: lit_module.towers["image"].projector)
    module = AlignmentModule({"image": image, "text": text}, [Objective(ClipLoss(), ["image", "text"])], embed_dim=16).eval()
    out = export_module(module, tmp_path / "export", onnx=True)
    info = json.loads((out / CONFIG_NAME).read_text())["onnx"]
    assert info["image"]["inputs"] == ["pooled"] and set(info["text"]["inputs"]) >= {"tokens", "mask"}
    model = AlignedModel.from_pretrained(out, device="cpu")
    rows = _rows(synthetic_data)[:5]
    for name, items in (("image", [r["image"] for r in rows]), ("text", ["a much longer caption than the others"] + [r["text"] for r in rows])):
        feats = model.towers[name].encoder(model.towers[name].encoder.preprocess(items))
        feed = {"pooled": feats.pooled.numpy(), "tokens": feats.tokens.numpy(), "mask": feats.mask.numpy()}
        session = ort.InferenceSession(str(out / info[name]["file"]))
        (got,) = session.run(None, {k: feed[k] for k in info[name]["inputs"]})
        np.testing.assert_allclose(got, model.embed(items, name).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def cli_run(synthetic_data, tmp_path_factory) -> Path:
    """``mmalign fit`` of the tiny LiT recipe with ExportOnFitEnd + last.ckpt, in a temporary run dir."""
    from mmalign.cli import main

    run = tmp_path_factory.mktemp("run")
    from mmalign.recipe import load_config

    recipe = load_config("lit_contrastive", variant="tiny")  # recipe + tiny overlay, composed
    recipe["data"]["init_args"].update(train=str(synthetic_data / "train.jsonl"), val=str(synthetic_data / "val.jsonl"))
    recipe["trainer"].update(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=True,
        logger=False, default_root_dir=str(run),
        callbacks=[
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
            {"class_path": "mmalign.training.callbacks.ExportOnFitEnd", "init_args": {"output": str(run / "fit_export")}},
        ],
    )
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main(["fit", "--config", str(run / "recipe.yaml")])
    return run


def test_export_on_fit_end_and_export_cli_agree(cli_run, synthetic_data, capsys):
    from safetensors.torch import load_file

    from mmalign.cli import main

    ckpt = cli_run / "checkpoints" / "last.ckpt"
    assert (cli_run / "config.yaml").is_file() and ckpt.is_file()
    main(["export", "--ckpt", str(ckpt), "--output", str(cli_run / "cli_export")])  # finds config.yaml itself
    assert "exported 2 towers" in capsys.readouterr().out
    a, b = load_file(str(cli_run / "fit_export" / WEIGHTS_NAME)), load_file(str(cli_run / "cli_export" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fit_cfg = json.loads((cli_run / "fit_export" / CONFIG_NAME).read_text())
    cli_cfg = json.loads((cli_run / "cli_export" / CONFIG_NAME).read_text())
    assert fit_cfg["languages"] == cli_cfg["languages"] == ["de", "en", "es"]
    assert fit_cfg["provenance"]["recipe"]["model"] == cli_cfg["provenance"]["recipe"]["model"]
    assert "val/loss" in fit_cfg["provenance"]["metrics"] and cli_cfg["provenance"]["checkpoint"] == str(ckpt.resolve())
    assert fit_cfg["towers"] == cli_cfg["towers"]


def test_embed_cli(cli_run, synthetic_data, tmp_path, capsys):
    from mmalign.cli import main

    model = AlignedModel.from_pretrained(cli_run / "fit_export", device="cpu")
    rows = _rows(synthetic_data)[:6]
    (tmp_path / "texts.txt").write_text("".join(r["text"] + "\n" for r in rows))
    main(["embed", "--model", str(cli_run / "fit_export"), "--input", str(tmp_path / "texts.txt"), "--output",
          str(tmp_path / "t.npy"), "--progress", "false"])
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), model.embed_text([r["text"] for r in rows]).numpy(), atol=1e-6)
    main(["embed", "--model", str(cli_run / "fit_export"), "--input", str(synthetic_data / "val.jsonl"), "--field", "image",
          "--output", str(tmp_path / "i.npy"), "--progress", "false"])
    images = np.load(tmp_path / "i.npy")
    assert images.shape == (len(_rows(synthetic_data)), 32) and images.dtype == np.float32
    np.testing.assert_allclose(images[:6], model.embed_image([r["image"] for r in rows]).numpy(), atol=1e-6)
    assert "tower 'image'" in capsys.readouterr().out
    from mmalign.export import AlignedEnsemble

    paths = [str(cli_run / "fit_export")] * 2  # the ensemble arithmetic is tested above; here the CLI path
    main(["embed", "--model", f"[{paths[0]}, {paths[1]}]", "--input", str(tmp_path / "texts.txt"), "--output",
          str(tmp_path / "e.npy"), "--progress", "false"])
    want = AlignedEnsemble.from_pretrained(paths, device="cpu").embed_text([r["text"] for r in rows])
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want.numpy(), atol=1e-6)
    single = torch.nn.functional.normalize(model.embed_text([r["text"] for r in rows]), dim=-1)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), single.numpy(), atol=1e-5)
    assert "ensemble of 2" in capsys.readouterr().out


def test_student_on_the_generic_text_field_is_the_default_text_tower(tmp_path):
    """uCLIP/M-CLIP exports have a multilingual student (field ``text``) and an English anchor (``text_en``)."""
    from encoders import HFTextEncoder, OpenClipTextEncoder
    from mmalign import AlignmentModule, MSELoss, Objective, Tower
    from projectors import Linear

    module = AlignmentModule(
        {"student": Tower(HFTextEncoder("tiny:xlmr-text"), field="text", projector=Linear),
         "teacher": Tower(OpenClipTextEncoder("tiny:open-clip"), field="text_en")},
        [Objective(MSELoss(), ["student", "teacher"])],
    )
    model = AlignedModel.from_pretrained(export_module(module, tmp_path / "pivot"), device="cpu")
    assert model.select_tower(modality="text") == "student"
    assert model.select_tower(modality="text", field="text_en") == "teacher"
    anchor = model.embed_text(["a red apple"], tower="teacher")
    student = model.embed_text(["ein roter Apfel", "un coche"], lang="de")
    assert model.similarity(anchor, student).shape == (1, 2)


def _second_seed(lit_module, tmp_path: Path, seed: int) -> Path:
    import copy

    other = copy.deepcopy(lit_module)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return export_module(other, tmp_path / f"seed{seed}", languages=["en", "de", "es"])


def test_ensemble_averages_normalised_member_embeddings(lit_module, exported, aligned, synthetic_data, tmp_path):
    from mmalign.export import AlignedEnsemble, ensemble_embeddings

    paths = [exported, _second_seed(lit_module, tmp_path, 7), _second_seed(lit_module, tmp_path, 8)]
    ens = AlignedEnsemble.from_pretrained(paths, device="cpu")
    assert len(ens) == 3
    assert all(m.towers["image"].encoder is ens.members[0].towers["image"].encoder for m in ens.members)  # loaded once
    rows = _rows(synthetic_data)[:5]
    members = [AlignedModel.from_pretrained(p, device="cpu") for p in paths]
    for embed, items in (("embed_image", [r["image"] for r in rows]), ("embed_text", [r["text"] for r in rows])):
        got = getattr(ens, embed)(items)
        parts = [getattr(m, embed)(items) for m in members]
        want = torch.nn.functional.normalize(sum(torch.nn.functional.normalize(p, dim=-1) for p in parts), dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(parts[0], parts[1])  # the members really differ
    one = AlignedEnsemble([AlignedModel.from_pretrained(exported, device="cpu")])
    texts = [r["text"] for r in rows]
    torch.testing.assert_close(one.embed_text(texts), torch.nn.functional.normalize(aligned.embed_text(texts), dim=-1))
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_embeddings([torch.zeros(2, 4), torch.zeros(3, 4)])


def test_ensemble_refuses_members_with_other_encoders(exported, tmp_path):
    from mmalign.export import AlignedEnsemble

    cfg = json.loads((exported / CONFIG_NAME).read_text())
    target = tmp_path / "other"
    shutil.copytree(exported, target)
    cfg["towers"]["text"]["encoder"]["init_args"]["max_length"] = 17
    cfg["towers"]["text"]["encoder"]["cache_key"] = None
    (target / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="max_length"):
        other = AlignedModel.from_pretrained(target, device="cpu", strict=False)
    with pytest.raises(ExportError, match="tower 'text'.*members must share encoders"):
        AlignedEnsemble([AlignedModel.from_pretrained(exported, device="cpu"), other])
