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


class _Picky(_Lengths):
    """Refuses any text holding "BAD" (a batch with one fails as a whole; the collator then finds the item)."""

    def preprocess(self, items):
        if any("BAD" in t for t in items):
            raise ValueError("cannot read BAD")
        return super().preprocess(items)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_text_items_batched_directly_as_through_the_collator(policy, tmp_path, monkeypatch):
    """Text items are preprocessed a batch at a time in the writer's process (no row dict, no DataLoader per item); a
    batch that fails goes through the collator: the same features, skipped rows and errors as the collator path."""
    import mmalign.cache.encode as encode
    from mmalign.data.policy import BadInputError

    rows = [{"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": "BAD one" if i == 13 else f"t {'a' * (i % 5)} {i}"}
            for i in range(40)]
    calls = []

    def via_collator(self, labels, values):
        calls.append(len(values))
        return self(list(zip(labels, values)))

    def write(name):
        return write_split(rows, {"text": Tower(_Picky(), "text")}, tmp_path / name, shard_size=16, batch_size=8,
                           progress=False, fingerprint="rows", on_error=policy)

    if policy == "error":
        with pytest.raises(BadInputError) as direct:
            write("a")
        monkeypatch.setattr(encode.ItemCollate, "direct_batch", via_collator)
        with pytest.raises(BadInputError) as collated:
            write("b")
        assert str(direct.value) == str(collated.value) and direct.value.item_id == "r13" and direct.value.reason == "bad text"
        return
    a = write("a")
    monkeypatch.setattr(encode.ItemCollate, "direct_batch", via_collator)
    b = write("b")
    assert calls and a == b and a["skipped_rows"].keys() == {"r13"}
    entry = next(iter(a["entries"]))
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        assert np.array_equal(np.load(tmp_path / "a" / entry / f"{shard}.pooled.npy"), np.load(tmp_path / "b" / entry / f"{shard}.pooled.npy"))
