"""The exploration notebook runs end to end (offline), so it cannot rot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_explore_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("MMALIGN_NOTEBOOK_DIR", str(tmp_path))  # the kernel inherits it: outputs land here
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    start = time.time()
    client.execute()  # raises CellExecutionError naming the failing cell
    elapsed = time.time() - start

    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert "identical embeddings after reload: True" in text
    assert "text[de] -> image" in text and "speech[es] -> text[es]" in text
    assert images, "the shared-space plot was not displayed"
    assert (tmp_path / "export" / "config.json").is_file() and (tmp_path / "export" / "model.safetensors").is_file()
    assert (tmp_path / "shared_space.png").stat().st_size > 1000
    print(f"notebook executed in {elapsed:.0f} s")
