"""DataModule yielding raw batches preprocessed by each tower's encoder inside DataLoader workers."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
from torch.utils.data import DataLoader

from mmalign.data.collate import TowerCollator, tower_fields
from mmalign.data.manifest import ManifestDataset


class AlignmentDataModule(L.LightningDataModule):
    """Train/val/test manifests -> raw batches for an :class:`~mmalign.module.AlignmentModule`.

    The towers (and so the fields and preprocessing) are taken from the model the trainer fits, so a
    recipe's YAML never repeats them.

    Args:
        train: Training manifest (``.jsonl``/``.csv``).
        val: Validation manifest.
        test: Test manifest (defaults to ``val``).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (encoder preprocessing runs there).
        train_languages: Train only on rows in these languages (``["en"]``: English-pivot recipes).
        eval_languages: Evaluate only on rows in these languages (default: all).
        on_missing: ``"error"`` or ``"skip"`` for rows lacking a field a tower reads (skips are counted).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        train_languages: list[str] | None = None,
        eval_languages: list[str] | None = None,
        on_missing: str = "error",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.datasets: dict[str, ManifestDataset] = {}
        self._towers: dict[str, tuple[str, Callable]] | None = None

    def connect(self, module: Any) -> None:
        """Bind the towers whose encoders preprocess the data (done automatically in ``setup``)."""
        self._towers = tower_fields(module)

    def setup(self, stage: str | None = None) -> None:
        if self._towers is None:
            if self.trainer is None or self.trainer.lightning_module is None:
                raise RuntimeError("AlignmentDataModule needs the model's towers: call connect(module) first")
            self.connect(self.trainer.lightning_module)
        fields = sorted({f for f, _ in self._towers.values()})
        hp = self.hparams
        splits = {"train": (hp.train, hp.train_languages), "val": (hp.val, hp.eval_languages),
                  "test": (hp.test or hp.val, hp.eval_languages)}
        for split, (path, langs) in splits.items():
            if path and split not in self.datasets:
                self.datasets[split] = ManifestDataset(path, langs, fields, hp.on_missing)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"no {split} manifest configured (data.init_args.{split})")
        ds = self.datasets[split]
        return DataLoader(
            ds,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(ds) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=TowerCollator(self._towers),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def skipped(self) -> dict[str, dict[str, int]]:
        """Counts of rows skipped under ``on_missing="skip"``, per split and reason."""
        return {s: dict(d.skipped) for s, d in self.datasets.items() if d.skipped}
