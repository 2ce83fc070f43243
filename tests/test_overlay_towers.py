"""An overlay naming only some towers (``towers.speech`` without ``towers.text``) would drop the others when composed
(jsonargparse replaces a ``dict[str, Tower]`` mapping): the CLI refuses it with a message naming the file, the dropped
towers and the fix; empty entries (``text: {}``) keep towers as the earlier file defines them.
How overlays compose otherwise (README.md, "as several --config files compose") is checked in the last test."""

from __future__ import annotations

import pytest

from mmalign.recipe import load_config, recipe_files

SPEECH_ONLY = """\
model:
  init_args:
    towers:
      speech:
        init_args:
          projector:
            init_args: {num_queries: 2, num_heads: 2}
"""


def test_an_overlay_naming_some_towers_is_refused(tmp_path):
    overlay = tmp_path / "speech_only.yaml"
    overlay.write_text(SPEECH_ONLY)
    with pytest.raises(SystemExit, match=r"(?s)speech_only\.yaml: model\.init_args\.towers names \['speech'\] but not "
                                         r"\['text', 'image'\].*would be\s+dropped.*text: \{\}"):
        load_config([*recipe_files("anchor_bind", variant="tiny"), overlay])


def test_empty_entries_keep_the_towers_as_defined(tmp_path):
    overlay = tmp_path / "speech_kept.yaml"
    overlay.write_text(SPEECH_ONLY + "      text: {}\n      image: {}\n")
    towers = load_config([*recipe_files("anchor_bind", variant="tiny"), overlay])["model"]["init_args"]["towers"]
    assert sorted(towers) == ["image", "speech", "text"]
    assert towers["text"]["init_args"]["encoder"]["init_args"]["model_name_or_path"] == "tiny:bert-text"
    assert towers["speech"]["init_args"]["projector"]["init_args"]["num_queries"] == 2


def test_how_overlays_compose(tmp_path):
    """What README.md says of several ``--config`` files, checked: ``class_path``/``init_args`` sections merge key by
    key, lists (``objectives``, ``callbacks``) and plain mappings (a data source spec) are replaced, and ``towers``
    keeps the towers the later file names, each merged with its earlier definition."""
    first = tmp_path / "first.yaml"  # two callbacks, and a source spec given as a mapping
    first.write_text("trainer:\n  callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint}, "
                     "{class_path: lightning.pytorch.callbacks.LearningRateMonitor}]\n"
                     "data:\n  init_args:\n    train: {path: data/wide.csv, root: images, fields: {image: file_name, text: caption}}\n")
    second = tmp_path / "second.yaml"
    second.write_text("""\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
model:
  init_args:
    towers:
      image: {}
      text:
        init_args:
          projector:
            init_args: {num_blocks: 1}
    objectives:
      - class_path: mmalign.Objective
        init_args:
          towers: [text, image]
          loss: {class_path: mmalign.SigLipLoss}
data:
  init_args:
    train: {path: data/other.csv, fields: {text: caption}}
""")
    base = load_config(recipe_files("lit_contrastive", variant="tiny"))
    got = load_config([*recipe_files("lit_contrastive", variant="tiny"), first, second])
    towers, text = got["model"]["init_args"]["towers"], got["model"]["init_args"]["towers"]["text"]["init_args"]
    # init_args merge: the overlay's num_blocks beside the recipe's dropout, the encoder of the tiny overlay kept
    assert text["projector"]["init_args"]["num_blocks"] == 1
    assert text["projector"]["init_args"]["dropout"] == base["model"]["init_args"]["towers"]["text"]["init_args"]["projector"]["init_args"]["dropout"]
    assert text["encoder"]["init_args"]["model_name_or_path"] == "tiny:xlmr-text"
    assert towers["image"] == base["model"]["init_args"]["towers"]["image"]  # `image: {}` keeps it as defined
    # lists replaced: one objective, the overlay's (not the recipe's and the overlay's); one callback, not three
    assert [o["init_args"]["towers"] for o in got["model"]["init_args"]["objectives"]] == [["text", "image"]]
    assert got["model"]["init_args"]["objectives"][0]["init_args"]["loss"]["class_path"].endswith("SigLipLoss")
    assert [c["class_path"] for c in got["trainer"]["callbacks"]] == ["lightning.pytorch.callbacks.LearningRateMonitor"]
    # a plain mapping replaced whole: no `root` or `fields.image` left over from the first file
    assert got["data"]["init_args"]["train"] == {"path": "data/other.csv", "fields": {"text": "caption"}}
