import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tiny models gain nothing from intra-op threads, and oversubscribed threads on a busy 2-core CI
# machine slow PyTorch down by an order of magnitude; subprocesses (CLI tests) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    from mmalign.datasets.synthetic import build_synthetic_dataset

    return build_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
