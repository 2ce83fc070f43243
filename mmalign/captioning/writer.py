"""``predict`` output writer of the captioner (JSONL, one caption per line)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class CaptionWriter(BasePredictionWriter):
    """Writes ``predict`` outputs of a :class:`PrefixCaptioningModule` as JSONL, one caption per line.

    Args:
        output: File to write (``.rankN`` is inserted before the suffix on ranks > 0).
    """

    def __init__(self, output: str = "captions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output = output

    def path(self, trainer: L.Trainer) -> Path:
        path = Path(self.output)
        return path if trainer.global_rank == 0 else path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        with self.path(trainer).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction)
