"""Cache format 2: the split's row ids live in two mapped arrays (not a per-row JSON list), are checked as untrusted
input, and are compared with the dataset exactly; format-1 caches ask for a re-run that re-encodes nothing; unique items
found by 64-bit hashes are compared exactly (a forced collision keeps two values apart)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")

from mmalign.cache import CacheError, CachedSplit, write_split  # noqa: E402
from mmalign.cache.format import ROW_IDS_DATA, ROW_IDS_OFFSETS, rows_fingerprint  # noqa: E402
from mmalign.cache.reader import cached_row_ids  # noqa: E402
from mmalign.cache.rowtable import RowTable  # noqa: E402
from mmalign.training.towers import Tower  # noqa: E402
from tests.test_cache_columns import _Lengths  # noqa: E402  (the same cheap text encoder)


def _rows(n: int = 40) -> list[dict]:
    return [{"id": f"r{i}", "concept": f"c{i}", "lang": "en", "text": f"caption {'a' * (i % 5)} {i % 13}"} for i in range(n)]


@pytest.fixture
def towers():
    return {"text": Tower(_Lengths(), "text")}


@pytest.fixture
def split(tmp_path, towers):
    path = tmp_path / "cache" / "val"
    assert write_split(_rows(), towers, path, shard_size=8, progress=False, fingerprint="rows") is not None
    return path


def test_manifest_holds_no_per_row_list(split, towers):
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["format"] == 2 and "row_ids" not in manifest
    assert manifest["num_rows"] == 40 and manifest["row_id_bytes"] == sum(len(f"r{i}") for i in range(40))
    assert cached_row_ids(split) == [r["id"] for r in _rows()]
    assert manifest["rows_fingerprint"] == rows_fingerprint([r["id"] for r in _rows()])
    # a bigger split: the manifest does not grow with the rows (nothing per row in the JSON)
    small, big = split.parent / "small", split.parent / "big"
    for path, n in ((small, 40), (big, 4000)):  # one shard each
        write_split(_rows(n), towers, path, shard_size=100, progress=False, fingerprint="rows")
    assert abs((big / "manifest.json").stat().st_size - (small / "manifest.json").stat().st_size) < 40
    ds = CachedSplit(split, _rows(), towers)
    assert ds.__getitems__([3, 0])["meta"]["id"] == ["r3", "r0"]


def _write_ids(split, ids: list[bytes]) -> None:
    data = b"".join(ids)
    np.save(split / ROW_IDS_DATA, np.frombuffer(data, dtype=np.uint8))
    np.save(split / ROW_IDS_OFFSETS, np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64))


def _forged_count(split, m):
    """Manifest and header agree on 10^12 ids; the file holds a few: refused before anything is mapped."""
    m["num_rows"] = 10**12
    with open(split / ROW_IDS_OFFSETS, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**12 + 1,)})
        f.write(b"\0" * 64)


def _outside(split, m):
    outside = split.parent.parent / "elsewhere.npy"
    shutil.move(split / ROW_IDS_DATA, outside)
    (split / ROW_IDS_DATA).symlink_to(outside)


ids40 = [f"r{i}".encode() for i in range(40)]
TAMPER = {
    "missing": (lambda s, m: (s / ROW_IDS_OFFSETS).unlink(), r"row ids \(row_ids.offsets.npy\): .*row_ids.offsets.npy is missing"),
    "duplicate": (lambda s, m: _write_ids(s, [b"r0"] + ids40[:1] + ids40[2:]), r"row ids: id 'r0' appears twice"),
    "not-utf8": (lambda s, m: _write_ids(s, [b"r\xff"] + ids40[1:]), r"row_ids.utf8.npy does not hold valid ids"),
    "decreasing": (lambda s, m: np.save(s / ROW_IDS_OFFSETS, np.array([0, 5, 2] + list(range(6, 43)) + [m["row_id_bytes"]], np.int64)),
                   r"row_ids.offsets.npy decreases at row 1"),
    "short-bytes": (lambda s, m: m.update(row_id_bytes=m["row_id_bytes"] + 1), r"row_ids.utf8.npy: shape \(\d+,\) uint8, the manifest says"),
    "object-dtype": (lambda s, m: np.save(s / ROW_IDS_DATA, np.array(["r"] * m["row_id_bytes"], dtype=object), allow_pickle=True),
                     r"row_ids.utf8.npy holds dtype object"),
    "forged-count": (_forged_count, r"row_ids.offsets.npy holds \d+ bytes, its header needs"),
    "symlink-outside": (_outside, r"row_ids.utf8.npy resolves to .*elsewhere.npy, outside the cache folder"),
    "wrong-type": (lambda s, m: m.update(row_id_bytes="7"), r"manifest.json.row_id_bytes: expected int, got str"),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_tampered_row_ids_refused(kind, split, towers):
    m = json.loads((split / "manifest.json").read_text())
    tamper, fragment = TAMPER[kind]
    tamper(split, m)
    (split / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=fragment):
        CachedSplit(split, _rows(), towers)


def test_stale_cache_names_the_first_differing_row(split, towers):
    rows = _rows()
    rows[5] = {**rows[5], "id": "renamed"}
    with pytest.raises(CacheError, match=r"1 cached ids are gone \(e.g. \['r5'\]\); 1 ids are new \(e.g. \['renamed'\]\); "
                                         r"first differing row 5: cached id 'r5', now 'renamed'"):
        CachedSplit(split, rows, towers)
    swapped = _rows()
    swapped[7], swapped[9] = swapped[9], swapped[7]
    with pytest.raises(CacheError, match=r"same ids in another order; first differing row 7: cached id 'r7', now 'r9'"):
        CachedSplit(split, swapped, towers)
    with pytest.raises(CacheError, match=r"the cache has 40 rows, the dataset 39; 1 cached ids are gone .*first differing row 39: "
                                         r"cached id 'r39', now \(no row\)"):
        CachedSplit(split, _rows()[:39], towers)


def test_format_1_cache_asks_for_a_rerun_that_reencodes_nothing(split, towers):
    m = json.loads((split / "manifest.json").read_text())
    m.update(format=1, row_ids=[r["id"] for r in _rows()])
    del m["row_id_bytes"]
    (split / "manifest.json").write_text(json.dumps(m))
    for name in (ROW_IDS_OFFSETS, ROW_IDS_DATA):
        (split / name).unlink()
    with pytest.raises(CacheError, match=r"cache format 1 .* re-run `mmalign cache` .*nothing is re-encoded"):
        CachedSplit(split, _rows(), towers)
    encoded: list = []
    write_split(_rows(), towers, split, shard_size=8, progress=False, fingerprint="rows", on_shard=lambda e, k: encoded.append(k))
    assert encoded == [] and json.loads((split / "manifest.json").read_text())["format"] == 2
    assert CachedSplit(split, _rows(), towers).__getitems__([1])["meta"]["id"] == ["r1"]


def test_hash_collisions_never_merge_two_items(monkeypatch, tmp_path, towers):
    """Every text hashes to the same 64 bits: items still follow the exact values (first-appearance order)."""
    from mmalign.data.sources import columns

    rows = _rows()
    texts = [r["text"] for r in rows]
    honest = RowTable.of(rows, ["text"]).unique_index("text")
    monkeypatch.setattr(columns, "hash_strings", lambda col: np.zeros(len(col), dtype=np.uint64))
    first, index = RowTable.of(rows, ["text"]).unique_index("text")
    assert np.array_equal(first, honest[0]) and np.array_equal(index, honest[1])
    assert len(first) == len(set(texts)) and [texts[i] for i in first] == list(dict.fromkeys(texts))
    assert all(texts[first[index[i]]] == texts[i] for i in range(len(rows)))
    # non-string values (kept as Python objects) are compared exactly as well
    import hashlib

    real_sha1 = hashlib.sha1
    objects = RowTable({"id": pa.array([r["id"] for r in rows])}, {"text": [{"v": t} for t in texts]})
    monkeypatch.setattr(hashlib, "sha1", lambda b: real_sha1(b"same"))
    first, index = objects.unique_index("text")
    assert len(first) == len(set(texts)) and all(texts[first[index[i]]] == texts[i] for i in range(len(rows)))
    monkeypatch.setattr(hashlib, "sha1", real_sha1)
    # and the cache written under the collision serves each row its own features
    monkeypatch.setattr(columns, "hash_strings", lambda col: np.zeros(len(col), dtype=np.uint64))
    write_split(rows, towers, tmp_path / "c", shard_size=8, progress=False, fingerprint="rows")
    got = CachedSplit(tmp_path / "c", rows, towers, verify=False).__getitems__(list(range(len(rows))))
    torch.testing.assert_close(got["features"]["text"]["pooled"].float(), _Lengths().preprocess(texts)["x"])
