"""Plain .jsonl/.csv manifests read vectorised (mmalign.data.sources.manifest_table): the same rows, the same bad-row
verdicts and messages as the row-by-row reader (ManifestDataset), line numbers right (blank lines, quoted newlines),
and files only the row reader reads exactly handed to it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from mmalign.data.manifest import ManifestDataset, ManifestError, ManifestRowError  # noqa: E402
from mmalign.data.sources import open_source  # noqa: E402
from mmalign.data.sources.manifest_table import ManifestTableSource  # noqa: E402


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_ARROW_CACHE", str(tmp_path / "arrow"))


def _vectorised(monkeypatch, on: bool) -> None:
    monkeypatch.setenv("MMALIGN_MANIFEST_TABLE_BYTES", "0" if on else str(1 << 40))


def _rows(root: Path) -> list[dict | str]:
    (root / "img").mkdir(exist_ok=True)
    for i in range(4):
        (root / "img" / f"{i}.jpg").write_bytes(b"x")
    return [
        {"id": "a", "concept": "dog", "lang": "en", "text": "a dog", "image": "img/0.jpg"},
        {"id": "b", "concept": "dog", "lang": "de", "text": "ein Hund", "image": "img/0.jpg", "extra": 3},
        "",  # a blank line: line numbers must count it
        {"lang": "fr", "text": "un chat", "image": "img/1.jpg"},  # no id: <stem>-<i>
        {"id": "a", "lang": "en", "text": "again", "image": "img/2.jpg"},  # duplicate id
        {"id": "c", "lang": "english", "text": "x", "image": "img/2.jpg"},  # unknown language (did you mean)
        {"id": "d", "lang": "en", "text": " \t ", "image": "img/3.jpg"},  # empty text
        {"id": "e", "lang": "de", "image": "img/3.jpg"},  # missing text
        {"id": "f", "lang": "en", "text": "no file", "image": "img/nope.jpg"},  # missing file
        {"id": "g", "lang": "es", "text": " ", "image": "img/3.jpg"},  # empty text in a language filtered away
    ]


def _write(root: Path, kind: str, rows: list) -> Path:
    path = root / f"m.{kind}"
    if kind == "jsonl":
        path.write_text("".join((json.dumps(r) if r else "") + "\n" for r in rows))
    else:
        cols = list(dict.fromkeys(k for r in rows if r for k in r))
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow([r.get(c, "") for c in cols] if r else [])
    return path


def _read(monkeypatch, path: Path, on: bool, **kw):
    _vectorised(monkeypatch, on)
    try:
        src = open_source(str(path), **kw)
    except ManifestRowError as e:
        return type(e).__name__, e.item_id, e.field, e.reason, str(e)
    return src, [dict(src[i]) for i in range(len(src))], src.report.as_dict(), src.report.examples


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("langs", [None, ["en", "de", "fr"]])
def test_same_rows_and_verdicts_as_the_row_reader(kind, policy, langs, tmp_path, monkeypatch):
    path = _write(tmp_path, kind, _rows(tmp_path))
    kw = {"required_fields": ["text", "image"], "on_error": policy, "languages": langs}
    old, new = _read(monkeypatch, path, False, **kw), _read(monkeypatch, path, True, **kw)
    if policy == "error":
        assert new[:4] == old[:4] == ("ManifestRowError", "a", "id", "duplicate id")
        h = kind == "csv"  # the header line
        assert new[4] == old[4] and f"{path}:{5 + h}: first seen on line {1 + h}" in new[4]
        return
    assert isinstance(old[0], ManifestDataset) and isinstance(new[0], ManifestTableSource)
    assert new[1] == old[1] and new[2] == old[2] and new[3] == old[3]
    want = {"duplicate id": 1, "unknown language": 1, "empty text": 1 + (langs is None), "missing text": 1, "missing file": 1}
    assert new[2] == want


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_errors_name_the_physical_line(kind, tmp_path, monkeypatch):
    rows = _rows(tmp_path)
    path = _write(tmp_path, kind, rows)
    _vectorised(monkeypatch, True)
    header = kind == "csv"
    cases = [  # (rows to keep, the line expected in the error)
        ([0, 1, 2, 3, 5], 5 + header, "lang", "'english' is not an ISO 639-1 code or 'und'; did you mean 'en'?"),
        ([0, 1, 2, 3, 6], 5 + header, "text", "' \\t ' has no visible character"),
        ([0, 1, 2, 3, 7], 5 + header, "text", ""),
        ([0, 2, 8], 3 + header, "image", "no such file"),
    ]
    for keep, line, field, detail in cases:
        path = _write(tmp_path, kind, [rows[i] for i in keep])
        with pytest.raises(ManifestRowError) as e:
            open_source(str(path), required_fields=["text", "image"])
        assert e.value.field == field and f"{path}:{line}" in str(e.value) and detail in str(e.value), str(e.value)


def test_integer_ids_and_extra_values_as_the_row_reader(tmp_path, monkeypatch):
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps({"id": i, "concept": i // 2, "lang": "en", "text": f"t{i}", "score": i / 2,
                                        "meta": {"k": [i]}}) + "\n" for i in range(6)))
    old, new = _read(monkeypatch, path, False), _read(monkeypatch, path, True)
    assert isinstance(new[0], ManifestTableSource) and new[1] == old[1] and new[1][3]["id"] == "3" and new[1][3]["concept"] == "1"


def test_csv_quoted_newlines_keep_line_numbers(tmp_path, monkeypatch):
    path = tmp_path / "q.csv"
    path.write_text('id,lang,text\na,en,"two\nlines"\n\nb,en,"three\nmore\nlines"\nc,xx,bad\n')
    _vectorised(monkeypatch, True)
    src = open_source(str(path), on_error="skip")
    assert isinstance(src, ManifestTableSource) and [src[i]["text"] for i in range(2)] == ["two\nlines", "three\nmore\nlines"]
    with pytest.raises(ManifestRowError, match=rf"{path}:8: 'xx' is not an ISO 639-1"):
        open_source(str(path))
    _vectorised(monkeypatch, False)
    with pytest.raises(ManifestRowError, match=rf"{path}:8: 'xx' is not an ISO 639-1"):
        open_source(str(path))


@pytest.mark.parametrize("content,fragment", [
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y\xff"}\n', r":2: byte 0xff at column 23 is not UTF-8"),
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": \n', r":2: .*Expecting value"),
    (b'{"id": "a", "text": "x"}\n[1, 2]\n', r":2: a row must be a JSON object, got list"),
    (b'{"id": "a", "text": "x"}\n{"id": 2.5, "text": "y"}\n{"id": "c", "text": ["l", "m"]}\n', r"bad text \(.*m.jsonl: expected a string, got list"),
])
def test_files_only_the_row_reader_reads_exactly_go_to_it(content, fragment, tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    _vectorised(monkeypatch, True)
    with pytest.raises((ManifestRowError, ManifestError), match=fragment):
        open_source(str(path), required_fields=["text"])
    src = open_source(str(path), required_fields=["text"], on_error="skip")
    assert isinstance(src, ManifestDataset) and len(src) >= 1


def test_list_of_large_manifests_refuses_an_id_in_two_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text("".join(json.dumps({"id": f"r{i}", "lang": "en", "text": f"t{i}"}) + "\n" for i in range(5)))
    b.write_text("id,lang,text\nx,de,eins\nr3,de,zwei\ny,de,drei\n")
    _vectorised(monkeypatch, True)
    with pytest.raises(ManifestRowError, match=r"item id='r3' field 'id': duplicate id .*b.csv: already in .*a.jsonl"):
        open_source([str(a), str(b)], required_fields=["text"])
    src = open_source([str(a), str(b)], required_fields=["text"], on_error="skip", languages=["de"])
    assert [src[i]["id"] for i in range(len(src))] == ["x", "y"] and src.report.as_dict() == {"duplicate id": 1}
    _vectorised(monkeypatch, False)
    old = open_source([str(a), str(b)], required_fields=["text"], on_error="skip", languages=["de"])
    assert [r["id"] for r in old.rows] == ["x", "y"] and old.report.as_dict() == {"duplicate id": 1}


def test_large_manifest_feeds_the_cache_columns_and_reopens_mapped(tmp_path, monkeypatch):
    """A 20k-row JSONL: opened vectorised, its columns go to the feature cache without row dicts; a second open maps
    the Arrow copy; workers (pickling) reopen it."""
    import pickle

    from mmalign.cache.rowtable import RowTable

    n = 20_000
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "lang": ["en", "de"][i % 2], "text": f"caption {i % 999}"}) + "\n"
                            for i in range(n)))
    _vectorised(monkeypatch, True)
    src = open_source(str(path), required_fields=["text"], languages=["de"])
    assert isinstance(src, ManifestTableSource) and len(src) == n // 2 and src[0] == {"id": "r1", "lang": "de", "text": "caption 1", "concept": "r1"}
    table = RowTable.of(src.rows, ["text"])
    assert table.columns["id"].slice(0, 3).to_pylist() == ["r1", "r3", "r5"]
    first, index = table.unique_index("text")
    assert len(first) == len({f"caption {i % 999}" for i in range(1, n, 2)}) and index.min() == 0
    again = pickle.loads(pickle.dumps(src))
    assert again[len(again) - 1]["id"] == f"r{n - 1}" and np.array_equal(again._index, src._index)


def _small_blocks(monkeypatch, block: int = 256) -> None:
    """Blocks and pieces of a few lines: the multi-block paths of a 10M-row file on a tiny one."""
    from mmalign.data.sources import manifest_table

    monkeypatch.setattr(manifest_table, "_BLOCK", block)


def _no_nulls(value):
    return {k: _no_nulls(v) for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def test_columns_and_types_that_change_after_the_first_block_as_the_row_reader(tmp_path, monkeypatch):
    """A key first seen late, a null column turning string, an int column turning float, a struct gaining a key:
    read piece by piece and unified, the same rows as the row reader (no fallback to it)."""
    rows = [{"id": f"r{i}", "lang": "en", "text": f"t{i}", "score": i, "note": None, "meta": {"a": i}} for i in range(40)]
    rows += [{"id": f"s{i}", "lang": "de", "text": f"u{i}", "score": i + 0.5, "note": f"n{i}", "meta": {"b": "x"},
              "text_en": f"e{i}"} for i in range(40)]
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _small_blocks(monkeypatch)
    old, new = _read(monkeypatch, path, False), _read(monkeypatch, path, True)
    assert isinstance(new[0], ManifestTableSource) and new[0].table.num_rows == 80
    # as in one block: a null value is an absent key, a struct holds the keys of every row (null where absent)
    assert [_no_nulls(r) for r in new[1]] == [_no_nulls(r) for r in old[1]]
    assert new[1][79]["text_en"] == "e39" and new[1][3]["score"] == 3 and new[1][40]["meta"] == {"a": None, "b": "x"}
    assert not list((tmp_path / "arrow").glob("*.tmp*"))  # the spilled pieces are gone


def test_a_type_change_across_blocks_goes_to_the_row_reader(tmp_path, monkeypatch):
    """A string column holding a number in a later block: the row reader reads it (the old whole-file read_json turned
    the number into a string)."""
    rows = [{"id": f"r{i}", "lang": "en", "text": f"t{i}", "tag": "x"} for i in range(40)] + [{"id": "z", "lang": "en", "text": "t", "tag": 5}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _small_blocks(monkeypatch)
    old, new = _read(monkeypatch, path, False), _read(monkeypatch, path, True)
    assert isinstance(new[0], ManifestDataset) and new[1] == old[1] and new[1][-1]["tag"] == 5


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_small_blocks_keep_rows_verdicts_and_line_numbers(kind, tmp_path, monkeypatch):
    """Many small blocks (as a 10M-row file is read) give the rows, verdicts and messages of one block."""
    rows = _rows(tmp_path) * 6
    for k, r in enumerate(rows):
        if r and "id" in r:
            r = rows[k] = dict(r, id=f"{r['id']}{k}")  # unique ids: the bad rows left are the field problems
    path = _write(tmp_path, kind, rows)
    kw = {"required_fields": ["text", "image"], "on_error": "skip"}
    _small_blocks(monkeypatch)
    old, new = _read(monkeypatch, path, False, **kw), _read(monkeypatch, path, True, **kw)
    assert isinstance(new[0], ManifestTableSource) and len(new[0].table.to_batches()) > 3
    assert new[1] == old[1] and new[2] == old[2] and new[3] == old[3]
    kw["on_error"] = "error"
    first_old, first_new = _read(monkeypatch, path, False, **kw), _read(monkeypatch, path, True, **kw)
    assert first_new == first_old and first_new[0] == "ManifestRowError"
