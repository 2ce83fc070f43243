"""CSV/JSONL tables (``TableSource`` through :func:`~mmalign.data.sources.arrow_copies.text_table_as_arrow`): bytes
that are not UTF-8 raise naming the file and line (as a manifest's do) and leave no copy under a good name; cells that
look like dates or times (``"2024-01-02"``, ``"12:30"``) come back as the exact strings, not timestamps."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pytest

from mmalign.data.sources import arrow_copies
from mmalign.data.sources.base import SourceError
from mmalign.data.sources.table import TableSource

DAYS = ["2024-01-02", "1999-12-31", "2000-02-29"]
STAMPS = ["2024-01-02 10:00:00", "1999-12-31 23:59:59", "2000-02-29T08:00:00"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MMALIGN_ARROW_CACHE", str(folder))
    return folder


def _copies(cache) -> list:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def _rows(src: TableSource) -> list[dict]:
    return [dict(src[i]) for i in range(len(src))]


# -- bytes that are not UTF-8 ------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1 << 20, 64])
def test_jsonl_table_not_utf8_names_file_and_line(block, tmp_path, cache, monkeypatch):
    """A JSONL table with a caption of Latin-1 bytes on line 4 (a blank line counted), in one piece or many."""
    monkeypatch.setattr(arrow_copies, "_TEXT_BLOCK", block)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n\n{"id": "b", "text": "fine"}\n{"id": "c", "text": "caf\xe9"}\n'
                     b'{"id": "d", "text": "last"}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl: cannot be read as a jsonl table \(line 4: bytes that are not UTF-8"):
        TableSource(path, "jsonl", fields={"id": "id", "text": "text"}, lang="en")
    assert _copies(cache) == []  # nothing under a good name, no temporary left


def test_csv_table_not_utf8_names_file_and_line(tmp_path, cache):
    """pyarrow.csv would read the column as binary without a word; the table refuses it, naming line 3."""
    path = tmp_path / "bad.csv"
    path.write_bytes(b"id,text\na,ok\nb,caf\xe9\nc,last\n")
    with pytest.raises(SourceError, match=r"bad\.csv: cannot be read as a csv table \(line 3: bytes that are not UTF-8"):
        TableSource(path, "csv", fields={"id": "id", "text": "text"}, lang="en")
    assert _copies(cache) == []


def test_csv_not_utf8_beyond_the_sniffed_head_and_in_an_extra_column(tmp_path, cache, monkeypatch):
    """Bad bytes after the rows the types are inferred from (small blocks), in a column no field reads: line 41 (the header is line 1)."""
    monkeypatch.setattr(arrow_copies, "_SNIFF", 256)
    monkeypatch.setattr(arrow_copies, "_TEXT_BLOCK", 128)
    lines = [b"id,text,note"] + [b"r%d,t %d,n %d" % (i, i, i) for i in range(60)]
    lines[41 - 1] = b"r39,t 39,\xff\xfe"
    path = tmp_path / "late.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(SourceError, match=r"late\.csv: cannot be read as a csv table \(line 41: bytes that are not UTF-8"):
        TableSource(path, "csv", fields={"id": "id", "text": "text"}, lang="en")
    assert _copies(cache) == []


def test_a_good_table_after_a_bad_one_converts(tmp_path, cache):
    """The failed conversion left nothing that the fixed file (new size/mtime) or a retry could pick up."""
    path = tmp_path / "t.csv"
    path.write_bytes(b"id,text\na,caf\xe9\n")
    with pytest.raises(SourceError, match="line 2"):
        TableSource(path, "csv", lang="fr")
    path.write_bytes("id,text\na,café\n".encode())
    assert _rows(TableSource(path, "csv", lang="fr")) == [{"id": "a", "text": "café", "concept": "a", "lang": "fr"}]
    assert len(_copies(cache)) >= 1 and all(n.endswith(".arrow") or n == "checks" for n in _copies(cache))


# -- strings that look like dates and times ----------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_date_like_text_and_extra_columns_round_trip_exactly(fmt, tmp_path):
    """A text column of dates and extra columns of times and timestamps: the rows give the exact strings (Arrow
    alone infers date32/timestamp, time32, timestamp); a numeric extra column stays a number."""
    path = tmp_path / f"d.{fmt}"
    rows = [{"id": f"r{i}", "text": d, "when": t, "stamp": s, "n": i} for i, (d, t, s) in enumerate(zip(
        DAYS, ["12:30", "08:05:59", "23:59"], STAMPS))]
    if fmt == "csv":
        path.write_text("id,text,when,stamp,n\n" + "".join(f"{r['id']},{r['text']},{r['when']},{r['stamp']},{r['n']}\n"
                                                           for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = TableSource(path, fmt, fields={"id": "id", "text": "text", "when": "when", "stamp": "stamp", "n": "n"},
                      lang="en", required_fields=["text"])
    assert _rows(src) == [dict(r, concept=r["id"], lang="en") for r in rows]
    schema = src.table.schema
    assert [schema.field(c).type for c in ("text", "when", "stamp", "n")] == [pa.string()] * 3 + [pa.int64()]
    again = pickle.loads(pickle.dumps(src))  # a worker reopens the same copy
    assert _rows(again) == _rows(src)


def test_csv_field_columns_keep_the_exact_cell(tmp_path):
    """Columns the fields read are strings in a CSV whatever they look like: id ``007``, caption ``12``."""
    path = tmp_path / "n.csv"
    path.write_text("key,caption,score\n007,12,0.5\n010,2024-01-02,1.5\n")
    src = TableSource(path, "csv", fields={"id": "key", "text": "caption"}, lang="en")
    assert [(r["id"], r["text"]) for r in _rows(src)] == [("007", "12"), ("010", "2024-01-02")]
    default = TableSource(tmp_path / "n.csv", "csv", lang="en")  # no mapping: key/caption are no fields
    assert default.table.column("key").to_pylist() == [7, 10] and default.table.column("score").type == pa.float64()


def test_jsonl_dates_in_late_pieces_nested_and_mixed_unify(tmp_path, monkeypatch):
    """Small pieces: a date-like key first seen late, dates in a list and a struct, and a column with dates in one
    piece and plain strings in another (as timestamps these would not unify) all read as the file's strings."""
    monkeypatch.setattr(arrow_copies, "_TEXT_BLOCK", 64)
    rows = []
    for i in range(30):
        row = {"id": f"r{i}", "text": "2024-01-02" if i < 15 else f"caption {i}", "tags": [DAYS[i % 3], STAMPS[i % 3]],
               "meta": {"at": STAMPS[(i + 1) % 3]}}
        if i >= 25:
            row["late"] = "2024-03-04"
        rows.append(row)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = TableSource(path, "jsonl", lang="en")
    assert src.table.column("id").num_chunks > 5  # many pieces
    got = src.table.to_pylist()
    assert got == [dict(r, late=r.get("late")) for r in rows]
    assert src.table.schema.field("tags").type == pa.list_(pa.string())
