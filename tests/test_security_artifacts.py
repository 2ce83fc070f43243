"""Untrusted artifacts (issue 14): malicious exports and checkpoints are refused with an exact message, and
loading them never runs what they name (no marker file is left). Every case is a row of docs/security.md."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

import mmalign
from mmalign.export import CONFIG_NAME, WEIGHTS_NAME, AlignedModel, ExportError, export_module, sha256_file
from projectors import Linear

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query_key_value"]}
#: The embedding recipe of the tests: written as a LightningCLI config.yaml beside checkpoints, built with it.
RECIPE = {"model": {"class_path": "mmalign.AlignmentModule", "init_args": {
    "embed_dim": 16,
    "towers": {
        "image": {"class_path": "mmalign.Tower", "init_args": {
            "field": "image", "encoder": {"class_path": "encoders.TimmImageEncoder", "init_args": {"model_name": "tiny:timm-vit"}},
            "projector": {"class_path": "projectors.MLP", "init_args": {"num_blocks": 1, "dropout": 0.0}}}},
        "text": {"class_path": "mmalign.Tower", "init_args": {
            "field": "text", "normalize": True,
            "encoder": {"class_path": "encoders.HFTextEncoder", "init_args": {"model_name_or_path": "tiny:bert-text"}},
            "projector": {"class_path": "projectors.Linear"}}},
    },
    "objectives": [{"class_path": "mmalign.Objective", "init_args": {"towers": ["image", "text"],
                                                                      "loss": {"class_path": "mmalign.ClipLoss"}}}],
    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
}}}


class OutsideLinear(Linear):
    """A projector from outside mmalign's packages: loadable only when the user trusts it."""


def evil(marker: Path) -> dict:
    """A class_path that runs a shell command when called (what a malicious config.json would hold)."""
    return {"class_path": "subprocess.getoutput", "init_args": {"cmd": f"touch {marker}"}}


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a malicious artifact ran code"


@pytest.fixture(scope="module")
def module():
    from mmalign.export import module_from_recipe

    torch.manual_seed(0)
    m = module_from_recipe(RECIPE)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def export(module, tmp_path_factory) -> Path:
    return export_module(module, tmp_path_factory.mktemp("good") / "export", languages=["en"])


@pytest.fixture(scope="module")
def captioner_export(tmp_path_factory) -> Path:
    from encoders import TimmImageEncoder
    from mmalign.captioning import FrozenLM, PrefixCaptioningModule
    from projectors import Resampler

    torch.manual_seed(0)
    projector = functools.partial(Resampler, num_queries=2, depth=1, hidden_dim=32, num_heads=2)
    m = PrefixCaptioningModule(TimmImageEncoder("tiny:timm-vit"), FrozenLM("tiny:tiny-causal-lm", lora=LORA), projector)
    return m.save_pretrained(tmp_path_factory.mktemp("good") / "captioner")


def copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(src, target)
    return target


def edit_config(root: Path, edit: Callable[[dict], None]) -> Path:
    cfg = json.loads((root / CONFIG_NAME).read_text())
    edit(cfg)
    (root / CONFIG_NAME).write_text(json.dumps(cfg))
    return root


