"""An overlay naming only some towers (``towers.speech`` without ``towers.text``) would drop the others when composed
(jsonargparse replaces a ``dict[str, Tower]`` mapping): the CLI refuses it with a message naming the file, the dropped
towers and the fix; empty entries (``text: {}``) keep towers as the earlier file defines them."""

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
