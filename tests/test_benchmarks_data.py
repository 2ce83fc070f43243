"""Benchmark loaders on tiny copies in each benchmark's on-disk layout; metrics against hand-computed answers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmalign.evaluation.benchmarks import load_benchmark, load_babel_imagenet, retrieval_scores, run_benchmark


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)
    return path


class Stub:
    """An AlignedModel stand-in: fixed vectors per image file name and per text."""

    def __init__(self, media, texts):
        self.media, self.texts = media, texts

    def embed_image(self, paths, batch_size=64):
        return torch.tensor([self.media[p.rsplit("/", 1)[-1]] for p in paths], dtype=torch.float32)

    embed_speech = embed_image

    def embed_text(self, texts, lang=None, batch_size=64):
        return torch.tensor([self.texts[t] for t in texts], dtype=torch.float32)


MEDIA = {"k0.jpg": [1, 0, 0], "k1.jpg": [0, 1, 0], "k2.jpg": [0, 0, 1]}
TEXTS = {"c0": [1, 0, 0], "c1": [0, 1, 0.1], "c2": [0, 1, 0], "c3": [0.9, 0, 0.1], "d0": [0, 1, 0], "d1": [0, 1, 0]}


@pytest.fixture
def xm3600(tmp_path):
    caps = [{"image/key": "k0", "en": {"caption": ["c0", "c1"]}, "de": {"caption": ["d0"]}},
            {"image/key": "k1", "en": {"caption": ["c2"]}, "de": {"caption": ["d1"]}},
            {"image/key": "k2", "en": {"caption": ["c3"]}}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    for k in ("k0", "k1", "k2"):
        _img(tmp_path / "images" / f"{k}.jpg")
    return tmp_path


def test_xm3600_parsing_and_hand_computed_recall(xm3600):
    bench = load_benchmark("xm3600", xm3600)
    assert len(bench.media) == 3 and bench.captions["en"] == [(0, "c0"), (0, "c1"), (1, "c2"), (2, "c3")]
    assert bench.captions["de"] == [(0, "d0"), (1, "d1")]
    res = run_benchmark(Stub(MEDIA, TEXTS), bench)["retrieval"]
    # en text->image ranks [1, 3, 1, 2]; image->text: each image's best caption ranks first
    assert res["en"]["text->image/R@1"] == 50.0 and res["en"]["text->image/R@5"] == 100.0
    assert res["en"]["image->text/R@1"] == 100.0
    # de: gallery is the 2 images with German captions; d0 ranks 2nd; image->text all ties (pessimistic: rank 2)
    assert res["de"]["text->image/R@1"] == 50.0 and res["de"]["image->text/R@1"] == 0.0 and res["de"]["image->text/R@5"] == 100.0
    first = run_benchmark(Stub(MEDIA, TEXTS), bench, captions="first")
    assert first["num_captions"]["en"] == 3 and first["retrieval"]["en"]["text->image/R@1"] == pytest.approx(100 * 2 / 3)


def test_eval_benchmark_command_writes_report(xm3600, tmp_path, monkeypatch, capsys):
    from mmalign.evaluation.command import evaluate
    from mmalign.export import model as model_mod

    monkeypatch.setattr(model_mod.AlignedModel, "from_pretrained", classmethod(lambda cls, *a, **k: Stub(MEDIA, TEXTS)))
    res = evaluate(["--benchmark", "xm3600", "--root", str(xm3600), "--model", "x", "--output", str(tmp_path / "ev")])
    assert res["retrieval"]["en"]["text->image/R@1"] == 50.0
    out = capsys.readouterr().out
    assert "| en |" in out and "image->text/R@10" in out
    assert json.loads((tmp_path / "ev" / "xm3600.json").read_text())["protocol"].startswith("CLIP_benchmark")


def test_xtd10_and_multi30k_layouts(tmp_path):
    x = tmp_path / "xtd"
    (x).mkdir()
    (x / "test_image_names.txt").write_text("COCO_val2014_1.jpg\nCOCO_val2014_2.jpg\n")
    (x / "test_1kcaptions_de.txt").write_text("ein Hund\neine Katze\n")
    (x / "test_1kcaptions_it.txt").write_text("un cane\nun gatto\n")
    for n in ("COCO_val2014_1.jpg", "COCO_val2014_2.jpg"):
        _img(x / "images" / n)
    b = load_benchmark("xtd10", x)
    assert sorted(b.captions) == ["de", "it"] and b.captions["it"][1] == (1, "un gatto") and b.media[0].endswith("COCO_val2014_1.jpg")
    m = tmp_path / "multi30k"
    (m / "data/task1/image_splits").mkdir(parents=True)
    (m / "data/task1/raw").mkdir(parents=True)
    (m / "data/task1/image_splits/test_2017_flickr.txt").write_text("1.jpg\n2.jpg\n")
    for lang, lines in {"en": "A dog.\nA cat.\n", "fr": "Un chien.\nUn chat.\n", "de": "Ein Hund.\nEine Katze.\n"}.items():
        (m / f"data/task1/raw/test_2017_flickr.{lang}").write_text(lines)
    (m / "data/task1/raw/test_2016_flickr.en").write_text("other\n")
    for n in ("1.jpg", "2.jpg"):
        _img(m / "images" / n)
    b = load_benchmark("multi30k", m, year=2017)
    assert b.name == "multi30k-2017" and sorted(b.captions) == ["de", "en", "fr"] and b.captions["fr"][0] == (0, "Un chien.")


def test_karpathy_flickr30k_and_coco(tmp_path):
    f = tmp_path / "f30k"
    f.mkdir()
    (f / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "A dog runs."}, {"raw": "A dog."}]},
        {"filename": "2.jpg", "split": "train", "sentences": [{"raw": "skip"}]}]}))
    _img(f / "images" / "1.jpg")
    b = load_benchmark("flickr30k", f)
    assert b.media == [str(f / "images" / "1.jpg")] and b.captions == {"en": [(0, "A dog runs."), (0, "A dog.")]}
    c = tmp_path / "coco"
    c.mkdir()
    (c / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_5.jpg", "split": "test", "sentences": [{"raw": "A man."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_6.jpg", "split": "restval", "sentences": [{"raw": "x"}]}]}))
    _img(c / "val2014" / "COCO_val2014_5.jpg")
    b = load_benchmark("coco", c)
    assert len(b.media) == 1 and b.media[0].endswith("val2014/COCO_val2014_5.jpg")


def _wav(path):
    import numpy as np
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(160, np.float32), 16000)


def test_fleurs_and_commonvoice_layouts(tmp_path):
    f = tmp_path / "fleurs"
    for folder, rows in {"de_de": [("1", "a.wav", "Hallo Welt", "hallo welt")], "fr_fr": [("1", "b.wav", "Bonjour", "bonjour")]}.items():
        (f / "data" / folder).mkdir(parents=True)
        (f / "data" / folder / "test.tsv").write_text("".join("\t".join([*r, "h a l", "160", "MALE"]) + "\n" for r in rows))
        for r in rows:
            _wav(f / "data" / folder / "audio" / "test" / r[1])
    b = load_benchmark("fleurs", f)
    assert b.modality == "speech" and b.captions == {"de": [(0, "Hallo Welt")], "fr": [(1, "Bonjour")]}
    cv = tmp_path / "cv"
    (cv / "clips").mkdir(parents=True)
    _wav(cv / "clips" / "x.mp3")
    (cv / "test.tsv").write_text("client_id\tpath\tsentence\tlocale\nc\tx.mp3\tHola.\tes\n")
    b = load_benchmark("commonvoice", cv)
    assert b.captions == {"es": [(0, "Hola.")]} and b.media[0].endswith("clips/x.mp3")
    res = retrieval_scores(torch.eye(2), {"de": torch.tensor([[1.0, 0]]), "fr": torch.tensor([[0.0, 1]])}, load_benchmark("fleurs", f))
    assert res["de"]["text->audio/R@1"] == 100.0


def test_babel_imagenet_and_classify(tmp_path, monkeypatch, capsys):
    root = tmp_path / "babel"
    for wnid in ("n01", "n02", "n03"):
        _img(root / "val" / wnid / f"{wnid}_1.JPEG")
    (root / "babel_imagenet.json").write_text(json.dumps({"de": [[0, 2], ["Hund", "Katze"]]}))
    paths, labels, names = load_babel_imagenet(root, "de")
    assert labels == [0, 1] and names == ["Hund", "Katze"] and paths[1].endswith("n03/n03_1.JPEG")

    from mmalign.evaluation.classify import GENERAL_TEMPLATES, classify
    from mmalign.export import model as model_mod

    assert not any("emoji" in t for ts in GENERAL_TEMPLATES.values() for t in ts)

    class Clf:
        def embed_image(self, paths, batch_size=64):
            return torch.tensor([[1.0, 0] if "n01" in p else [0.0, 1] for p in paths])

        def embed_text(self, texts, lang=None, batch_size=64):
            return torch.tensor([[1.0, 0.1] if "Hund" in t else [0.1, 1.0] for t in texts])

    monkeypatch.setattr(model_mod.AlignedModel, "from_pretrained", classmethod(lambda cls, *a, **k: Clf()))
    res = classify(model="x", labels="babel:de", babel_root=str(root), output=str(tmp_path / "p.json"))
    assert res["top1"] == 1.0 and res["predictions"][0]["top"][0]["label"] == "Hund"
    (tmp_path / "labels.txt").write_text("Hund\nKatze\n")
    (tmp_path / "folder" / "Katze").mkdir(parents=True)
    _img(tmp_path / "folder" / "Katze" / "n01x.png")  # a "dog" image filed as cat: top-1 0
    res = classify(model="x", labels=str(tmp_path / "labels.txt"), images=str(tmp_path / "folder"), lang="de")
    assert res["top1"] == 0.0 and res["top2"] == 1.0
    with pytest.raises(ValueError, match="no prompt templates"):
        classify(model="x", labels=str(tmp_path / "labels.txt"), images=str(tmp_path / "folder"), lang="xx")


def test_eval_benchmark_and_classify_with_a_real_tiny_export(xm3600, tmp_path):
    """End to end on tiny random encoders: the commands run an actual export (values are not checked)."""
    import encoders
    import projectors
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from mmalign.evaluation.classify import classify
    from mmalign.evaluation.command import evaluate
    from mmalign.export import export_module

    image = Tower(encoders.TimmImageEncoder("tiny:timm-vit"), field="image", projector=projectors.Linear)
    text = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), field="text", projector=projectors.Linear)
    module = AlignmentModule(towers={"image": image, "text": text}, objectives=[Objective(ClipLoss(), ["image", "text"])], embed_dim=8)
    export = export_module(module, tmp_path / "export", languages=["en", "de"])
    res = evaluate(["--benchmark", "xm3600", "--root", str(xm3600), "--model", str(export), "--output", str(tmp_path / "ev"),
                    "--device", "cpu"])
    assert set(res["retrieval"]) == {"en", "de"} and 0 <= res["retrieval"]["en"]["image->text/R@10"] <= 100
    (tmp_path / "labels.txt").write_text("Hund\nKatze\n")
    out = classify(model=str(export), labels=str(tmp_path / "labels.txt"), images=str(xm3600 / "images"), lang="de", device="cpu")
    assert len(out["predictions"]) == 3 and out["predictions"][0]["top"][0]["label"] in ("Hund", "Katze")


class CoversOnlyEnglish(Stub):
    """A model whose text tower declares its languages (as USE-m's 16): German is not among them."""

    def language_problem(self, lang):
        return None if lang == "en" else f"the text encoder does not cover {lang!r}"


def test_uncovered_languages_are_skipped_and_counted_or_stop_the_run(xm3600, tmp_path, monkeypatch, capsys):
    bench = load_benchmark("xm3600", xm3600)
    res = run_benchmark(CoversOnlyEnglish(MEDIA, TEXTS), bench)
    assert sorted(res["retrieval"]) == ["en"] and res["retrieval"]["en"]["text->image/R@1"] == 50.0  # en unchanged
    assert res["skipped_languages"] == {"de": "the text encoder does not cover 'de'"}
    with pytest.raises(ValueError, match=r"xm3600: language 'de': the text encoder does not cover 'de'"):
        run_benchmark(CoversOnlyEnglish(MEDIA, TEXTS), bench, uncovered="error")
    with pytest.raises(ValueError, match="covers none of its 1 languages"):
        run_benchmark(CoversOnlyEnglish(MEDIA, TEXTS), load_benchmark("xm3600", xm3600, languages=["de"]))

    from mmalign.evaluation.command import evaluate
    from mmalign.export import model as model_mod

    monkeypatch.setattr(model_mod.AlignedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: CoversOnlyEnglish(MEDIA, TEXTS)))
    evaluate(["--benchmark", "xm3600", "--root", str(xm3600), "--model", "x", "--output", str(tmp_path / "ev")])
    assert "Skipped 1 of 2 languages the model does not cover: de" in capsys.readouterr().out
    with pytest.raises(ValueError, match="language 'de'"):
        evaluate(["--benchmark", "xm3600", "--root", str(xm3600), "--model", "x", "--uncovered", "error"])
