"""The feature cache reads rows as Arrow columns (mmalign.cache.rowtable): a table source and the same rows as a
list of dicts give the same cache, and the reader serves the same batches either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from encoders.base import Encoder, EncoderOutput, Modality  # noqa: E402
from mmalign.cache import CachedSplit, write_split  # noqa: E402
from mmalign.cache.reader import cached_row_ids  # noqa: E402
from mmalign.cache.rowtable import RowTable, StringColumn  # noqa: E402
from mmalign.data.sources import open_source  # noqa: E402
from mmalign.training.towers import Tower  # noqa: E402


class _Lengths(Encoder):
    modality = Modality.TEXT
    output_dim = 4
    has_tokens = False

    def __init__(self) -> None:
        super().__init__()
        self.freeze()

    def preprocess(self, items):
        return {"x": torch.tensor([[len(t), t.count("a"), t.count(" "), 1.0] for t in items])}

    def encode(self, inputs):
        return EncoderOutput(pooled=inputs["x"])


def test_table_and_list_rows_give_the_same_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_ARROW_CACHE", str(tmp_path / "arrow"))
    n = 300
    texts = [f"caption {'a' * (i % 7)} {i % 50}" for i in range(n)]  # repeated texts: items shared by rows
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "lang": ["en", "de", "fr"] * (n // 3), "text": texts}),
                   tmp_path / "t.parquet")
    src = open_source(str(tmp_path / "t.parquet"), required_fields=["text"])
    as_list = [dict(r) for r in src.rows]
    assert RowTable.of(src.rows, ["text"]).columns["text"].to_pylist() == texts  # the vectorised path
    towers = {"text": Tower(_Lengths(), "text")}
    a = write_split(src.rows, towers, tmp_path / "a", shard_size=16, progress=False, fingerprint="rows")
    b = write_split(as_list, towers, tmp_path / "b", shard_size=16, progress=False, fingerprint="rows")
    assert a["dataset_fingerprint"] == b["dataset_fingerprint"] and cached_row_ids(tmp_path / "a") == [r["id"] for r in as_list]
    entry = next(iter(a["entries"]))
    rows_a, rows_b = (np.load(tmp_path / d / entry / "rows.npy") for d in "ab")
    assert np.array_equal(rows_a, rows_b) and rows_a.max() + 1 == len(set(texts))
    first = {t: i for i, t in reversed(list(enumerate(texts)))}  # items numbered in first-appearance order
    assert [texts[j] for j in sorted(first.values())] == [texts[int(np.flatnonzero(rows_a == k)[0])] for k in range(rows_a.max() + 1)]
    ds = CachedSplit(tmp_path / "a", src.rows, towers)
    idx = [5, 0, 299, 17]
    batch = ds.__getitems__(idx)
    assert batch["meta"]["id"] == [f"r{i}" for i in idx] and batch["keys"]["text"] == [texts[i] for i in idx]
    assert batch["meta"]["lang"] == [["en", "de", "fr"][i % 3] for i in idx]
    want = _Lengths().preprocess([texts[i] for i in idx])["x"]
    torch.testing.assert_close(batch["features"]["text"]["pooled"].float(), want)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["num_rows"] == n


def test_string_column_buffers_equal_python_strings():
    col = pa.chunked_array([pa.array(["x", None, "ünï", ""]), pa.array(["z" * 40])])
    idx = [4, 1, 2, 0, 3, 2]
    want = [col.to_pylist()[i] for i in idx]
    assert StringColumn(col, objects_up_to=0).take(idx) == want == StringColumn(col).take(idx) == StringColumn(col, True).take(idx)


def test_progress_bar_moves_per_forward_batch(tmp_path, monkeypatch):
    """Issue 19.6: the cache bar advances after every encoder forward batch (here 8 items), not once per shard."""
    import mmalign.cache.writer as writer

    updates: list[int] = []

    class Bar:
        def __init__(self, *a, **k) -> None:
            pass

        def update(self, n: int) -> None:
            updates.append(n)

        def close(self) -> None:
            pass

    monkeypatch.setattr(writer, "tqdm", Bar)
    rows = [{"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"text {i}"} for i in range(40)]
    write_split(rows, {"text": Tower(_Lengths(), "text")}, tmp_path / "c", shard_size=32, batch_size=8, fingerprint="rows")
    assert updates == [8, 8, 8, 8, 8]  # 4 batches of shard 0, 1 of shard 1
