"""Every shipped YAML parses against the code's signatures; every tiny recipe runs one CPU fast_dev_run."""

from pathlib import Path

import pytest

from mmalign.recipe import MMAlignCLI

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "trainer" not in p.parts)
TINY_CONFIGS = sorted((ROOT / "configs" / "tiny").glob("*.yaml"))


class ParseOnlyCLI(MMAlignCLI):
    """Parses and type-checks a config (class_path/init_args against signatures) without instantiating."""

    def instantiate_classes(self) -> None:
        pass


def _data_args(data_dir: Path) -> list[str]:
    return [f"--data.init_args.{s}={data_dir / f'{s}.jsonl'}" for s in ("train", "val", "test")]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(config):
    cli = ParseOnlyCLI(args=["--config", str(config)], run=False, save_config_callback=None)
    cfg = cli.config
    assert cfg.model.class_path.startswith("mmalign.")
    assert cfg.data.class_path.startswith("mmalign.")


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_recipe_fast_dev_run(config, synthetic_data, tmp_path):
    cli = MMAlignCLI(
        args=["fit", "--config", str(config), "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}",
              *_data_args(synthetic_data)],
        save_config_callback=None,
    )
    assert cli.trainer.state.finished
    logged = cli.trainer.callback_metrics
    assert any(k.startswith("train/") and k.endswith("loss") for k in logged), sorted(logged)
    assert all(v.isfinite() for k, v in logged.items() if k.endswith("loss"))


def test_train_split_can_list_several_manifests(synthetic_data, tmp_path):
    """``--data.init_args.train '[a, b]'`` from the command line: both manifests' rows are trained on."""
    import json

    rows = [json.loads(line) for line in (synthetic_data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        for key in ("image", "audio"):
            if key in r:
                r[key] = str((synthetic_data / r[key]).resolve())
    half = len(rows) // 2
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:half]), encoding="utf-8")
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[half:]), encoding="utf-8")
    cli = MMAlignCLI(
        args=["fit", "--config", str(ROOT / "configs/tiny/sonar_speech.yaml"), "--trainer.fast_dev_run=1",
              f"--trainer.default_root_dir={tmp_path}", *_data_args(synthetic_data), f"--data.init_args.train=[{a}, {b}]"],
        save_config_callback=None,
    )
    assert cli.trainer.state.finished
    train = cli.datamodule.datasets["train"]
    assert [r["id"] for r in train.rows] == [r["id"] for r in rows if r["lang"] in (cli.datamodule.hparams.train_languages or [r["lang"]])]
