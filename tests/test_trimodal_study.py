"""The trimodal study's report names the speech objectives each fit trained with (benchmarks/studies/trimodal.py)."""

from benchmarks.studies.trimodal import speech_objectives


def test_speech_objectives_are_named_with_their_weights():
    objectives = [{"towers": ["image", "text"], "loss": "ClipLoss", "weight": 1.0},
                  {"towers": ["speech", "text"], "loss": "CosineLoss", "weight": 1.0},
                  {"towers": ["text", "speech"], "loss": "ClipLoss", "weight": 0.3}]
    assert speech_objectives(objectives) == "cosine distance + 0.3 x InfoNCE"
    assert speech_objectives([{"towers": ["speech", "text"], "loss": "MyLoss", "weight": 2.0}]) == "2 x MyLoss"


def test_a_report_without_recorded_objectives_says_infonce():  # results written before the field existed
    assert speech_objectives(None) == "InfoNCE"
    assert speech_objectives([{"towers": ["image", "text"], "loss": "ClipLoss", "weight": 1.0}]) == "InfoNCE"


def test_select_variants_change_only_the_weights_they_name():
    from benchmarks.studies.trimodal_select import teacher_overlay

    def summary(overlay):
        return [(o["init_args"]["towers"], o["init_args"]["loss"]["class_path"].rsplit(".", 1)[1],
                 o["init_args"].get("weight", 1.0)) for o in overlay["model"]["init_args"]["objectives"]]

    shipped = summary(teacher_overlay())
    assert shipped[-1] == (["speech", "text"], "ClipLoss", 0.3)
    assert summary(teacher_overlay(infonce_weight=1.0)) == shipped[:-1] + [(["speech", "text"], "ClipLoss", 1.0)]
    assert summary(teacher_overlay(infonce_weight=0)) == shipped[:-1]
    assert summary(teacher_overlay(image_cosine=0.3)) == [shipped[0], (["image", "text"], "CosineLoss", 0.3), *shipped[1:]]


