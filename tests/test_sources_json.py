"""The JSONL converter (:func:`mmalign.data.sources.arrow_copies.json_as_arrow`): one parse in line-aligned pieces,
a key or type first seen late unified without a second parse. Checked against Arrow's reader given the whole file as
one block (what every piece size must reproduce) and against ``json.loads`` line by line."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.json as pajson
import pytest

from mmalign.data.sources import arrow_copies
from mmalign.data.sources.base import SourceError

TEXTS = ["plain", "é ü ß", "日本語のキャプション", "emoji 😀🎉", "quote \" and backslash \\", "tab\tnew\nline",
         "nul \u0000 char", "e\u0301 combining", "\u2028 line separator", "", "  spaces  ", "right-to-left עברית"]


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Rows with nested structs and lists, nulls, missing keys, unicode and escapes, and keys first seen late."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"id": f"r{i}", "text": rng.choice(TEXTS) + f" {i}", "lang": rng.choice(["en", "de", "ja", None])}
        if rng.random() < 0.7:  # missing in some rows
            row["score"] = rng.choice([i, None])
        if rng.random() < 0.5:
            row["meta"] = {"src": rng.choice(TEXTS), "n": i, **({"deep": {"k": [i, i + 1]}} if i % 3 else {})}
        if rng.random() < 0.3:
            row["tags"] = [rng.choice(TEXTS) for _ in range(rng.randrange(4))]
        if i > n * 3 // 4:  # first seen late, far beyond the first piece
            row["late"] = f"late {i}"
            row["score"] = i + 0.5  # int -> float late
            if "meta" in row:
                row["meta"]["added"] = True  # a struct gaining a key late
        rows.append(row)
    return rows


def _dump(rows: list[dict], ascii_only: bool) -> str:
    """JSON lines, escaped (``\\uXXXX``, surrogate pairs) or raw UTF-8, with blank lines, no newline at the end."""
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
    lines[5:5] = ["", "   "]
    return "\n".join(lines)


def _convert(path, tmp_path, block: int, threads: bool, validate: bool = False) -> pa.Table:
    out = tmp_path / f"out-{block}-{threads}.arrow"
    tmp = out.with_name(f".{out.name}.tmp")

    def write(batches, schema):
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)

    try:
        arrow_copies.json_as_arrow(path, write, tmp, block, threads, validate)
    finally:  # as the callers do; the spills are the converter's to remove
        assert not list(tmp_path.glob(f"{tmp.name}.*"))
    tmp.rename(out)
    return arrow_copies._map_ipc(out)


def _same(value, expected) -> bool:
    """``value`` (Arrow's) holds ``expected`` (json.loads'): a struct has every row's keys (None where absent)."""
    if isinstance(expected, dict):
        return isinstance(value, dict) and all(_same(value.get(k), v) for k, v in expected.items()) and all(
            v is None for k, v in value.items() if k not in expected)
    if isinstance(expected, list):
        return isinstance(value, list) and len(value) == len(expected) and all(map(_same, value, expected))
    return value == expected and type(value) is type(expected) or (isinstance(expected, int) and isinstance(value, float)
                                                                     and value == expected)


@pytest.mark.parametrize("ascii_only", [True, False])
def test_pieces_read_as_one_block_and_as_json_loads(ascii_only, tmp_path):
    """Every piece size (a few lines to the whole file), threads or not: the table Arrow reads from the whole file as
    one block, and every value json.loads gives (nested, nulls, unicode, escapes, late keys and types)."""
    rows = _rows(400)
    path = tmp_path / "rows.jsonl"
    path.write_text(_dump(rows, ascii_only), encoding="utf-8")
    whole = pajson.read_json(str(path), read_options=pajson.ReadOptions(block_size=path.stat().st_size + 1))
    assert whole.schema.field("score").type == pa.float64() and "late" in whole.column_names
    for block, threads in [(64, False), (64, True), (1000, True), (7919, False), (1 << 20, True)]:
        table = _convert(path, tmp_path, block, threads)
        assert table.schema == whole.schema, block
        assert table.to_pylist() == whole.to_pylist(), block
        if block == 64:
            assert table.column("id").num_chunks > 100  # many pieces and several schemas
    got = table.to_pylist()
    assert len(got) == len(rows) and all(_same(g, r) for g, r in zip(got, rows))
    assert got[-1]["late"] == f"late {len(rows) - 1}" and got[3]["late"] is None


def test_a_line_longer_than_the_piece_and_one_piece_per_line(tmp_path):
    rows = [{"id": "a", "text": "x" * 5000}, {"id": "b", "text": "y"}, {"id": "c", "text": "z" * 300, "n": 1}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for block in (1, 16, 4096):
        assert _convert(path, tmp_path, block, True).to_pylist() == [dict(r, n=r.get("n")) for r in rows]


@pytest.mark.parametrize("bad,line", [('{"id": "x", "text": ', 4), ("[1, 2]", 4), ("not json", 4), ('{"id": 5', 4)])
def test_a_bad_line_is_named(bad, line, tmp_path, monkeypatch):
    """A line that is not a JSON object: the error names its file line (blank lines counted), in any piece."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "t"}\n\n{"id": "b", "text": "u"}\n' + bad + '\n{"id": "c", "text": "v"}\n')
    for block in (8, 40, 1 << 20):
        with pytest.raises(pa.ArrowInvalid, match=rf"^line {line}: "):
            _convert(path, tmp_path, block, block != 40)
    monkeypatch.setenv("MMALIGN_ARROW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SourceError, match=rf"bad.jsonl: cannot be read as a jsonl table \(line {line}: "):
        arrow_copies.text_table_as_arrow(path, "jsonl")
    assert not list((tmp_path / "cache").iterdir())


def test_types_that_do_not_unify_raise_and_strings_not_utf8_with_validate(tmp_path):
    """A string column holding a number in a later piece raises (the manifest reader hands such a file to the row
    reader); bytes that are not UTF-8 pass through pyarrow.json, so ``validate`` refuses them."""
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "tag": "x" if i < 30 else 5}) + "\n" for i in range(40)))
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError), match=r"changed from string to number"):
        _convert(path, tmp_path, 1 << 20, True)  # one piece: Arrow's own message
    for threads in (True, False):  # the first number is on line 31: its line, or its piece's lines, named
        with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError), match=r"^lines? \d+(-\d+)?: ") as e:
            _convert(path, tmp_path, 64, threads)
        span = str(e.value).split(":")[0].split()[1].split("-")
        assert int(span[0]) <= 31 <= int(span[-1]) and int(span[-1]) - int(span[0]) < 3
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    assert _convert(raw, tmp_path, 1 << 20, False).num_rows == 2
    with pytest.raises(pa.ArrowInvalid):
        _convert(raw, tmp_path, 1 << 20, False, validate=True)


def test_an_empty_file_raises(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(pa.ArrowInvalid, match="Empty JSON"):
        _convert(path, tmp_path, 4, True)
