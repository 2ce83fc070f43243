from mmalign.data.collate import TowerCollator
from mmalign.data.datamodule import AlignmentDataModule
from mmalign.data.manifest import ManifestDataset, ManifestError, read_manifest
from mmalign.data.synthetic import build_synthetic_dataset

__all__ = ["AlignmentDataModule", "ManifestDataset", "ManifestError", "TowerCollator", "build_synthetic_dataset", "read_manifest"]
