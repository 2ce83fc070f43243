"""``mmalign compare``: one table of several runs/reports, aligned by metric name, best marked; --output files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mmalign.evaluation.compare import compare, read_run

ROOT = Path(__file__).resolve().parents[1]


def _log(root: Path, rows: list[dict]) -> Path:
    """A Lightning CSVLogger folder ``root/lightning_logs/version_0/metrics.csv`` (sparse rows, as Lightning writes)."""
    d = root / "lightning_logs" / "version_0"
    d.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    return d


@pytest.fixture
def fabricated(tmp_path) -> list[Path]:
    a = tmp_path / "seed0"
    _log(a, [{"epoch": 0, "step": 3, "train/loss": 3.0}, {"epoch": 0, "step": 3, "val/loss": 2.5, "val/R@1": 0.25},
             {"epoch": 1, "step": 7, "val/loss": 2.0, "val/R@1": 0.5}])
    b = tmp_path / "seed1"
    _log(b, [{"epoch": 0, "step": 3, "val/loss": 2.2, "val/R@1": 0.3}, {"epoch": 1, "step": 7, "val/loss": 1.5, "val/R@1": 0.375}])
    report = tmp_path / "eval_de"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({"retrieval": {"de": {"text->image": {"R@1": 0.4, "medR": 3.0, "num_queries": 80}}}}))
    return [a, b, report]


def test_table_aligns_metrics_and_marks_the_best(fabricated, capsys):
    text = compare([str(p) for p in fabricated])
    assert text == capsys.readouterr().out.strip()
    lines = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert text.splitlines()[0].split() == ["metric", "seed0", "seed1", "eval_de"]
    assert lines["val/R@1"][1:] == ["0.5000*", "0.3750", "-"]  # last logged values; higher is better
    assert lines["val/loss"][-3:] == ["2.0000", "1.5000*", "-"]  # lower is better for losses
    assert lines["retrieval/de/text->image/medR"][-3:] == ["-", "-", "3"]  # one value: nothing to mark
    assert lines["epoch"][1:] == ["1", "1", "-"] and "*" not in " ".join(lines["retrieval/de/text->image/num_queries"])
    run = read_run(fabricated[0])
    assert run.history["val/R@1"] == [(3.0, 0.25), (7.0, 0.5)]
    with pytest.raises(ValueError, match=r"no metric matches \['nothing\*'\]; metrics: epoch"):
        compare([str(fabricated[0])], metrics="nothing*")
    with pytest.raises(FileNotFoundError, match="no such run or report"):
        read_run(fabricated[0].parent / "typo")
    (fabricated[0].parent / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics.csv"):
        read_run(fabricated[0].parent / "empty")


def test_output_writes_markdown_csv_and_plot(fabricated, tmp_path, capsys):
    # the positional form `mmalign compare A B --metrics ... --output DIR`
    from mmalign.cli.main import main as mmalign_main

    mmalign_main(["compare", str(fabricated[0]), str(fabricated[1]), "--metrics", "val/*", "--output", str(tmp_path / "cmp")])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| val/R@1 | **0.5000** | 0.3750 |" in md and "| val/loss (lower better) | 2.0000 | **1.5000** |" in md
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [(r["metric"], r["best"]) for r in rows] == [("val/R@1", "seed0"), ("val/loss", "seed1")]
    assert float(rows[0]["seed1"]) == 0.375
    from PIL import Image

    png = Image.open(tmp_path / "cmp" / "compare.png")
    assert png.size[0] > 400 and png.size[1] > 300
    assert "compare.png" in capsys.readouterr().out


def test_a_real_tiny_fit_against_a_report(synthetic_data, fabricated, tmp_path, capsys):
    from mmalign.cli import main as mmalign

    run = tmp_path / "fit"
    mmalign(["fit", "--config", str(ROOT / "configs/lit_contrastive.yaml"), "--config", str(ROOT / "configs/tiny/lit_contrastive.yaml"),
             "--data.init_args.train", str(synthetic_data / "train.jsonl"), "--data.init_args.val", str(synthetic_data / "val.jsonl"),
             "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(run),
             "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(run), "--trainer.enable_checkpointing", "true",
             "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/loss",
             "--trainer.callbacks.save_last", "true"])
    capsys.readouterr()
    logged = list(csv.DictReader(next(run.glob("lightning_logs/version_*/metrics.csv")).open()))
    final_loss = float([r for r in logged if r.get("val/loss")][-1]["val/loss"])
    best_loss = min(float(r["val/loss"]) for r in logged if r.get("val/loss"))
    text = compare([str(run), str(fabricated[1])], metrics=["val/loss", "best/*", "epoch"])
    lines = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert lines["epoch"][1:] == ["1", "1"]
    assert abs(float(lines["val/loss"][3].rstrip("*")) - final_loss) < 1e-4  # the fit's last logged value
    assert abs(float(lines["best/val/loss"][3]) - best_loss) < 1e-4  # from last.ckpt's ModelCheckpoint state


def test_tensorboard_logs_are_read(tmp_path):
    """Lightning's default logger writes TensorBoard events, not metrics.csv."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    d = tmp_path / "tb" / "lightning_logs" / "version_2"
    w = SummaryWriter(str(d))
    for step, (r1, loss) in enumerate([(0.1, 3.0), (0.3, 2.0)]):
        w.add_scalar("val/R@1", r1, step * 4)
        w.add_scalar("val/loss", loss, step * 4)
    w.add_scalar("hp_metric", -1, 0)
    w.close()
    run = read_run(tmp_path / "tb")
    assert run.metrics == {"val/R@1": pytest.approx(0.3), "val/loss": 2.0}  # hp_metric (a placeholder) left out
    assert run.history["val/R@1"] == [(0.0, pytest.approx(0.1)), (4.0, pytest.approx(0.3))]
