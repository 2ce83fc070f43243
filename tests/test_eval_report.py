"""The ``mmalign eval`` report (issue 19 item 5, issue 17 item 2): a labelled per-language mean beside the pooled row,
ceilings (the frozen student alone) that are right on a case with a known answer, zero-shot figures that name their
tower pair and prompt templates, a readable retrieval gallery, and nothing written outside ``--output``."""

import json
import os
import re

import pytest
import torch

from mmalign.evaluation import write_report
from mmalign.evaluation.baselines import ceiling_rows, student_ceiling
from mmalign.evaluation.report import _mean_over_languages
from mmalign.evaluation.retrieval import top_k_examples
from mmalign.evaluation.zeroshot import DEFAULT_TEMPLATES, EMOJI_TEMPLATES, GENERAL_TEMPLATES, TEMPLATE_SETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe_args(name: str, data) -> list[str]:
    return [f"--config={ROOT}/configs/{name}.yaml", f"--config={ROOT}/configs/tiny/{name}.yaml",
            *(f"--data.init_args.{s}={data}/{s}.jsonl" for s in ("train", "val", "test"))]


# -- ceilings on constructed features with a known answer --------------------------------------------------------
def test_student_ceiling_known_answer():
    e = torch.eye(4)
    # en: one vector per concept; de: the same vectors (perfect); fr: concepts 0 and 1 swapped (half right).
    feats = torch.cat([e, e, e[[1, 0, 2, 3]]])
    langs = ["en"] * 4 + ["de"] * 4 + ["fr"] * 4
    concepts = ["a", "b", "c", "d"] * 3
    ceiling = student_ceiling(feats, langs, concepts, pivot="en")
    assert {lang: m["R@1"] for lang, m in ceiling.items()} == {"en": 1.0, "de": 1.0, "fr": 0.5}
    assert ceiling["fr"]["num_queries"] == 4
    # A concept the pivot lacks is dropped, not counted as a miss.
    extra = student_ceiling(torch.cat([feats, torch.ones(1, 4)]), langs + ["de"], concepts + ["zzz"])
    assert extra["de"]["R@1"] == 1.0 and extra["de"]["num_queries"] == 4
    rows = ceiling_rows({"en": 0.9, "de": 0.5, "fr": 0.25}, {lang: m["R@1"] for lang, m in ceiling.items()})
    assert rows["de"] == {"recipe": 0.5, "ceiling": 1.0, "of_ceiling": 0.5} and rows["fr"]["of_ceiling"] == 0.5
    assert rows["mean"]["recipe"] == pytest.approx(0.55) and rows["mean"]["ceiling"] == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError, match="no row in the pivot language 'en'"):
        student_ceiling(feats[4:], langs[4:], concepts[4:])


def test_report_mean_row_pooled_note_and_ceiling_table(tmp_path):
    retrieval = {
        "de": {"s->t": {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "MRR": 0.6, "medR": 2.0}},
        "fr": {"s->t": {"R@1": 0.25, "R@5": 0.5, "R@10": 1.0, "MRR": 0.4, "medR": 3.0}},
        "all": {"s->t": {"R@1": 0.9, "R@5": 1.0, "R@10": 1.0, "MRR": 0.95, "medR": 1.0}},
    }
    assert _mean_over_languages(retrieval, "s->t")["R@1"] == pytest.approx(0.375)
    ceiling = {"de": {"R@1": 1.0}, "fr": {"R@1": 0.5}}
    results = {
        "retrieval": retrieval,
        "pooled": {"s->t": {"queries": 4, "gallery": 24, "positives_per_query": 12.0, "gallery_languages": 12}},
        "ceilings": {"student": {"encoder": "USE-m", "pivot": "en", "ceiling": ceiling, "against": {
            "student(L)->teacher": ceiling_rows({"de": 0.5, "fr": 0.25}, {"de": 1.0, "fr": 0.5})}}},
    }
    md = write_report(results, tmp_path)["report"].read_text()
    assert "| **mean (2 languages)** | **37.5** | **75.0** | **100.0** | **0.500** | – |" in md
    assert "| pooled ¹ | 90.0 |" in md and "12.0 such items on average" in md and "ONE gallery of 24 items" in md
    assert "| de | 100.0 | 50.0 | 0.50 |" in md and "| fr | 50.0 | 25.0 | 0.50 |" in md
    assert "| **mean** | **75.0** | **37.5** | **0.50** |" in md


