"""The English pivot corpus (``mmalign data corpus``) and the held-out CLDR domains, on tiny fake sources."""

import json

import pytest

from mmalign.data.sources import open_source
from mmalign.datasets import corpus as corpus_mod
from mmalign.datasets.corpus import build_corpus, parse_wordnet_line
from mmalign.datasets.domains import build_domains

WORDNET_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
    "00001740 03 n 02 apple 0 Malus_pumila 0 000 | fruit with red or yellow or green skin; \"an apple a day\"\n"
    "00001930 03 n 01 pear(a) 0 000 | sweet juicy gritty-textured fruit\n"
)


def fake_inputs(tmp_path):
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text(WORDNET_NOUN)
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("")
    txt = tmp_path / "extra.txt"
    txt.write_text("A red fox\nmanzana\n\nPEAR\nthe quick brown fox jumps\n", encoding="utf-8")
    held = tmp_path / "held.jsonl"
    rows = [{"id": "a-en", "concept": "apple", "lang": "en", "text": "Apple", "text_en": "Apple"},
            {"id": "a-es", "concept": "apple", "lang": "es", "text": "manzana", "text_en": "Apple"}]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return wn, txt, held


def build(root, wn, txt, held, **kw):
    return build_corpus(root, sources=[str(txt), "wordnet"], exclude=[str(held)], domains=[], wordnet_dir=wn,
                        progress=False, **kw)


def test_parse_wordnet_line():
    assert parse_wordnet_line(WORDNET_NOUN.splitlines()[0]) == ([], [], [])
    lemmas, definitions, examples = parse_wordnet_line(WORDNET_NOUN.splitlines()[1])
    assert lemmas == ["apple", "Malus pumila"]
    assert definitions == ["fruit with red or yellow or green skin"] and examples == ["an apple a day"]
    assert parse_wordnet_line(WORDNET_NOUN.splitlines()[2])[0] == ["pear"]  # adjective marker "(a)" dropped


def test_corpus_excludes_and_counts_held_out_names_deterministic_and_cached(tmp_path):
    wn, txt, held = fake_inputs(tmp_path)
    info = build(tmp_path / "c1", wn, txt, held)
    lines = (tmp_path / "c1" / "train.txt").read_text(encoding="utf-8").splitlines()
    keys = {line.casefold() for line in lines}
    assert "apple" not in keys and "manzana" not in keys  # held-out names in any language, any case
    assert info.excluded == {"held.jsonl": 2}  # "manzana" (txt) and "apple" (WordNet lemma)
    assert "pear" in keys and lines.count("pear") + lines.count("PEAR") == 1  # deduplicated, case-insensitive
    assert info.num_texts == len(lines) == len(set(keys)) == sum(info.per_source.values())
    assert info.per_source == {"extra.txt:line": 3, "wordnet:lemma": 1, "wordnet:definition": 2, "wordnet:example": 1}
    meta = json.loads((tmp_path / "c1" / "info.json").read_text())
    assert meta["held_out_names"] == {"held.jsonl": 2} and meta["held_out_names_found"] == {"held.jsonl": 2}
    # deterministic: another folder, byte-identical; the same folder again: found cached
    again = build(tmp_path / "c2", wn, txt, held)
    assert (tmp_path / "c2" / "train.txt").read_bytes() == (tmp_path / "c1" / "train.txt").read_bytes()
    assert not again.cached and build(tmp_path / "c1", wn, txt, held).cached
    # caps keep a deterministic subset, and other settings in a finished folder need overwrite
    with pytest.raises(FileExistsError, match="other settings"):
        build(tmp_path / "c1", wn, txt, held, max_per_kind={"wordnet:definition": 1})
    capped = build(tmp_path / "c1", wn, txt, held, max_per_kind={"wordnet:definition": 1}, overwrite=True)
    assert capped.per_source["wordnet:definition"] == 1 and capped.num_texts == info.num_texts - 1
    # read through the plain-text source: English rows also feed a pivot's English teacher (text_en)
    src = open_source({"path": str(capped.path), "lang": "en"}, required_fields=["text", "text_en"])
    assert len(src) == capped.num_texts and src[0]["text_en"] == src[0]["text"]


