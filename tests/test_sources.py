"""Sources behind one interface (mmalign.data.sources): each format on a generated fixture."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from mmalign.data.manifest import ManifestError, ManifestRowError  # noqa: E402
from mmalign.data.sources import SourceError, detect_format, open_source  # noqa: E402


@pytest.fixture(autouse=True)
def _arrow_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_ARROW_CACHE", str(tmp_path / "arrow-cache"))


def _png(path=None, color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _images(tmp_path, n):
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(n):
        _png(tmp_path / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def test_parquet_long_rows_resolve_paths_and_pickle(tmp_path):
    import pickle

    imgs = _images(tmp_path, 3)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "lang": ["en", "de", "en"], "text": ["x", "y", "z"], "image": imgs}),
                   tmp_path / "t.parquet")
    src = open_source(str(tmp_path / "t.parquet"), required_fields=["image", "text"])
    assert len(src) == 3 and src[1]["lang"] == "de" and src[1]["concept"] == "b"
    assert src[0]["image"] == str((tmp_path / "img/0.png").resolve())
    assert src.languages == ["de", "en"]
    again = pickle.loads(pickle.dumps(src))  # DataLoader workers reopen the mapped file
    assert again[2] == src[2]
    en = open_source(str(tmp_path / "t.parquet"), languages=["en"])
    assert [r["id"] for r in en.rows] == ["a", "c"]


def test_wide_table_mapping_several_captions(tmp_path):
    _images(tmp_path, 2)
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table({"file_name": ["0.png", "1.png"], "caption_de": ["ein Hund", ""],
                              "caption_en": ["a dog", "a cat"], "caption_en2": ["dog", None]}), tmp_path / "wide.csv")
    spec = {"path": str(tmp_path / "wide.csv"), "root": "img",
            "fields": {"image": "file_name", "text": {"de": "caption_de", "en": ["caption_en", "caption_en2"]}}}
    rows = list(open_source(spec, required_fields=["image", "text"]))
    assert [(r["lang"], r["text"]) for r in rows] == [("de", "ein Hund"), ("en", "a dog"), ("en", "dog"), ("en", "a cat")]
    assert rows[0]["concept"] == rows[1]["concept"] == rows[2]["concept"] != rows[3]["concept"]
    assert len({r["id"] for r in rows}) == 4
    assert rows[3]["image"].endswith("img/1.png")


def test_list_column_and_yaml_spec(tmp_path):
    _images(tmp_path, 2)
    pq.write_table(pa.table({"image": ["img/0.png", "img/1.png"], "captions": [["a", "b"], ["c"]]}), tmp_path / "l.parquet")
    (tmp_path / "s.yaml").write_text("path: l.parquet\nlang: en\nfields: {image: image, text: captions}\n")
    rows = list(open_source(str(tmp_path / "s.yaml")))
    assert [r["text"] for r in rows] == ["a", "b", "c"] and {r["lang"] for r in rows} == {"en"}


def test_table_bad_rows_follow_policy(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "a", "d"], "lang": ["en", "xx", "en", "en"], "text": ["x", "y", "z", "  "]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ManifestRowError, match=r"id='b'.*'lang'.*unknown language.*bad.parquet row 1"):
        open_source(str(tmp_path / "bad.parquet"), required_fields=["text"])
    src = open_source(str(tmp_path / "bad.parquet"), required_fields=["text"], on_error="skip")
    assert [r["id"] for r in src] == ["a"]
    assert src.skipped == {"unknown language": 1, "duplicate id": 1, "empty text": 1}
    again = open_source(str(tmp_path / "bad.parquet"), required_fields=["text"], on_error="skip")  # checks from the cache
    assert [r["id"] for r in again] == ["a"] and again.skipped == src.skipped
    with pytest.raises(ManifestRowError, match=r"id='b'.*unknown language"):
        open_source(str(tmp_path / "bad.parquet"), required_fields=["text"])


def test_arrow_file_and_hf_folder(tmp_path):
    table = pa.table({"text": ["uno", "dos"], "lang": ["es", "es"]})
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    assert [r["text"] for r in open_source(str(tmp_path / "t.arrow"))] == ["uno", "dos"]
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "lang": ["fr"] * 3}),
                               "test": datasets.Dataset.from_dict({"text": ["d"], "lang": ["fr"]})})
    ds.save_to_disk(str(tmp_path / "hf"))
    assert detect_format(tmp_path / "hf") == "hf"
    assert [r["text"] for r in open_source(str(tmp_path / "hf"))] == ["a", "b", "c"]
    assert [r["text"] for r in open_source({"path": str(tmp_path / "hf"), "split": "test"})] == ["d"]
    ds["train"].save_to_disk(str(tmp_path / "hf1"))
    assert len(open_source(str(tmp_path / "hf1"))) == 3


def test_text_corpus_plain_and_gz(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"hallo welt\n\nzweite\r\n\xff bad\n")
    with pytest.raises(ManifestRowError, match=r"invalid utf-8.*c.txt row 4"):
        open_source({"path": str(tmp_path / "c.txt"), "lang": "de"})
    src = open_source({"path": str(tmp_path / "c.txt"), "lang": "de"}, on_error="skip", required_fields=["text"])
    assert [(r["id"], r["text"], r["lang"]) for r in src] == [("c-1", "hallo welt", "de"), ("c-3", "zweite", "de")]
    with gzip.open(tmp_path / "g.txt.gz", "wb") as f:
        f.write("一\n二".encode())
    assert [r["text"] for r in open_source(str(tmp_path / "g.txt.gz"))] == ["一", "二"]
    with pytest.raises(SourceError, match="only `text`"):
        open_source(str(tmp_path / "g.txt.gz"), required_fields=["image"])


def _wav(path):
    import soundfile as sf

    sf.write(str(path), np.zeros(1600, np.float32), 16000)


def test_ljspeech_and_commonvoice(tmp_path):
    lj = tmp_path / "LJSpeech-1.1"
    (lj / "wavs").mkdir(parents=True)
    for k in ("LJ001-0001", "LJ001-0002"):
        _wav(lj / "wavs" / f"{k}.wav")
    (lj / "metadata.csv").write_text("LJ001-0001|Printing, 1st|Printing, first\nLJ001-0002|in being|\n")
    rows = list(open_source(str(lj), required_fields=["audio", "text"]))
    assert [(r["id"], r["text"], r["lang"]) for r in rows] == [("LJ001-0001", "Printing, first", "en"), ("LJ001-0002", "in being", "en")]
    assert rows[0]["audio"].endswith("wavs/LJ001-0001.wav")
    cv = tmp_path / "cv-corpus" / "de"
    (cv / "clips").mkdir(parents=True)
    _wav(cv / "clips" / "common_voice_de_1.mp3")
    (cv / "test.tsv").write_text("client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
                                 "c1\tcommon_voice_de_1.mp3\tGuten Tag.\t2\t0\t\t\t\tde\t\n"
                                 "c2\tcommon_voice_de_2.mp3\tFehlt.\t2\t0\t\t\t\tde\t\n")
    with pytest.raises(ManifestRowError, match="missing file"):
        open_source(str(cv / "test.tsv"), required_fields=["audio"])
    src = open_source({"path": str(cv), "split": "test"}, required_fields=["audio"], on_error="skip")
    assert [(r["id"], r["lang"], r["text"]) for r in src] == [("common_voice_de_1", "de", "Guten Tag.")]


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _shards(tmp_path, n_shards=4, per=3):
    (tmp_path / "shards").mkdir(parents=True)
    for s in range(n_shards):
        _shard(tmp_path / "shards" / f"{s:05d}.tar", [
            (f"{s:05d}{i:04d}", {"jpg": _png(), "txt": f"caption {s}-{i}".encode(),
                                 "json": json.dumps({"caption": f"caption {s}-{i}", "lang": "en", "url": "http://x"}).encode()})
            for i in range(per)])
    return str(tmp_path / "shards") + "/{00000..%05d}.tar" % (n_shards - 1)


def test_webdataset_rows_rank_worker_split(tmp_path):
    pattern = _shards(tmp_path)
    assert detect_format(pattern) == "webdataset"
    src = open_source(pattern, required_fields=["image", "text"])
    rows = list(src)
    assert len(rows) == 12 and rows[0]["text"] == "caption 0-0" and rows[0]["lang"] == "en"
    assert isinstance(rows[0]["image"], Image.Image) and rows[0]["url"] == "http://x"
    seen = []
    for rank in range(2):
        for worker in range(2):
            seen += src.epoch_shards(0, rank, 2, worker, 2)
    assert sorted(seen) == sorted(src.shards)  # disjoint, complete


def test_webdataset_resumes_mid_epoch_and_dataloader_workers(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    pattern = _shards(tmp_path)
    src = open_source({"shards": pattern, "shuffle": True, "seed": 3})
    full = [r["id"] for r in src]
    again = open_source({"shards": pattern, "shuffle": True, "seed": 3})
    it = iter(again)
    first = [next(it)["id"] for _ in range(5)]
    state = again.state_dict()
    resumed = open_source({"shards": pattern, "shuffle": True, "seed": 3})
    resumed.load_state_dict(state)
    assert first + [r["id"] for r in resumed] == full
    dl = StatefulDataLoader(open_source(pattern), batch_size=None, num_workers=2, collate_fn=lambda r: r["id"])
    ids = list(dl)
    assert sorted(ids) == sorted(full) and len(set(ids)) == 12  # no sample twice across workers


def test_webdataset_bad_sample(tmp_path):
    (tmp_path / "s").mkdir()
    _shard(tmp_path / "s" / "0.tar", [("k1", {"jpg": b"not an image", "txt": b"x"}), ("k2", {"jpg": _png(), "txt": b"y"})])
    with pytest.raises(ValueError, match=r"k1.*image.*bad image"):
        list(open_source(str(tmp_path / "s" / "0.tar")))
    src = open_source(str(tmp_path / "s" / "0.tar"), on_error="skip")
    assert [r["id"] for r in src] == ["k2"] and src.report.as_dict() == {"bad image": 1}


def test_unknown_formats_are_clear_errors(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    for spec in (str(tmp_path / "d"), str(tmp_path / "x.bin"), {"path": str(tmp_path / "x.bin"), "format": "nope"}):
        with pytest.raises(SourceError, match="(?s)Supported formats.*parquet.*webdataset"):
            open_source(spec)
    with pytest.raises(SourceError, match="unknown source spec key"):
        open_source({"path": "a.parquet", "colums": {}})


def test_manifest_paths_still_read_by_manifest_dataset(tmp_path):
    from mmalign.data.manifest import ManifestDataset

    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "x", "lang": "en"}\n')
    assert isinstance(open_source(str(tmp_path / "m.jsonl")), ManifestDataset)
    pq.write_table(pa.table({"id": ["b"], "text": ["y"], "lang": ["en"]}), tmp_path / "t.parquet")
    both = open_source([str(tmp_path / "m.jsonl"), str(tmp_path / "t.parquet")])
    assert [r["id"] for r in both] == ["a", "b"]
    with pytest.raises(ManifestError, match="no rows in language"):
        open_source(str(tmp_path / "t.parquet"), languages=["de"])


# -- the DataModule and `mmalign cache` read every source -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_module():
    import torch

    import encoders
    import projectors
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower

    image = Tower(encoders.TimmImageEncoder("tiny:timm-vit"), field="image", projector=projectors.Linear)
    text = Tower(encoders.HFTextEncoder("tiny:xlmr-text", pooling="mean"), field="text", projector=projectors.Linear)
    return AlignmentModule(towers={"image": image, "text": text}, objectives=[Objective(ClipLoss(), ["image", "text"])],
                           embed_dim=16, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))


def test_datamodule_fit_and_cache_from_parquet_and_webdataset(tmp_path, tiny_module):
    import lightning as L

    from mmalign.cache.command import cache
    from mmalign.data import AlignmentDataModule

    imgs = _images(tmp_path, 6)
    pq.write_table(pa.table({"file_name": [p.split("/")[1] for p in imgs], "de": [f"Bild {i}" for i in range(6)],
                             "en": [f"picture {i}" for i in range(6)]}), tmp_path / "wide.parquet")
    spec = {"path": str(tmp_path / "wide.parquet"), "root": "img", "fields": {"image": "file_name", "text": {"de": "de", "en": "en"}}}
    dm = AlignmentDataModule(train=spec, val=spec, batch_size=4, cache_dir=str(tmp_path / "cache"))
    summary = cache(tiny_module, dm, output=str(tmp_path / "cache"), progress=False, device="cpu")
    assert summary["train"]["num_rows"] == 12
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(tiny_module, dm)
    assert len(dm.datasets["train"]) == 12
    stream = AlignmentDataModule(train=_shards(tmp_path), val=spec, batch_size=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(tiny_module, stream)
    assert trainer.fit_loop.total_batch_idx + 1 == 3  # 12 samples / 4
    # shards through the feature cache: images extracted once beside it, then training reads the cache
    shards = AlignmentDataModule(train=_shards(tmp_path / "again"), val=spec, batch_size=4, cache_dir=str(tmp_path / "wcache"))
    summary = cache(tiny_module, shards, output=str(tmp_path / "wcache"), progress=False, device="cpu")
    assert summary["train"]["num_rows"] == 12 and len(list((tmp_path / "wcache" / "_media" / "train").rglob("*.jpg"))) == 12
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(tiny_module, shards)
    assert len(shards.datasets["train"]) == 12


def test_embed_reads_a_source(tmp_path, monkeypatch):
    from mmalign.export.embed import _read_input

    pq.write_table(pa.table({"text": ["a", "b"], "lang": ["en", "de"]}), tmp_path / "t.parquet")
    items, langs = _read_input(tmp_path / "t.parquet", "text")
    assert items == ["a", "b"] and langs == ["en", "de"]


def test_hf_image_feature_and_cached_dataset_by_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    _png(tmp_path / "p.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "p.png")], "text": ["red"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hfimg"))
    row = open_source(str(tmp_path / "hfimg"), required_fields=["image", "text"])[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (4, 4)  # the embedded bytes
    (tmp_path / "local").mkdir()
    pq.write_table(pa.table({"text": ["x", "y"], "lang": ["en", "en"]}), tmp_path / "local" / "train.parquet")
    src = open_source({"format": "hf", "name": str(tmp_path / "local"), "split": "train"})
    assert [r["text"] for r in src] == ["x", "y"]
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        open_source({"format": "hf", "name": "no-such-user/no-such-dataset"})


def test_vectorised_column_checks_match_python():
    """The numpy hash dedup and the blank check (used at open) agree with plain Python on random columns."""
    import random

    from mmalign.data.sources.columns import blank, repeated

    rng = random.Random(0)
    for _ in range(100):
        vals = [rng.choice([None, "".join(rng.choice("ab \u3000") for _ in range(rng.randint(0, 19)))]) for _ in range(40)]
        col = pa.chunked_array([pa.array(vals[:15]), pa.array(vals[15:]).slice(2)])  # chunked and sliced buffers
        seen, want = set(), []
        for v in col.to_pylist():
            want.append(v is not None and v in seen)
            seen.add(v)
        got = repeated(col)
        assert (list(got) if got is not None else [False] * len(col)) == want
        assert list(blank(col)) == [v is not None and v.strip() == "" for v in col.to_pylist()]


def test_big_jsonl_as_a_table_is_memory_mapped(tmp_path):
    """A long-format JSONL given with `root:` is read columnar (converted once to a mapped Arrow file)."""
    (tmp_path / "m.jsonl").write_text("".join(f'{{"id": "r{i}", "text": "t {i}", "lang": "de"}}\n' for i in range(5))
                                      + '{"id": "r1", "text": "again", "lang": "de"}\n')
    with pytest.raises(ManifestError, match="duplicate id"):
        open_source({"path": str(tmp_path / "m.jsonl"), "root": "."}, required_fields=["text"])
    src = open_source({"path": str(tmp_path / "m.jsonl"), "root": "."}, required_fields=["text"], on_error="skip")
    assert len(src) == 5 and src.skipped == {"duplicate id": 1} and src.languages == ["de"]
    assert list((tmp_path / "arrow-cache").glob("m-*.arrow"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_tables_in_small_blocks_read_as_in_one(fmt, tmp_path, monkeypatch):
    """CSV/JSONL tables (with `root:`/`fields:`) are streamed in small blocks (Arrow reads 32 ahead: the block bounds
    the memory): CSV types inferred from the first 64 MB as before, a JSONL key or type first seen late unified."""
    from mmalign.data.sources import arrow_copies as table  # the converters (split out of table.py)

    n = 60
    rows = [{"id": f"r{i}", "text": f"t {i}", "lang": "de", "n": i, **({"note": f"late {i}", "n": i + 0.5} if i > 40 else {})}
            for i in range(n)]
    path = tmp_path / f"w.{fmt}"
    if fmt == "csv":
        path.write_text("id,text,lang,n,note\n" + "".join(f"{r['id']},{r['text']},de,{r['n']},{r.get('note', '')}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"path": str(path), "root": ".", "fields": {"id": "id", "text": "text", "lang": "lang"}}

    def read(cache):
        monkeypatch.setenv("MMALIGN_ARROW_CACHE", str(tmp_path / cache))
        src = open_source(spec, required_fields=["text"])
        return src, [dict(src[i]) for i in range(len(src))], src.table.to_pylist()

    one = read("one")
    monkeypatch.setattr(table, "_TEXT_BLOCK", 128)
    monkeypatch.setattr(table, "_SNIFF", 4096 if fmt == "csv" else 128)  # the CSV sniff still sees every row
    small = read("small")
    assert len(small[0].table.to_batches()) > 3 and small[1] == one[1] and small[2] == one[2]
    assert small[2][50]["note"] == "late 50" and small[2][3]["n"] == 3 and small[0].table.schema == one[0].table.schema
