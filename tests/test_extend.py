"""mmalign extend: a new tower trained into an existing export; ONE export with the old towers unchanged + the new one."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmalign.export import AlignedModel, ExportError, export_module
from mmalign.export.tower import ExportTower, resolve_export_path


@pytest.fixture(scope="module")
def space() -> Path:
    return resolve_export_path("tiny:space")


@pytest.fixture(scope="module")
def extended(synthetic_data, space, tmp_path_factory) -> dict:
    """The tiny extend recipe run through ``mmalign extend`` (cached training, test, export)."""
    from mmalign.cli.main import main

    out = tmp_path_factory.mktemp("extend") / "run"
    main(["extend", "--recipe", "tiny/extend", "--base", str(space), "--output", str(out),
          *[f"--{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")],
          "--max_epochs", "1", "--progress", "false"])
    return {**json.loads((out / "results.json").read_text()), "out": out, "export": out / "export"}


def test_old_towers_are_bit_identical_and_the_new_one_is_added(extended, space):
    old, new = load_file(str(space / "model.safetensors")), load_file(str(extended["export"] / "model.safetensors"))
    for key, value in old.items():  # the same keys, dtypes and values (towers.* and objectives.* alike)
        assert key in new and new[key].dtype == value.dtype and torch.equal(new[key], value), key
    added = sorted(k for k in new if k not in old)
    assert added and all(k.startswith(("towers.text_new.projector.", "objectives.2.", "objectives.3.")) for k in added)
    old_cfg = json.loads((space / "config.json").read_text())
    cfg = json.loads((extended["export"] / "config.json").read_text())
    for name, entry in old_cfg["towers"].items():
        assert cfg["towers"][name] == entry  # verbatim: the teacher keeps its own field (text), not text_en
    assert list(cfg["towers"]) == [*old_cfg["towers"], "text_new"]
    assert [o["towers"] for o in cfg["objectives"]][:2] == [o["towers"] for o in old_cfg["objectives"]]
    assert extended["towers"] == {"kept": sorted(old_cfg["towers"]), "trained": ["text_new"]}


def test_provenance_holds_both_trainings(extended, space):
    old_cfg = json.loads((space / "config.json").read_text())
    prov = json.loads((extended["export"] / "config.json").read_text())["provenance"]
    assert prov["trained_towers"] == ["text_new"]
    assert prov["recipe"]["model"]["init_args"]["towers"]["text_new"]["init_args"]["field"] == "text"
    [source] = prov["extends"]
    assert source["weights_sha256"] == old_cfg["weights"]["sha256"]
    assert source["towers"] == {"text": "text", "image": "image", "speech": "speech"}
    assert source["provenance"] == old_cfg["provenance"]


def test_extended_export_reloads_and_embeds_with_both(extended, space, synthetic_data):
    from mmalign.data.manifest import read_manifest

    rows = read_manifest(synthetic_data / "test.jsonl")[:5]
    texts, images = [r["text"] for r in rows], [r["image"] for r in rows]
    model = AlignedModel.from_pretrained(extended["export"], device="cpu")
    base = AlignedModel.from_pretrained(space, device="cpu")
    assert torch.equal(model.embed_text(texts, tower="text"), base.embed_text(texts, tower="text"))
    assert torch.equal(model.embed_image(images), base.embed_image(images))
    new = model.embed_text(texts, tower="text_new")
    assert new.shape == (5, base.embed_dim) and torch.isfinite(new).all()
    assert model.similarity(new, model.embed_image(images)).shape == (5, 5)
    # the trained pair was tested, and the new tower's pairs with the frozen towers are reported as emergent
    assert extended["kinds"]["text_new|text"] == "trained" and extended["kinds"]["image|text_new"] == "emergent"


def test_export_tower_embeddings_are_cached_under_the_exports_key(extended, space, synthetic_data):
    from mmalign.cache.reader import load_manifest
    from mmalign.data.manifest import read_manifest

    manifest = load_manifest(extended["out"] / "cache" / "val")
    teacher = ExportTower(str(space), tower="text", field="text_en")
    name = f"text_en--{teacher.encoder.cache_key}"
    assert name in manifest["entries"]
    entry_dir = extended["out"] / "cache" / "val" / name
    cached = np.load(sorted(entry_dir.glob("*pooled*.npy"))[0])
    items = sorted({r["text_en"] for r in read_manifest(synthetic_data / "val.jsonl")})[:4]
    with torch.no_grad():
        direct = teacher(teacher.encoder.preprocess(items)).numpy()
    # every directly computed embedding is one of the cached rows (fp16 storage)
    dist = np.abs(cached[None, :, :].astype(np.float32) - direct[:, None, :]).max(-1).min(-1)
    assert (dist < 2e-3).all(), dist


def test_extend_refuses_a_recipe_without_export_towers(tmp_path):
    from mmalign.extend import extend

    with pytest.raises(ValueError, match="no mmalign.ExportTower"):
        extend("tiny/uclip_pivot", output=str(tmp_path / "run"))


def test_name_clash_and_duplicate_sources_are_refused(space, tmp_path):
    from encoders.hf_text import HFTextEncoder
    from mmalign import AlignmentModule, MSELoss, Objective, Tower
    from projectors import MLP

    def module(towers):
        return AlignmentModule(towers, [Objective(MSELoss(), [next(iter(towers)), "text"])])

    student = lambda: Tower(HFTextEncoder("tiny:xlmr-text"), "text", functools.partial(MLP, num_blocks=0))  # noqa: E731
    clash = module({"image": student(), "text": ExportTower(str(space), tower="text")})  # the source has an 'image'
    with pytest.raises(ExportError, match="'image' is used twice"):
        export_module(clash, tmp_path / "a")
    twice = module({"new": student(), "text": ExportTower(str(space), tower="text"),
                    "teacher2": ExportTower(str(space), tower="text", field="text_en")})
    with pytest.raises(ExportError, match="both load tower 'text'"):
        export_module(twice, tmp_path / "b")