def edit_weights(root: Path, edit: Callable[[dict], None], rehash: bool = True) -> Path:
    """Rewrite the weights; with ``rehash`` also their record in config.json, so that only the check under test fails."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(root / WEIGHTS_NAME), metadata={"format": "pt"})
    if rehash:
        def record(cfg: dict) -> None:
            cfg["weights"].update(sha256=sha256_file(root / WEIGHTS_NAME), num_bytes=(root / WEIGHTS_NAME).stat().st_size)

        edit_config(root, record)
    return root


def first_key(root: Path, prefix: str) -> str:
    return next(k for k in json.loads((root / CONFIG_NAME).read_text())["weights"]["tensors"] if k.startswith(prefix))


# -- embedding exports: code execution --------------------------------------------------------------
LOADERS = {"AlignedModel": lambda p, **kw: AlignedModel.from_pretrained(p, device="cpu", **kw), "mmalign.load": mmalign.load}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("slot", ["encoder", "projector"])
def test_code_exec_class_path_refused(export, tmp_path, marker, slot, loader):
    target = edit_config(copy(export, tmp_path), lambda c: c["towers"]["text"].update({slot: {**c["towers"]["text"][slot], **evil(marker)}}))
    with pytest.raises(ExportError, match=rf"tower 'text' {slot}: refusing to import 'subprocess.getoutput'"):
        LOADERS[loader](target)


PROJECT_NAME_CASES = {  # class_path inside the project's packages -> message
    "cli-entry-point": ("mmalign.cli.main.main", r"tower 'text' encoder: 'mmalign.cli.main.main' is not a subclass of encoders.base.Encoder"),
    "main-module": ("mmalign.cli.__main__.main", r"tower 'text' encoder: class_path 'mmalign.cli.__main__.main' is not a full dotted name"),
    "wrong-base": ("projectors.linear.Linear", r"tower 'text' encoder: 'projectors.linear.Linear' is not a subclass of encoders.base.Encoder"),
    "package-only": ("encoders", r"tower 'text' encoder: class_path 'encoders' is not a full dotted name"),
    "missing-module": ("mmalign.no_such_module.Encoder", r"tower 'text' encoder: cannot import 'mmalign.no_such_module.Encoder'"),
}


@pytest.mark.parametrize("case", list(PROJECT_NAME_CASES))
def test_project_names_that_are_not_encoders_refused(export, tmp_path, marker, case):
    """Inside the project's packages a name must still be an Encoder subclass (a CLI entry point is not),
    and ``__main__`` modules, which run a program when imported, are refused before any import."""
    path, message = PROJECT_NAME_CASES[case]
    target = edit_config(copy(export, tmp_path), lambda c: c["towers"]["text"]["encoder"].update(
        class_path=path, init_args={"argv": ["data", "--help"]}))
    with pytest.raises(ExportError, match=message):
        AlignedModel.from_pretrained(target, device="cpu")


def test_non_string_class_path_refused(export, tmp_path):
    target = edit_config(copy(export, tmp_path), lambda c: c["towers"]["text"]["projector"].update(class_path=42))
    with pytest.raises(ExportError, match=r"towers.text.projector.class_path must be str, not int"):
        AlignedModel.from_pretrained(target, device="cpu")


def test_trusted_classes_are_opt_in_per_class_and_keep_the_base_check(export, tmp_path, marker):
    outside = f"{OutsideLinear.__module__}.OutsideLinear"
    target = edit_config(copy(export, tmp_path), lambda c: c["towers"]["text"]["projector"].update(class_path=outside))
    with pytest.raises(ExportError, match=rf"tower 'text' projector: refusing to import '{outside}'.*trusted_classes"):
        AlignedModel.from_pretrained(target, device="cpu")
    model = AlignedModel.from_pretrained(target, device="cpu", trusted_classes=[OutsideLinear])
    assert type(model.towers["text"].projector) is OutsideLinear
    torch.testing.assert_close(model.embed_text(["a dog"]), AlignedModel.from_pretrained(export, device="cpu").embed_text(["a dog"]))
    evil_target = edit_config(copy(export, tmp_path, "evil"), lambda c: c["towers"]["text"].update(projector=evil(marker)))
    with pytest.raises(ExportError, match=r"'subprocess.getoutput' is not a subclass of projectors.base.Projector; refusing to call it"):
        AlignedModel.from_pretrained(evil_target, device="cpu", trusted_classes=["subprocess.getoutput"])


# -- embedding exports: sizes, paths, weights, JSON -------------------------------------------------
def _huge(c: dict) -> None:
    c["towers"]["image"]["projector"]["init_args"].update(hidden_dim=131072, num_blocks=64)  # 4.4e12 parameters


def _huge_hidden(c: dict) -> None:
    c["towers"]["image"]["projector"]["init_args"].update(hidden_dim=131072)  # one block: 6.9e10 parameters, 275 GB


def _many_blocks(c: dict) -> None:
    c["towers"]["image"]["projector"]["init_args"].update(hidden_dim=4, num_blocks=10**7)  # hours of Python loop


CONFIG_CASES = {
    "huge-projector": (_huge, r"tower 'image' projector projectors.mlp.MLP: the recorded arguments build more than 160 "
                              r"submodules, far more than the weights file holds tensors for"),
    "huge-hidden-dim": (_huge_hidden, r"tower 'image': tensor towers.image.projector.fc_in.weight has shape \(64, 64\), "
                                      r"the rebuilt module needs \(131072, 64\)"),
    "million-blocks": (_many_blocks, r"tower 'image' projector projectors.mlp.MLP: the recorded arguments build more than \d+ submodules"),
    "bad-init-args": (lambda c: c["towers"]["text"]["projector"]["init_args"].update(evil=1),
                      r"tower 'text' projector projectors.linear.Linear: Linear\(\*\*init_args\) failed: TypeError"),
    "weights-absolute": (lambda c: c["weights"].update(file="/etc/hostname"), r"weights.file '/etc/hostname' points outside the export folder"),
    "weights-dotdot": (lambda c: c["weights"].update(file="../outside.safetensors"), r"weights.file '../outside.safetensors' points outside"),
    "weights-windows-drive": (lambda c: c["weights"].update(file="C:\\model.safetensors"), r"points outside the export folder"),
    "onnx-dotdot": (lambda c: c.update(onnx={"text": {"file": "../evil.onnx"}}), r"onnx.text.file '../evil.onnx' points outside"),
    "sha256-missing": (lambda c: c["weights"].pop("sha256"), r"records no valid sha256 of the weights"),
    "sha256-not-hex": (lambda c: c["weights"].update(sha256="z" * 64), r"records no valid sha256 of the weights"),
    "towers-not-object": (lambda c: c.update(towers=["text"]), r"config.json: config.towers must be dict, not list"),
    "unknown-format": (lambda c: c.update(format="evil"), r"is not an mmalign export \(format 'evil'"),
    "future-version": (lambda c: c.update(format_version=99), r"has format_version 99; this mmalign reads"),
    "version-as-string": (lambda c: c.update(format_version="2"), r"has format_version '2'"),
    "legacy-captioner": (lambda c: c.update(format="mmalign-prefix-captioner", version=1),
                         r"captioner export of format version 1.*re-export it with this mmalign: `mmalign export --ckpt"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_malicious_config_refused(export, tmp_path, marker, case):
    edit, message = CONFIG_CASES[case]
    shutil.copy(export / WEIGHTS_NAME, tmp_path / "outside.safetensors")  # a readable file outside the folder
    target = edit_config(copy(export, tmp_path), edit)
    with pytest.raises(ExportError, match=message):
        AlignedModel.from_pretrained(target, device="cpu")


def test_weights_symlink_out_of_the_folder_refused(export, tmp_path):
    target = copy(export, tmp_path)
    shutil.move(target / WEIGHTS_NAME, tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", target / WEIGHTS_NAME)
    with pytest.raises(ExportError, match=r"weights.file 'model.safetensors' resolves to .*outside.safetensors, outside the export folder"):
        AlignedModel.from_pretrained(target, device="cpu")


def _set(key_prefix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        key = next(k for k in t if k.startswith(key_prefix))
        t[key] = make(t[key]).contiguous()
    return edit


WEIGHT_CASES = {  # (edit, rehash config.json, message)
    "modified-values": (_set("towers.text.projector.", lambda v: v + 1.0), False, r"sha256 differs from the one recorded at export"),
    "nan": (_set("towers.text.projector.", lambda v: v.index_fill(0, torch.tensor([0]), float("nan"))), True,
            r"tensors \['towers.text.projector.proj.\w+'\] hold NaN/Inf values; refusing to load them"),
    "inf": (_set("towers.image.projector.", lambda v: v.fill_(float("inf"))), True, r"hold NaN/Inf values; refusing to load them"),
    "int-weights": (_set("towers.text.projector.proj.weight", lambda v: v.long()), True,
                    r"tower 'text': tensor towers.text.projector.proj.weight has dtype I64; weights must be floating point"),
    "int-temperature": (_set("objectives.0.", lambda v: v.int()), True, r"tensor objectives.0.\S+ has dtype I32; weights must be floating point"),
    "missing-tensor": (lambda t: t.pop("towers.text.projector.proj.bias"), True, r"tower 'text': missing tensor towers.text.projector.proj.bias"),
    "extra-tower-tensor": (lambda t: t.update({"towers.text.projector.evil": torch.zeros(3)}), True,
                           r"tower 'text': unexpected tensor towers.text.projector.evil \(3,\)"),
    "extra-tensor": (lambda t: t.update({"evil": torch.zeros(3)}), True, r"unexpected tensor evil"),
    "reshaped": (_set("towers.text.projector.proj.weight", lambda v: v[:8]), True,
                 r"tensor towers.text.projector.proj.weight has shape \(8, 32\), the rebuilt module needs \(16, 32\)"),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_malicious_weights_refused(export, tmp_path, case):
    edit, rehash, message = WEIGHT_CASES[case]
    target = edit_weights(copy(export, tmp_path), edit, rehash=rehash)
    with pytest.raises(ExportError, match=message):
        AlignedModel.from_pretrained(target, device="cpu")


FILE_CASES = {  # raw bytes of model.safetensors -> message
    "truncated": (lambda b: b[:-100], r"is not a readable safetensors file: .*incomplete metadata, file not fully covered"),
    "trailing-bytes": (lambda b: b + b"\0" * 64, r"is not a readable safetensors file: .*incomplete metadata, file not fully covered"),
    "not-safetensors": (lambda b: b"\xff" * 8 + b"{}", r"is not a readable safetensors file: .*header too large"),
    "empty": (lambda b: b"", r"is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_corrupt_weights_file_refused(export, tmp_path, case):
    make, message = FILE_CASES[case]
    target = copy(export, tmp_path)
    (target / WEIGHTS_NAME).write_bytes(make((target / WEIGHTS_NAME).read_bytes()))
    with pytest.raises(ExportError, match=message):
        AlignedModel.from_pretrained(target, device="cpu")


def test_missing_weights_file_refused(export, tmp_path):
    target = copy(export, tmp_path)
    (target / WEIGHTS_NAME).unlink()
    with pytest.raises(ExportError, match=r"weights file model.safetensors is missing"):
        AlignedModel.from_pretrained(target, device="cpu")


JSON_CASES = {  # raw bytes of config.json (given the good one) -> message
    "invalid": (lambda b: b[:-20], r"config.json is not valid JSON"),
    "list": (lambda b: b"[" + b + b"]", r"config.json must hold a JSON object, not a list"),
    "string": (lambda b: b'"mmalign.aligned_model"', r"config.json must hold a JSON object, not a str"),
    "nan-literal": (lambda b: b.replace(b'"embed_dim": 16', b'"embed_dim": NaN'), r"is not valid JSON: NaN is not JSON"),
    "duplicate-key": (lambda b: b.replace(b'{', b'{"format": "evil", ', 1), r"is not valid JSON: duplicate key 'format'"),
    "invalid-utf8": (lambda b: b.replace(b'"embed_dim"', b'"embed_dim\xff"'), r"is not valid JSON: 'utf-8' codec can't decode"),
    "deeply-nested": (lambda b: b"[" * 200_000 + b"]" * 200_000, r"is not valid JSON"),
    "oversized": (lambda b: b[:-2] + b', "pad": "' + b"x" * (9 << 20) + b'"}', r"an export's config.json is at most 8,388,608"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_malformed_config_json_refused(export, tmp_path, case):
    make, message = JSON_CASES[case]
    target = copy(export, tmp_path)
    (target / CONFIG_NAME).write_bytes(make(json.dumps(json.loads((target / CONFIG_NAME).read_text())).encode()))
    with pytest.raises(ExportError, match=message):
        mmalign.load(target)


def test_format_version_1_embedding_export_still_loads(export, tmp_path):
    target = edit_config(copy(export, tmp_path), lambda c: c.update(format_version=1))
    old, new = AlignedModel.from_pretrained(target, device="cpu"), AlignedModel.from_pretrained(export, device="cpu")
    torch.testing.assert_close(old.embed_text(["a dog"]), new.embed_text(["a dog"]))


# -- captioner exports --------------------------------------------------------------------------------
@pytest.mark.parametrize("slot", ["image_encoder", "lm", "projector"])
def test_captioner_code_exec_class_path_refused(captioner_export, tmp_path, marker, slot):
    target = edit_config(copy(captioner_export, tmp_path), lambda c: c[slot].update(evil(marker)))
    with pytest.raises(ExportError, match=rf"^{slot}: refusing to import 'subprocess.getoutput'"):
        mmalign.load(target)


CAPTIONER_CASES = {
    "hparams-fed-back": (lambda c: c["module"].update(_class_path="mmalign.captioning.PrefixCaptioningModule"),
                         r"config.json: module._class_path is not an argument of PrefixCaptioningModule"),
    "huge-projector": (lambda c: c["projector"]["init_args"].update(hidden_dim=131072),
                       r"projector: tensor projector.queries has shape \(2, 32\), the rebuilt module needs \(2, 131072\)"),
    "lm-not-frozen-lm": (lambda c: c["lm"].update(class_path="encoders.TimmImageEncoder"),
                         r"lm: 'encoders.TimmImageEncoder' is not a subclass of mmalign.captioning.lm.FrozenLM"),
    "weights-dotdot": (lambda c: c["weights"].update(file="../model.safetensors"), r"weights.file '../model.safetensors' points outside"),
    "embedding-loader": (None, r"is a visual-prefix captioner export: load it with mmalign.load"),
}


@pytest.mark.parametrize("case", list(CAPTIONER_CASES))
def test_malicious_captioner_config_refused(captioner_export, tmp_path, marker, case):
    edit, message = CAPTIONER_CASES[case]
    target = copy(captioner_export, tmp_path)
    if edit is None:
        with pytest.raises(ExportError, match=message):
            AlignedModel.from_pretrained(target)
        return
    with pytest.raises(ExportError, match=message):
        mmalign.load(edit_config(target, edit))


CAPTIONER_WEIGHT_CASES = {
    "nan-lora": (_set("lm.", lambda v: v.fill_(float("nan"))), r"tensors \['lm\.\S+'\] hold NaN/Inf values"),
    "missing-lora": (lambda t: t.pop(next(k for k in t if k.startswith("lm."))), r"lm \(LoRA\): missing tensor lm\."),
    "int-projector": (_set("projector.queries", lambda v: v.long()), r"projector: tensor projector.queries has dtype I64"),
}


@pytest.mark.parametrize("case", list(CAPTIONER_WEIGHT_CASES))
def test_malicious_captioner_weights_refused(captioner_export, tmp_path, case):
    edit, message = CAPTIONER_WEIGHT_CASES[case]
    target = edit_weights(copy(captioner_export, tmp_path), edit)
    with pytest.raises(ExportError, match=message):
        mmalign.load(target)


def test_captioner_old_class_paths_map_through_compat(captioner_export, tmp_path):
    target = edit_config(copy(captioner_export, tmp_path), lambda c: c["lm"].update(class_path="mmalign.lm.FrozenLM"))
    assert type(mmalign.load(target).lm).__module__ == "mmalign.captioning.lm"


# -- checkpoints and `mmalign export` ------------------------------------------------------------------
def _run(module, tmp_path: Path, recipe: dict, state: dict | None = None) -> Path:
    """A run directory as LightningCLI leaves it: checkpoints/last.ckpt + config.yaml."""
    from mmalign.export import export_state

    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    torch.save(state if state is not None else {"state_dict": export_state(module), "epoch": 1, "global_step": 4}, ckpt)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recipe))
    return ckpt


def _with(recipe: dict, *path: str, value: dict) -> dict:
    out = json.loads(json.dumps(recipe))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


class _Pickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_checkpoint_refused(module, tmp_path, marker):
    from mmalign.cli import main

    ckpt = _run(module, tmp_path, RECIPE, state={"state_dict": {}, "hyper_parameters": _Pickled(marker)})
    with pytest.raises(ExportError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        main(["export", "--ckpt", str(ckpt), "--output", str(tmp_path / "out")])


def test_not_a_lightning_checkpoint_refused(module, tmp_path):
    from mmalign.export import export_checkpoint

    ckpt = _run(module, tmp_path, RECIPE, state={"weights": torch.zeros(2)})
    with pytest.raises(ExportError, match=r"is not a Lightning checkpoint \(no 'state_dict' entry\)"):
        export_checkpoint(ckpt, tmp_path / "out")


def test_nan_checkpoint_refused(module, tmp_path):
    from mmalign.export import export_checkpoint, export_state

    state = export_state(module)
    state["towers.text.projector.proj.bias"][0] = float("nan")
    ckpt = _run(module, tmp_path, RECIPE, state={"state_dict": state})
    with pytest.raises(ExportError, match=r"trainable tensors \['towers.text.projector.proj.bias'\] hold NaN/Inf values"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("slot", ["optimizer", "scheduler"])
def test_checkpoint_recipe_training_only_callables_never_run(module, tmp_path, marker, slot, capsys):
    from mmalign.cli import main

    ckpt = _run(module, tmp_path, _with(RECIPE, "model", "init_args", slot, value=evil(marker)))
    main(["export", "--ckpt", str(ckpt), "--output", str(tmp_path / "out")])
    assert "exported 2 towers" in capsys.readouterr().out


def test_checkpoint_recipe_code_exec_class_path_refused(module, tmp_path, marker):
    from mmalign.cli import main

    ckpt = _run(module, tmp_path, _with(RECIPE, "model", "init_args", "towers", "text", "init_args", "encoder", value=evil(marker)))
    with pytest.raises(ExportError, match=r"recipe model.init_args.towers.text.init_args.encoder: refusing to import 'subprocess.getoutput'"):
        main(["export", "--ckpt", str(ckpt), "--output", str(tmp_path / "out")])


@pytest.mark.parametrize("form", ["--config", "--config=", "--recipe"])
def test_export_config_option_is_the_recipe(module, export, tmp_path, marker, form):
    """``mmalign export --config RECIPE`` is honoured: the malicious config.yaml beside the checkpoint is not read."""
    from safetensors.torch import load_file

    from mmalign.cli import main

    beside = _with(RECIPE, "model", "init_args", "optimizer", value=evil(marker))  # ran when config.yaml was used
    ckpt = _run(module, tmp_path, _with(beside, "model", "init_args", "towers", "text", "init_args", "encoder", value=evil(marker)))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    option = [form + str(tmp_path / "recipe.yaml")] if form.endswith("=") else [form, str(tmp_path / "recipe.yaml")]
    main(["export", "--ckpt", str(ckpt), *option, "--output", str(tmp_path / "out")])
    a, b = load_file(str(tmp_path / "out" / WEIGHTS_NAME)), load_file(str(export / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_nan_module(module, tmp_path):
    import copy as _copy

    broken = _copy.deepcopy(module)
    with torch.no_grad():
        next(iter(broken.towers["image"].projector.parameters())).fill_(float("nan"))
    with pytest.raises(ExportError, match=r"tensors \['towers.image.projector.\S+'\] hold NaN/Inf values \(did training diverge\?\)"):
        export_module(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))  # nothing left behind


# -- fields that name code or files indirectly (issue 17: every field the loaders read) -------------------------
def importable_marker_module(tmp_path: Path, monkeypatch, marker: Path, name: str = "evil_module_f") -> str:
    """A module on sys.path that leaves ``marker`` when IMPORTED (what a dotted string could make a loader run)."""
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil:\n    pass\ndef make(*a, **k):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _local_text_model(tmp_path: Path, marker: Path) -> Path:
    """A local copy of the tiny text model turned hostile: pickled weights and custom code that leave ``marker``."""
    from safetensors.torch import load_file

    from encoders.tiny import resolve_model_path

    local = tmp_path / "local_model"
    shutil.copytree(resolve_model_path("tiny:bert-text"), local)
    torch.save({"evil": _Pickled(marker), **load_file(str(local / "model.safetensors"))}, local / "pytorch_model.bin")
    (local / "model.safetensors").unlink()
    cfg = json.loads((local / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.Evil"}
    (local / "config.json").write_text(json.dumps(cfg))
    (local / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil:\n    pass\n")
    return local


def test_cascade_text_encoder_string_never_imports_outside_encoders(export, tmp_path, marker, monkeypatch):
    """``WhisperCascadeEncoder(text_encoder=...)`` is a class path inside init_args: it is checked before any import."""
    from encoders.cascade import text_encoder_class

    name = importable_marker_module(tmp_path, monkeypatch, marker)

    def cascade(c: dict) -> None:
        c["towers"]["text"]["encoder"] = {**c["towers"]["text"]["encoder"], "class_path": "encoders.cascade.WhisperCascadeEncoder",
                                          "init_args": {"model_name_or_path": "tiny:whisper-asr", "text_encoder": f"{name}.Evil"}}

    target = edit_config(copy(export, tmp_path), cascade)
    with pytest.raises(ExportError, match=rf"tower 'text' encoder encoders.cascade.WhisperCascadeEncoder: .*text_encoder '{name}.Evil': "
                                          r"refusing to import it; a cascade names its text encoder by a class path under encoders\."):
        AlignedModel.from_pretrained(target, device="cpu")
    for bad in ("subprocess.getoutput", "encoders.__main__.X", "encoders"):
        with pytest.raises(TypeError, match="refusing to import it"):
            text_encoder_class(bad)
    with pytest.raises(TypeError, match="is not a text Encoder class"):
        text_encoder_class("encoders.WhisperSpeechEncoder")
    assert name not in __import__("sys").modules


LOCAL_PATH_CASES = {  # (tower, init arg, value given the test's tmp_path and hostile local model)
    "absolute": ("text", "model_name_or_path", lambda tmp, local: str(local)),
    "relative-existing": ("text", "model_name_or_path", lambda tmp, local: "local_model"),  # looks like a name, is a folder
    "dotdot": ("text", "model_name_or_path", lambda tmp, local: "../local_model"),
    "home": ("text", "model_name_or_path", lambda tmp, local: "~/models/bert"),
    "timm-local-dir": ("image", "model_name", lambda tmp, local: f"local-dir:{local}"),
    "timm-checkpoint-file": ("image", "checkpoint_path", lambda tmp, local: str(local / "pytorch_model.bin")),
}


@pytest.mark.parametrize("case", list(LOCAL_PATH_CASES))
def test_encoder_arguments_naming_local_paths_refused(export, tmp_path, marker, monkeypatch, case):
    """An export names its frozen models by hub id or tiny:/packaged: name; a local path (which the loader would read,
    outside the export folder) is refused before the encoder is built, and the hostile model there never runs."""
    tower, arg, value = LOCAL_PATH_CASES[case]
    local = _local_text_model(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    path = value(tmp_path, local)
    target = edit_config(copy(export, tmp_path), lambda c: c["towers"][tower]["encoder"]["init_args"].update({arg: path}))
    with pytest.raises(ExportError, match=rf"^tower '{tower}' encoder: config.json towers.{tower}.encoder.init_args.{arg} "
                                          rf"'{re.escape(path)}' names a local path; .* encoder_overrides="):
        AlignedModel.from_pretrained(target, device="cpu")


def test_local_path_the_user_passes_is_theirs(export, tmp_path):
    """``encoder_overrides`` (the user's own argument) may name a local model: the refusal covers recorded values only."""
    from encoders.tiny import resolve_model_path

    local = shutil.copytree(resolve_model_path("tiny:bert-text"), tmp_path / "mine")
    target = edit_config(copy(export, tmp_path), lambda c: c["towers"]["text"]["encoder"]["init_args"].update(
        model_name_or_path=str(local)))
    with pytest.raises(ExportError, match="names a local path"):
        AlignedModel.from_pretrained(target, device="cpu")
    with pytest.warns(UserWarning, match="is not the one the projector was trained on"):
        model = AlignedModel.from_pretrained(target, device="cpu", strict=False,
                                             encoder_overrides={"text": {"model_name_or_path": str(local)}})
    ref = AlignedModel.from_pretrained(export, device="cpu")
    torch.testing.assert_close(model.embed_text(["a dog"]), ref.embed_text(["a dog"]))  # same tiny weights, same output


def test_cascade_nested_text_encoder_local_path_refused(export, tmp_path):
    def cascade(c: dict) -> None:
        c["towers"]["text"]["encoder"]["class_path"] = "encoders.cascade.WhisperCascadeEncoder"
        c["towers"]["text"]["encoder"]["init_args"] = {"model_name_or_path": "tiny:whisper-asr", "text_encoder": "encoders.HFTextEncoder",
                                                       "text_encoder_args": {"model_name_or_path": "/etc"}}

    with pytest.raises(ExportError, match=r"init_args.text_encoder_args.model_name_or_path '/etc' names a local path"):
        AlignedModel.from_pretrained(edit_config(copy(export, tmp_path), cascade), device="cpu")


def test_captioner_lm_local_path_refused(captioner_export, tmp_path):
    target = edit_config(copy(captioner_export, tmp_path), lambda c: c["lm"]["init_args"].update(model_name="/etc"))
    with pytest.raises(ExportError, match=r"^lm: config.json lm.init_args.model_name '/etc' names a local path"):
        mmalign.load(target)


def test_captioner_local_paths_the_user_passes_are_theirs(captioner_export, tmp_path):
    """A captioner export naming a local LM or encoder is refused with the way to pass it (``lm_overrides``,
    ``encoder_overrides`` of the captioner's own ``from_pretrained``); passed by the user, it loads."""
    from encoders.tiny import resolve_model_path
    from mmalign.captioning import PrefixCaptioningModule

    lm = shutil.copytree(resolve_model_path("tiny:tiny-causal-lm"), tmp_path / "my_lm")
    target = edit_config(copy(captioner_export, tmp_path), lambda c: c["lm"]["init_args"].update(model_name=str(lm)))
    with pytest.raises(ExportError, match=r"names a local path; .*PrefixCaptioningModule\.from_pretrained\(\.\.\., lm_overrides="):
        PrefixCaptioningModule.from_pretrained(target)
    model = PrefixCaptioningModule.from_pretrained(target, lm_overrides={"model_name": str(lm)})
    ref = PrefixCaptioningModule.from_pretrained(captioner_export)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)  # the same tiny LM from the user's copy: the same weights

    key = ref.encoder_arg
    target = edit_config(copy(captioner_export, tmp_path, "enc"),
                         lambda c: c[key]["init_args"].update(checkpoint_path=str(tmp_path / "vit.bin")))
    with pytest.raises(ExportError, match=r"names a local path; .*from_pretrained\(\.\.\., encoder_overrides=\{<argument>"):
        PrefixCaptioningModule.from_pretrained(target)
    model = PrefixCaptioningModule.from_pretrained(target, encoder_overrides={"checkpoint_path": None})  # the user's value
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_checkpoint_recipe_plain_dotted_string_never_imported(module, tmp_path, marker, monkeypatch):
    """jsonargparse imports a dotted STRING given for a callable-typed argument (the projector factory) with no
    ``class_path`` key; such strings are checked like class paths before parsing."""
    from mmalign.cli import main

    name = importable_marker_module(tmp_path, monkeypatch, marker)
    ckpt = _run(module, tmp_path, _with(RECIPE, "model", "init_args", "towers", "text", "init_args", "projector", value=f"{name}.make"))
    with pytest.raises(ExportError, match=rf"recipe model.init_args.towers.text.init_args.projector: refusing to import '{name}.make'"):
        main(["export", "--ckpt", str(ckpt), "--output", str(tmp_path / "out")])
    assert name not in __import__("sys").modules