def test_corpus_writes_atomically_and_refuses_foreign_folders(tmp_path, monkeypatch):
    wn, txt, held = fake_inputs(tmp_path)
    real = corpus_mod.atomic_write_text

    def fail_on_info(path, text):
        if path.name == "info.json":
            raise OSError("disk full")
        real(path, text)

    monkeypatch.setattr(corpus_mod, "atomic_write_text", fail_on_info)
    with pytest.raises(OSError):
        build(tmp_path / "c", wn, txt, held)
    assert not (tmp_path / "c" / ".complete").exists()  # an interrupted build is never taken as finished
    monkeypatch.setattr(corpus_mod, "atomic_write_text", real)
    info = build(tmp_path / "c", wn, txt, held)  # rebuilt in place (the folder is ours)
    assert not info.cached and (tmp_path / "c" / ".complete").is_file()
    assert not list((tmp_path / "c").glob(".*.tmp"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by build_corpus"):
        build(foreign, wn, txt, held)
    with pytest.raises(FileNotFoundError, match="neither"):
        build_corpus(tmp_path / "d", sources=[str(tmp_path / "missing.txt")], domains=[], progress=False)


def fake_names(domain, lang):
    tables = {
        "en": {"AA": "Alpha", "BB": "Beta", "CC": "Gamma", "DD": "Gamma"},
        "de": {"AA": "Alfa", "BB": "Beta", "CC": "Gamma-de", "DD": "Gamma-de2"},
        "fr": {"AA": "Alpha-fr", "CC": "Gamma-fr", "DD": "x"},
    }
    return tables[lang]


def test_domains_pair_languages_and_count_drops(tmp_path):
    info = build_domains(tmp_path / "dom", domains=["things"], languages=["en", "de", "fr"], names=fake_names)
    rows = [json.loads(line) for line in (tmp_path / "dom" / "things.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["things-AA-en", "things-AA-de", "things-AA-fr"]
    assert {r["text_en"] for r in rows} == {"Alpha"} and {r["concept"] for r in rows} == {"things:AA"}
    assert info.concepts == {"things": 1}
    assert info.dropped == {"things:ambiguous_english_name": 2, "things:unnamed_in_some_language": 1}
    assert build_domains(tmp_path / "dom", domains=["things"], languages=["en", "de", "fr"], names=fake_names).cached
    with pytest.raises(ValueError, match="'en'"):
        build_domains(tmp_path / "x", languages=["de"], names=fake_names)


def test_corpus_excludes_the_cldr_domains(tmp_path):
    pytest.importorskip("babel")
    wn, txt, held = fake_inputs(tmp_path)
    txt.write_text("Euro\nBritish Pound\nzloty coins\n", encoding="utf-8")
    info = build_corpus(tmp_path / "c", sources=[str(txt)], domains=["currencies"], domain_languages=["en", "de"],
                        progress=False)
    lines = info.path.read_text(encoding="utf-8").splitlines()
    assert lines == ["zloty coins"] and info.excluded == {"currencies.jsonl": 2}
    assert info.domains["currencies"].is_file()


def test_corpus_overlay_composes_after_the_offline_pivot():
    from mmalign.recipe import load_config, recipe_files

    files = recipe_files("uclip_pivot", "offline")
    overlay = files[0].parent / "offline" / "uclip_pivot_corpus.yaml"
    offline, corpus = load_config(files), load_config(files + [overlay])
    model = {**corpus["model"], "init_args": {k: v for k, v in corpus["model"]["init_args"].items() if k != "scheduler"}}
    clip = model["init_args"]["objectives"][0]["init_args"]["loss"]["init_args"]
    assert clip.pop("queue_size") == 4096  # the InfoNCE with a queue of 4,096 teacher negatives ...
    assert offline["model"]["init_args"]["objectives"][0]["init_args"]["loss"]["init_args"].pop("queue_size") == 0
    assert model == offline["model"]  # ... otherwise a data overlay: the recipe's towers, heads and losses ...
    sched = corpus["model"]["init_args"]["scheduler"]  # ... plus a cosine LR decay over the whole run (stepped per step)
    assert sched["class_path"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert sched["init_args"]["T_max"] == corpus["trainer"]["max_epochs"] * (110_205 // corpus["data"]["init_args"]["batch_size"])
    assert corpus["data"]["init_args"]["train"] == {"path": "data/corpus/train.txt", "lang": "en"}
    assert corpus["data"]["init_args"]["val"] == offline["data"]["init_args"]["val"]  # validated on held-out emoji
