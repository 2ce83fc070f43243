"""The ``mmalign`` command line a new user meets: ``--help`` lists every subcommand, configuration mistakes end
in one short message with "did you mean", ``--debug`` keeps the traceback, ``predict`` refuses untrained
projectors, and a tiny fit is quiet and leaves no ``./config.yaml``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.cli.errors import did_you_mean, readable

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs/uclip_pivot.yaml"), "--config", str(ROOT / "configs/tiny/uclip_pivot.yaml")]


def _data(synthetic_data: Path) -> list[str]:
    return [f"--data.init_args.{s}={synthetic_data / f'{s}.jsonl'}" for s in ("train", "val", "test")]


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as err:
        main(argv, readable_errors=True)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    msg = [line for line in lines if "error:" in line]
    assert len(msg) == 1 and len(lines) <= 6, lines  # one message (+ the --help/--debug hint), not a traceback
    assert "--debug" in lines[-1] and "Traceback" not in "\n".join(lines)
    return msg[0]


def test_help_lists_every_subcommand(capsys, monkeypatch):
    import importlib

    cli_main = importlib.import_module("mmalign.cli.main")  # the module (mmalign.cli.main is also the function)
    monkeypatch.setitem(cli_main.TOOLS, "zzz_new_tool", "mmalign.recipe:recipes")  # a tool added later appears
    main(["--help"])
    out = capsys.readouterr().out
    for name in ["fit", "validate", "test", "predict", "eval", *cli_main.TOOLS, *cli_main.ARGV_TOOLS]:
        assert f"\n  {name} " in out, name
    assert "List the shipped recipes" in out  # each tool's one-line summary, read from its docstring
    assert "did you mean 'fit'?" in _error(capsys, ["fitt"])


@pytest.mark.parametrize("extra, expected", [
    (["--data.init_args.batch_sise", "4"], "did you mean 'batch_size'?"),
    (["--trainer.maxx_epochs", "4"], "did you mean '--trainer.max_epochs'"),
    (["--model.init_args.towers.student.init_args.encoder", "encoders.HFTextEncodr"], "did you mean 'encoders.HFTextEncoder'"),
    (["--config", "nowhere/recipe.yaml"], "no such config file: "),
])
def test_parse_mistakes_are_one_line(extra, expected, capsys):
    msg = _error(capsys, ["fit", *TINY, *extra])
    assert expected in msg
    if "nowhere" in extra[-1]:
        assert "(no such directory: " in msg and msg.rstrip().endswith("nowhere)")


def test_yaml_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("trainer:\n  max_epoch: 2\n")
    assert "did you mean 'trainer.max_epochs'" in _error(capsys, ["fit", *TINY, "--config", str(tmp_path / "a.yaml")])
    (tmp_path / "b.yaml").write_text("modle:\n  init_args: {}\n")
    assert "unknown section 'modle'" in _error(capsys, ["fit", *TINY, "--config", str(tmp_path / "b.yaml")])
    (tmp_path / "c.yaml").write_text("model:\n  init_args:\n    towers:\n      student:\n        init_args:\n"
                                     "          projector:\n            init_args: {hiden_dim: 3}\n")
    msg = _error(capsys, ["fit", *TINY, "--config", str(tmp_path / "c.yaml")])
    assert "projectors.MLP has no option 'hiden_dim'; did you mean 'hidden_dim'" in msg


def test_instantiation_mistakes_are_one_line(synthetic_data, capsys):
    msg = _error(capsys, ["fit", *TINY, *_data(synthetic_data), "--model.init_args.objectives.towers=[student,teachr]"])
    assert "tower 'teachr'" in msg and "did you mean 'teacher'?" in msg
    # --trainer.accelerator gpu without a GPU ends in the same branch: see test_readable_messages_of_run_time_mistakes


def test_debug_keeps_the_traceback(synthetic_data, monkeypatch):
    from mmalign.cli.errors import debug_requested

    argv = ["fit", *TINY, *_data(synthetic_data), "--model.init_args.objectives.towers=[student,teachr]"]
    with pytest.raises(ValueError, match="teachr"):
        main([*argv, "--debug"], readable_errors=True)
    args = ["fit", "--debug", "--x"]
    assert debug_requested(args) and args == ["fit", "--x"]
    assert not debug_requested(["fit"])
    monkeypatch.setenv("MMALIGN_DEBUG", "1")
    assert debug_requested(["fit"])


def test_readable_messages_of_run_time_mistakes(tmp_path):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from mmalign.data.manifest import ManifestError

    assert "no GPU is visible" in readable(MisconfigurationException("No supported gpu backend found!"))
    msg = readable(ManifestError("train.jsonl: no rows in language(s) ['english']; the manifest has ['de', 'en']"))
    assert "'english' -> 'en'" in msg
    (tmp_path / "train.jsonl").write_text("")
    msg = readable(FileNotFoundError(2, "No such file or directory", str(tmp_path / "trian.jsonl")))
    assert f"did you mean '{tmp_path / 'train.jsonl'}'" in msg
    assert readable(RuntimeError("size mismatch")) is None  # not a configuration mistake: keeps its traceback
    assert did_you_mean("teachr", ["student", "teacher"]) == "; did you mean 'teacher'?"


def test_predict_without_a_checkpoint_is_refused(synthetic_data, capsys):
    msg = _error(capsys, ["predict", *TINY, *_data(synthetic_data)])
    assert "UNTRAINED" in msg and "--allow_untrained" in msg and "--ckpt_path best" in msg


def test_a_tiny_fit_is_quiet_and_leaves_no_config_in_the_working_directory(synthetic_data, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--trainer.num_sanity_val_steps=0"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *TINY, *_data(synthetic_data), *short])
        # with a logger, the config goes into the run folder, and the logging interval exceeds the epoch
        main(["fit", *TINY, *_data(synthetic_data), *short, "--trainer.logger=true", "--trainer.log_every_n_steps=50"])
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text + "\n".join(str(w.message) for w in caught)
    assert not (tmp_path / "config.yaml").exists()
    assert list(tmp_path.glob("lightning_logs/version_*/config.yaml"))
    for noise in ("litlogger", "tensorboardX", "smaller than the logging interval", "litmodels"):
        assert noise not in text, noise


def test_a_closed_pipe_stops_quietly():
    """`mmalign recipes | head -1`: the reader leaves before the output is written; the command exits without a traceback on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "from mmalign.cli.main import main; main()", "recipes"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the child (still importing) writes its first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
