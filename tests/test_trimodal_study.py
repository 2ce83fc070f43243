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
