"""``mmalign embed`` on a tiny export: modality inferred from the input, repeated inputs encoded once,
``--normalize``, atomic output, progress bar; the Python API's language checks."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.export import AlignedModel, export_module
from mmalign.export.embed import deduplicate, embed, read_items


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    from encoders import TimmImageEncoder
    from encoders.hf_text import HFTextEncoder
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from projectors import MLP, Linear

    torch.manual_seed(3)
    towers = {
        "image": Tower(TimmImageEncoder("tiny:timm-vit"), "image", functools.partial(MLP, num_blocks=1)),
        "text": Tower(HFTextEncoder("tiny:bert-text", pooling="mean"), "text", Linear),  # not normalised
    }
    module = AlignmentModule(towers, [Objective(ClipLoss(), ["image", "text"])], embed_dim=8).eval()
    return export_module(module, tmp_path_factory.mktemp("exp") / "tiny", languages=["en", "de"])


@pytest.fixture(scope="module")
def model(tiny_export) -> AlignedModel:
    return AlignedModel.from_pretrained(tiny_export, device="cpu")


def _repeated_manifest(data: Path, out: Path, copies: int = 4) -> list[dict]:
    """A test-set shape: every image listed once per language (``copies`` rows per image)."""
    rows = [json.loads(line) for line in (data / "val.jsonl").read_text().splitlines()][:5]
    langs = ["en", "de", "es", "fr"][:copies]
    out_rows = [{**r, "id": f"{r['id']}-{k}", "lang": lang, "image": str(data / r["image"]), "text": f"{r['text']} {lang}"}
                for r in rows for k, lang in enumerate(langs)]
    out.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    return out_rows


def test_modality_inferred_from_a_list(tiny_export, model, synthetic_data, tmp_path, recwarn):
    images = sorted((synthetic_data / "images").glob("*.png"))[:3]
    (tmp_path / "imgs.txt").write_text("".join(f"{p}\n" for p in images))
    embed(str(tiny_export), str(tmp_path / "imgs.txt"), str(tmp_path / "i.npy"), progress=False)  # no --field
    np.testing.assert_allclose(np.load(tmp_path / "i.npy"), model.embed_image([str(p) for p in images]).numpy(), atol=1e-6)
    (tmp_path / "t.txt").write_text("a red apple\nein Hund\n")
    embed(str(tiny_export), str(tmp_path / "t.txt"), str(tmp_path / "t.npy"), progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), model.embed_text(["a red apple", "ein Hund"]).numpy(), atol=1e-6)
    assert not [w for w in recwarn if "file paths" in str(w.message)]
    # a list of image paths embedded as text on purpose (or by a forgotten --field) is said before it runs
    with pytest.warns(UserWarning, match=r"3 of 3 lines look like file paths .* embedded as TEXT; .* pass --field image"):
        embed(str(tiny_export), str(tmp_path / "imgs.txt"), str(tmp_path / "p.npy"), field="text", progress=False)
    (tmp_path / "mixed.txt").write_text(f"{images[0]}\nclip.wav\n")
    with pytest.raises(ValueError, match="mix image and audio files"):
        read_items(tmp_path / "mixed.txt")


def test_manifest_needs_field_when_ambiguous(synthetic_data):
    with pytest.raises(ValueError, match=r"val.jsonl holds text, image, audio: pass --field .*text_en"):
        read_items(synthetic_data / "val.jsonl")
    got = read_items(synthetic_data / "val.jsonl", "image")
    assert got.field == "image" and Path(got.items[0]).is_absolute() and got.langs and len(got.langs) == len(got.items)


def test_repeated_inputs_are_encoded_once(tiny_export, model, synthetic_data, tmp_path, monkeypatch, capsys):
    rows = _repeated_manifest(synthetic_data, tmp_path / "test.jsonl")
    calls: list[int] = []
    real = AlignedModel.from_pretrained

    def counting(*args, **kwargs):
        m = real(*args, **kwargs)
        pre = m.towers["image"].encoder.preprocess
        m.towers["image"].encoder.preprocess = lambda items, **kw: (calls.append(len(items)), pre(items, **kw))[1]
        return m

    monkeypatch.setattr(AlignedModel, "from_pretrained", counting)
    embed(str(tiny_export), str(tmp_path / "test.jsonl"), str(tmp_path / "img.npy"), field="image", batch_size=4,
          progress=True)
    assert sum(calls) == 5  # 20 rows, 5 distinct images
    got = np.load(tmp_path / "img.npy")
    np.testing.assert_allclose(got, model.embed_image([r["image"] for r in rows]).numpy(), atol=1e-6)
    captured = capsys.readouterr()
    assert "20 items, 5 distinct" in captured.out and "5/5" in captured.err and "item" in captured.err  # the bar
    # texts are told apart by language too: equal strings in two languages are two items
    unique, langs, inverse = deduplicate(["a", "b", "a", "a"], ["en", "en", "en", "de"])
    assert unique == ["a", "b", "a"] and langs == ["en", "en", "de"] and inverse.tolist() == [0, 1, 0, 2]
    arrays = [np.zeros(3), np.ones(3), np.zeros(3)]
    assert deduplicate(arrays)[2].tolist() == [0, 1, 0]


def test_normalize_and_lang(tiny_export, model, tmp_path):
    (tmp_path / "t.txt").write_text("a red apple\nein Hund\n")
    embed(str(tiny_export), str(tmp_path / "t.txt"), str(tmp_path / "n.npy"), normalize=True, lang="de", progress=False)
    got = np.load(tmp_path / "n.npy")
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    raw = model.embed_text(["a red apple", "ein Hund"]).numpy()
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-3  # the tower does not normalise: --normalize did
    np.testing.assert_allclose(got, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="did you mean 'de'"):
        embed(str(tiny_export), str(tmp_path / "t.txt"), str(tmp_path / "x.npy"), lang="german", progress=False)
    assert not (tmp_path / "x.npy").exists()


def test_failed_run_keeps_the_previous_output(tiny_export, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    out = tmp_path / "out.npy"
    embed(str(tiny_export), str(tmp_path / "t.txt"), str(out), progress=False)
    before = out.read_bytes()
    (tmp_path / "t.txt").write_text("one\ntwo\nthree\n")

    def broken(self, *args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(AlignedModel, "embed", broken)
    with pytest.raises(RuntimeError, match="killed"):
        embed(str(tiny_export), str(tmp_path / "t.txt"), str(out), progress=False)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "t.txt"]


def test_api_language_codes(model):
    with pytest.raises(ValueError, match=r"lang: 'english' is not an ISO 639-1 .*did you mean 'en'\?"):
        model.embed_text(["hello"], lang="english")
    with pytest.raises(ValueError, match=r"lang\[1\]: 'Deutsch' .*did you mean 'de'\?"):
        model.embed_text(["hello", "hallo"], lang=["en", "Deutsch"])
    with pytest.warns(UserWarning, match=r"\['fr'\] were not seen in training"):
        model.embed_text(["un chien"], lang="fr")  # a valid code the encoder covers: zero-shot, a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.embed_text(["x", "y"], lang=["en", "de"])  # seen in training: silent


def test_language_the_encoder_does_not_cover_is_an_error(tmp_path):
    """USE-m declares its 16 languages: Finnish is refused by the encoder (the engine is never loaded)."""
    from encoders.packaged_text import UniversalSentenceEncoderM
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from projectors import Linear

    towers = {"a": Tower(UniversalSentenceEncoderM(), "text", Linear), "b": Tower(UniversalSentenceEncoderM(), "text_en", Linear)}
    module = AlignmentModule(towers, [Objective(ClipLoss(), ["a", "b"])], embed_dim=4).eval()
    m = AlignedModel.from_pretrained(export_module(module, tmp_path / "usem", languages=["en"]), device="cpu")
    with pytest.raises(ValueError, match=r"tower 'a': text item #1 has language 'fi', which Universal Sentence "
                                         r"Encoder Multilingual does not cover; supported: ar, de"):
        m.embed_text(["hello", "hei"], lang=["en", "fi"], tower="a")
    assert m.towers["a"].encoder._engine is None  # refused before any encoding


def test_cli_encoder_overrides_load_an_export_naming_a_local_path(tmp_path, capsys):
    """``mmalign embed --encoder_overrides`` is ``from_pretrained(encoder_overrides=...)``: an export whose recorded
    encoder names a local folder is refused (docs/security.md) unless the user passes a path themselves."""
    import shutil

    from encoders import TimmImageEncoder
    from encoders.hf_text import HFTextEncoder
    from encoders.tiny import resolve_model_path
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from mmalign.cli import main
    from mmalign.export import ExportError
    from projectors import Linear

    local = shutil.copytree(resolve_model_path("tiny:bert-text"), tmp_path / "my-bert")  # trained on a local copy
    other = shutil.copytree(local, tmp_path / "copy-of-my-bert")
    torch.manual_seed(3)
    towers = {"image": Tower(TimmImageEncoder("tiny:timm-vit"), "image", Linear),
              "text": Tower(HFTextEncoder(str(local), pooling="mean"), "text", Linear)}
    module = AlignmentModule(towers, [Objective(ClipLoss(), ["image", "text"])], embed_dim=8).eval()
    target = export_module(module, tmp_path / "export", languages=["en"])
    assert json.loads((target / "config.json").read_text())["towers"]["text"]["encoder"]["init_args"]["model_name_or_path"] == str(local)
    (tmp_path / "t.txt").write_text("a red apple\nein Hund\n")
    with torch.no_grad():
        ref = module.towers["text"](module.towers["text"].encoder.preprocess(["a red apple", "ein Hund"]))  # [2, 8]
    out, args = tmp_path / "t.npy", ["embed", "--model", str(target), "--input", str(tmp_path / "t.txt"), "--progress=false"]
    with pytest.raises(ExportError, match=r"names a local path; .*mmalign embed: --encoder_overrides"):
        main([*args, "--output", str(out)])
    assert not out.exists()
    # the recorded path, passed by the user: the same cache_key, so strict loading passes
    main([*args, "--output", str(out), "--encoder_overrides", f"{{text: {{model_name_or_path: {local}}}}}"])
    np.testing.assert_allclose(np.load(out), ref.numpy(), atol=1e-5)
    # another path is another cache_key: refused as by the Python API unless --strict false (then a warning)
    overrides = f"{{text: {{model_name_or_path: {other}}}}}"
    with pytest.raises(ExportError, match="is not the one the projector was trained on"):
        main([*args, "--output", str(tmp_path / "o.npy"), "--encoder_overrides", overrides])
    with pytest.warns(UserWarning, match="is not the one the projector was trained on"):
        main([*args, "--output", str(tmp_path / "o.npy"), "--encoder_overrides", overrides, "--strict", "false"])
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), ref.numpy(), atol=1e-5)  # same weights, same output
    # an ensemble's members get the overrides too
    with pytest.warns(UserWarning, match="is not the one the projector was trained on"):
        main([*args[:2], f"[{target}, {target}]", *args[3:], "--output", str(tmp_path / "e.npy"),
              "--encoder_overrides", overrides, "--strict", "false"])
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)
    # validated as the API validates it: a tower the export lacks, and a value that is not {tower: {arg: value}}
    with pytest.raises(ExportError, match=r"encoder_overrides names tower 'txt', which is not loaded"):
        main([*args, "--output", str(out), "--encoder_overrides", f"{{txt: {{model_name_or_path: {local}}}}}"])
    with pytest.raises(SystemExit):
        main([*args, "--output", str(out), "--encoder_overrides", "[text]"])
    assert "encoder_overrides" in capsys.readouterr().err