def test_val_at_best_reads_the_scalars_at_the_monitor_maximum(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.studies.trimodal_select import val_at_best

    for version, offset in ((0, 0.5), (1, 0.0)):  # the last version is read
        writer = SummaryWriter(str(tmp_path / "lightning_logs" / f"version_{version}"))
        for step, (monitor, emergent) in enumerate([(0.1, 0.05), (0.3, 0.07), (0.2, 0.09)]):
            writer.add_scalar("val/R@1", monitor + offset, step)
            writer.add_scalar("val/emergent/R@1", emergent, step)
            writer.add_scalar("train/loss", 1.0, step)
        writer.close()
    got = val_at_best(tmp_path)
    assert got["step"] == 1 and abs(got["val/R@1"] - 0.3) < 1e-6 and abs(got["val/emergent/R@1"] - 0.07) < 1e-6
    assert "train/loss" not in got


def test_speech_target_rows_keep_the_clip_language(tmp_path):
    """Extra speech-text rows pair a clip with the concept's name in another language; their ``lang`` stays the
    clip's (a ``language: row`` cascade decodes the clip in it), ``text_lang`` names the target's language."""
    import json

    from benchmarks.studies.trimodal import subset_manifests

    data = tmp_path / "data"
    data.mkdir()
    rows = {"train": [{"id": f"c-{lang}", "concept": "c", "lang": lang, "text": f"name-{lang}", "image": "i.png",
                       **({"audio": f"c_{lang}.wav"} if lang in ("en", "de") else {})} for lang in ("en", "de", "ja")],
            "val": [], "test": []}
    for split, items in rows.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    manifests = subset_manifests(data, tmp_path / "out", speech_concepts=1, val_concepts=1, test_concepts=1,
                                 speech_targets=("ja", "en"))
    train = [json.loads(line) for line in open(manifests["train"], encoding="utf-8")]
    extra = {r["id"]: r for r in train if "-to-" in r["id"]}
    assert set(extra) == {"c-en-to-ja", "c-de-to-ja", "c-de-to-en"}
    assert extra["c-de-to-ja"]["lang"] == "de" and extra["c-de-to-ja"]["text_lang"] == "ja"
    assert extra["c-de-to-ja"]["text"] == "name-ja" and extra["c-de-to-ja"]["audio"].endswith("c_de.wav")
    assert "image" not in extra["c-de-to-ja"]


def test_select_variants_compose_extra_overlays_right_after_the_fused_one(tmp_path):
    import argparse

    from benchmarks.studies.trimodal_select import FUSED, variants

    args = argparse.Namespace(output=str(tmp_path), weights=[0.3], image_cosine=[],
                              after_fused=["configs/offline/anchor_bind_fused_nbest.yaml"])
    got = variants(args)
    assert got["infonce"] == [FUSED, "configs/offline/anchor_bind_fused_nbest.yaml"]
    assert got["teacher-w0.3"][:2] == got["infonce"] and got["teacher-w0.3"][2].endswith("teacher-w0.3.yaml")


def _scaled_model():
    """Towers with identity image/text projectors and a CascadeResidual speech tower whose correction is known."""
    import torch
    from torch import nn

    from projectors import CascadeResidual

    from mmalign.training.towers import Tower as ProductTower

    class Tower(nn.Module):  # the product's projection without an encoder
        center = False
        project = ProductTower.project

        def __init__(self, projector, normalize=True):
            super().__init__()
            self.projector, self.normalize = projector, normalize

    class Identity(nn.Module):  # no parameters, like a frozen anchor's identity head
        def forward(self, features):
            return features.pooled

    torch.manual_seed(0)
    speech = CascadeResidual(6, 4, hidden_dim=8, norm="none", dropout=0.0)
    torch.nn.init.normal_(speech.fc_out.weight)  # a trained correction: not zero any more
    model = nn.Module()
    model.towers = nn.ModuleDict({"speech": Tower(speech), "image": Tower(Identity()), "text": Tower(Identity())})
    return model


def test_project_split_interpolates_between_the_cascade_and_the_trained_tower():
    import torch
    import torch.nn.functional as F

    from benchmarks.studies.trimodal import project_split
    from encoders.base import EncoderOutput

    model = _scaled_model()
    feats = {"speech": torch.randn(5, 6), "image": torch.randn(5, 4), "text": torch.randn(5, 4)}
    present = {"speech": torch.tensor([True, True, False, True, True]), "image": torch.ones(5, dtype=torch.bool),
               "text": torch.ones(5, dtype=torch.bool)}
    tail = feats["speech"][:, -4:]
    with torch.no_grad():
        trained = model.towers["speech"].projector(EncoderOutput(pooled=feats["speech"]))
    full = project_split(model, feats, present, 1.0)
    zero = project_split(model, feats, present, 0.0)
    half = project_split(model, feats, present, 0.5)
    rows = present["speech"]
    assert torch.allclose(full["speech"][rows], F.normalize(trained, dim=-1)[rows], atol=1e-6)
    assert torch.allclose(zero["speech"][rows], F.normalize(tail, dim=-1)[rows], atol=1e-6)  # the untrained cascade
    assert torch.allclose(half["speech"][rows], F.normalize(tail + 0.5 * (trained - tail), dim=-1)[rows], atol=1e-6)
    assert not zero["speech"][~rows].any()  # absent rows stay zero
    assert torch.allclose(half["image"], F.normalize(feats["image"], dim=-1))  # only the speech tower is scaled


def test_choose_scale_picks_the_best_val_emergent_scale_and_prefers_the_trained_tower_on_ties():
    import torch

    from benchmarks.studies.trimodal import choose_scale

    model = _scaled_model()
    n = 6
    image = torch.eye(4)[[0, 1, 2, 3, 0, 1]] + 0.01 * torch.randn(n, 4)
    # the speech features' tail (the cascade) is the image embedding: scale 0 retrieves every concept
    speech = torch.cat([torch.randn(n, 2), image], dim=1)
    rows = [{"lang": "en", "concept": c} for c in (0, 1, 2, 3, 0, 1)]
    ones = torch.ones(n, dtype=torch.bool)
    val = (rows, {"speech": speech, "image": image, "text": image}, {"speech": ones, "image": ones, "text": ones})
    with torch.no_grad():
        model.towers["speech"].projector.fc_out.weight.mul_(100)  # a correction that destroys the ranking
    chosen, scores = choose_scale(model, val, ["en"])
    assert scores["0"] == 1.0 and chosen == 0.0 and scores["1"] < 1.0
    with torch.no_grad():
        model.towers["speech"].projector.fc_out.weight.zero_()  # no correction: every scale ties, 1.0 is kept
    chosen, scores = choose_scale(model, val, ["en"])
    assert chosen == 1.0 and set(scores.values()) == {1.0}


def test_repeated_overlay_flags_keep_every_overlay_in_order():
    """The reports print one ``--overlay`` flag per overlay: run as written, the command must compose all of them."""
    from benchmarks.studies.trimodal import parser

    args = parser().parse_args(["--overlay", "a.yaml", "--overlay", "b.yaml", "c.yaml", "--overlay", "d.yaml"])
    assert args.overlay == ["a.yaml", "b.yaml", "c.yaml", "d.yaml"]
    assert parser().parse_args([]).overlay == []


def _fake_result(reverse=True, scaled=True):
    from benchmarks.studies.trimodal import DIRECTIONS, HEARD, UNHEARD

    dirs = DIRECTIONS if reverse else DIRECTIONS[:3]
    value = {"text->image": 0.2, "image->text": 0.3, "speech->image": 0.08, "image->speech": 0.17, "speech->text": 0.5}

    def tab(scale=1.0):
        return {d: {lang: {"R@1": value[d] * (scale if "speech" in d else 1.0), "queries": 275, "gallery": 275}
                    for lang in HEARD + UNHEARD} for d in dirs}

    seed = {"seed": 0, "recipe": tab(), "least_squares": tab(0.5), "cascade": tab(0.9), "ridge_lambda": {},
            "objectives": [{"towers": ["speech", "text"], "loss": "CosineLoss", "weight": 1.0}]}
    if scaled:
        seed |= {"scaled": tab(1.1), "correction_scale": {"chosen": 0.5, "val_speech->image": {"0.5": 0.1, "1": 0.09}},
                 "centred": tab(1.25), "centring_val_speech->image": {"plain": 0.075, "centred": 0.088}}
    return {"command": "python -m benchmarks.studies.trimodal", "seeds": [seed], "seconds": 1, "train_rows": 10,
            "train_speech_rows": 5, "overlay": [], "speech_targets": []}


def test_report_reads_both_directions_and_the_val_chosen_correction_scale(tmp_path):
    from benchmarks.studies.trimodal import write_markdown

    write_markdown(_fake_result(), tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    # one direction: 8 / 20 = 0.40 (goal not reached); both: (8 + 17) / (20 + 30) = 0.50 (reached)
    assert "| en | heard | 0.4 | 20.0 | 50.0 | 8.0 |" in text
    assert "| en | 30.0 | 17.0 | 0.50 |" in text
    assert "text->image in en/de/es: **not reached** (both directions, speech<->image >= 0.5 x image<->text: **reached**)" in text
    assert "chosen: 0.5" in text and "| en | 55.0 | 8.8 | 0.44 |" in text  # scaled speech->text / speech->image / ratio
    # centred: speech directions x 1.25 in the fake; ratio 10 / 20
    assert "plain / centred, per seed: 7.5 / 8.8." in text
    assert "| en | 20.0 / 20.0 | 50.0 / 62.5 | 8.0 / 10.0 | 17.0 / 21.3 | 0.50 |" in text


def test_report_of_an_older_run_without_reverse_directions_or_scales(tmp_path):
    from benchmarks.studies.trimodal import write_markdown

    write_markdown(_fake_result(reverse=False, scaled=False), tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "Both directions" not in text and "chosen:" not in text and "both directions" not in text
    assert "centred" not in text


def test_centre_removes_each_towers_reference_mean_and_keeps_absent_rows_zero():
    import torch
    import torch.nn.functional as F

    from benchmarks.studies.trimodal import centre

    torch.manual_seed(0)
    ref = {"speech": torch.randn(6, 3) + 5, "image": torch.randn(6, 3) - 2}
    ref_present = {"speech": torch.tensor([True] * 4 + [False] * 2), "image": torch.ones(6, dtype=torch.bool)}
    x = {"speech": torch.randn(4, 3), "image": torch.randn(4, 3)}
    present = {"speech": torch.tensor([True, False, True, True]), "image": torch.ones(4, dtype=torch.bool)}
    out = centre(x, present, ref, ref_present)
    want = F.normalize(x["speech"] - ref["speech"][:4].mean(0), dim=-1)  # only the present reference rows count
    assert torch.allclose(out["speech"][present["speech"]], want[present["speech"]], atol=1e-6)
    assert not out["speech"][1].any()
    assert torch.allclose(out["image"], F.normalize(x["image"] - ref["image"].mean(0), dim=-1), atol=1e-6)


def test_centre_by_language_removes_each_languages_offset_and_falls_back_to_the_tower_mean():
    import torch
    import torch.nn.functional as F

    from benchmarks.studies.trimodal import centre_by_language

    torch.manual_seed(0)
    ref_rows = [{"lang": l} for l in ["en"] * 6 + ["de"] * 6]
    offset = {"en": torch.tensor([3.0, 0, 0, 0]), "de": torch.tensor([0, 3.0, 0, 0])}
    ref_text = torch.stack([offset[r["lang"]] for r in ref_rows]) + 0.1 * torch.randn(12, 4)
    ref = {"text": ref_text, "image": torch.randn(12, 4) + 2}
    ref_present = {"text": torch.ones(12, dtype=torch.bool), "image": torch.ones(12, dtype=torch.bool)}
    rows = [{"lang": "en"}, {"lang": "de"}, {"lang": "fr"}]
    x = torch.stack([offset["en"], offset["de"], torch.tensor([1.0, 1, 1, 1])])
    embeds = {"text": x, "image": torch.randn(3, 4)}
    present = {"text": torch.tensor([True, True, True]), "image": torch.tensor([True, False, True])}
    out = centre_by_language(embeds, present, rows, ref, ref_present, ref_rows)
    en_mean, de_mean = ref_text[:6].mean(0), ref_text[6:].mean(0)
    torch.testing.assert_close(out["text"][0], F.normalize(x[0] - en_mean, dim=0))
    torch.testing.assert_close(out["text"][1], F.normalize(x[1] - de_mean, dim=0))
    torch.testing.assert_close(out["text"][2], F.normalize(x[2] - ref_text.mean(0), dim=0))  # fr: the tower's mean
    torch.testing.assert_close(out["image"][0], F.normalize(embeds["image"][0] - ref["image"].mean(0), dim=0))
    assert out["image"][1].abs().sum() == 0  # absent rows stay zero