def test_top_k_examples_and_gallery_plot(tmp_path):
    from mmalign.evaluation.plots import plot_retrieval_examples

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.7, 0.7]])
    ex = top_k_examples(q, g, ["cat", "dog"], ["cat", "dog", "cow"], ["Katze", "Hund"], ["cat", "dog", "cow"], k=2)
    assert [t["item"] for t in ex[0]["top"]] == ["cat", "cow"] and ex[0]["top"][0]["hit"] and not ex[0]["top"][1]["hit"]
    assert ex[1]["rank"] == 1.0 and ex[1]["gallery_size"] == 3
    png = plot_retrieval_examples({"text->image": [dict(e, lang="de") for e in ex]}, tmp_path / "ex.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_general_templates_are_the_default():
    assert DEFAULT_TEMPLATES is GENERAL_TEMPLATES and TEMPLATE_SETS["emoji"] is EMOJI_TEMPLATES
    assert not any("emoji" in t.lower() or "icon" in t.lower() for t in GENERAL_TEMPLATES["en"])
    assert set(GENERAL_TEMPLATES) == set(EMOJI_TEMPLATES)
    assert all(t.count("{}") == 1 for ts in GENERAL_TEMPLATES.values() for t in ts)


# -- the whole command on tiny recipes ----------------------------------------------------------------------------
def test_eval_pivot_report_ceilings_and_no_files_in_cwd(synthetic_data, tmp_path, monkeypatch):
    from mmalign.evaluation.baselines import frozen_features
    from mmalign.evaluation.command import evaluate

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "ev"
    # the offline recipe's trainer logs (TensorBoard / CSV): eval must still write nothing outside --output
    results = evaluate(_recipe_args("uclip_pivot", synthetic_data) + ["--trainer.logger=true", "--output", str(out)])
    assert sorted(os.listdir(cwd)) == [], f"eval wrote into the working directory: {os.listdir(cwd)}"
    assert not any(p.name == "lightning_logs" for p in out.rglob("*"))
    md = (out / "report.md").read_text()
    langs = sorted({json.loads(line)["lang"] for line in open(synthetic_data / "test.jsonl")})
    assert f"**mean ({len(langs)} languages)**" in md and "pooled ¹" in md and "positives" not in md.split("pooled ¹")[0]
    # teacher (English, one item per concept) -> student (every language): several positives per query, said so
    pooled = results["pooled"]["teacher->student"]
    assert pooled["positives_per_query"] == pytest.approx(len(langs)) and pooled["gallery_languages"] == len(langs)
    assert f"{float(len(langs)):.1f} such items on average" in md
    mean = results["retrieval_mean"]["student->teacher"]["R@1"]
    per_lang = [results["retrieval"][lang]["student->teacher"]["R@1"] for lang in langs]
    assert mean == pytest.approx(sum(per_lang) / len(per_lang))
    # The ceiling is the frozen encoder's own L -> en retrieval: recompute it independently from the raw texts.
    assert "## Ceilings" in md
    entry = results["ceilings"]["student"]
    rows = [json.loads(line) for line in open(synthetic_data / "test.jsonl")]
    from mmalign.recipe import load_recipe

    cli = load_recipe(_recipe_args("uclip_pivot", synthetic_data) + ["--trainer.logger=false"])
    enc = cli.model.towers["student"].encoder.eval()
    feats = frozen_features(enc, [r["text"] for r in rows])
    expected = student_ceiling(feats, [r["lang"] for r in rows], [r["concept"] for r in rows], keys=[r["text"] for r in rows])
    assert {k: v["R@1"] for k, v in entry["ceiling"].items()} == pytest.approx({k: v["R@1"] for k, v in expected.items()})
    pair = entry["against"]["student(L)->teacher (the recipe's pair)"]
    for lang in langs:
        assert pair[lang]["recipe"] == results["retrieval"][lang]["student->teacher"]["R@1"]
        assert pair[lang]["ceiling"] == entry["ceiling"][lang]["R@1"]
    assert re.search(r"\| de \| [\d.]+ \| [\d.]+ \| [\d.–]+ \| [\d.]+ \| [\d.–]+ \|", md)
    assert (out / "examples.png").is_file() and "## Retrieval examples" in md and "similarity" not in md


def test_eval_zero_shot_names_tower_pair_and_templates(synthetic_data, tmp_path, monkeypatch):
    from mmalign.evaluation.command import evaluate, evaluation_results
    from mmalign.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ev"
    results = evaluate(_recipe_args("lit_contrastive", synthetic_data) + ["--output", str(out), "--examples", "2"])
    assert os.listdir(tmp_path) == ["ev"]
    z = results["zeroshot"]["text->image"]
    assert z["templates"] == "general" and z["prompts"]["en"] == GENERAL_TEMPLATES["en"]
    md = (out / "report.md").read_text()
    assert "### text -> image (image)" in md and "Prompt templates: **general**" in md and "`a photo of a {}.`" in md
    assert "emoji" not in md.split("## Zero-shot")[1]
    # the emoji set only when asked for
    cli = load_recipe(_recipe_args("lit_contrastive", synthetic_data) + ["--trainer.logger=false"])
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    asked = evaluation_results(cli.model, cli.model.last_eval["collected"], templates="emoji", examples=0)
    assert asked["zeroshot"]["text->image"]["templates"] == "emoji"
    assert asked["zeroshot"]["text->image"]["prompts"]["en"] == EMOJI_TEMPLATES["en"]
    with pytest.raises(ValueError, match="unknown prompt templates 'emojis'"):
        evaluate(_recipe_args("lit_contrastive", synthetic_data) + ["--templates", "emojis", "--output", str(out)])
