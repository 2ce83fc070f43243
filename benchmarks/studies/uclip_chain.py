"""The uCLIP chain offline (issue 15 item 2b): three stages that write into ONE space through ``mmalign extend``.

    python -m benchmarks.studies.uclip_chain                 # ~20-30 min on 2 busy cores (encoders run once each)

1. **LiT**: EfficientNet-Lite0 image tower (+MLP) <-> the frozen English anchor all-MiniLM-L6-v2 (no projector: the
   space is its 384-d sentence space), from ENGLISH image-name pairs only (a plain fit + export);
2. **pivot** (uCLIP): Universal Sentence Encoder Multilingual (+MLP) -> the anchor, from ENGLISH text only: ``mmalign
   extend`` of stage 1's export, the anchor an ExportTower teacher (InfoNCE + MSE, as uclip_pivot's offline overlay);
3. **SONAR**: Whisper base (+MLP) -> stage 2's multilingual text tower reading the spoken name's transcript, speech
   heard in en/de/es only: ``mmalign extend`` of stage 2's export. ``--speech_target text_en`` trains it to the
   image-aligned English anchor instead (the concept's English name: one hop to the image instead of two);
   ``--reuse_stages runs/uclip_chain`` then trains stage 3 only, on a finished chain's stage 1-2 exports.

The final export holds text_en (anchor), image, text (multilingual) and speech towers; stage 1's and 2's towers are
copied bit for bit into each later export. No non-English text and no speech was ever paired with an image, so
multilingual text->image and speech->image are zero-shot through the anchor. Scored on the trimodal study's held-out
concepts (``benchmarks.studies.trimodal.subset_manifests``: 600 train concepts, 240 of them spoken; 40 val; 80 test)
in every language, beside chance and the least-squares composition (closed-form ridge maps fit on the same rows as
each stage, λ picked on val: image->anchor, text->anchor, speech->(ridge text map of the transcript)).
Writes ``<output>/uclip_chain.json`` and prints the Markdown tables of docs/extend.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HEARD = ("en", "de", "es")
UNHEARD = ("fr", "it", "pt", "ru")
USE_M = ("ar", "de", "en", "es", "fr", "it", "ja", "ko", "pt", "ru", "tr", "zh")

_TRAINER = """trainer:
  max_epochs: @EPOCHS@
  accelerator: cpu
  precision: 32-true
  log_every_n_steps: 10
  check_val_every_n_epoch: 5
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: val/R@1, mode: max, save_last: true}
"""
_DATA = """data:
  class_path: mmalign.data.AlignmentDataModule
  init_args:
    train: @TRAIN@
    val: @VAL@
    batch_size: 128
    num_workers: 0
"""
#: The three stages' recipes (the data paths are filled in).
STAGES = {
    "1_lit": "# Stage 1 (LiT): image tower <-> frozen English anchor, English pairs only.\nseed_everything: 0\n" + _TRAINER + """model:
  class_path: mmalign.AlignmentModule
  init_args:
    towers:
      text_en:
        class_path: mmalign.Tower
        init_args:
          field: text_en
          encoder:
            class_path: encoders.HFTextEncoder
            init_args: {model_name_or_path: "packaged:all-MiniLM-L6-v2", pooling: mean, normalize: true}
      image:
        class_path: mmalign.Tower
        init_args:
          field: image
          encoder:
            class_path: encoders.TimmImageEncoder
            init_args: {model_name: "packaged:efficientnet-lite0"}
          projector:
            class_path: projectors.MLP
            init_args: {hidden_dim: 1024, num_blocks: 1, dropout: 0.1, norm: layer}
    objectives:
      - class_path: mmalign.Objective
        init_args:
          towers: [image, text_en]
          loss: {class_path: mmalign.ClipLoss}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001, weight_decay: 0.01}
""" + _DATA,
    "2_pivot": "# Stage 2 (uCLIP pivot): multilingual text -> the anchor of stage 1's export, English text only.\nseed_everything: 0\n"
    + _TRAINER + """model:
  class_path: mmalign.AlignmentModule
  init_args:
    towers:
      text_en:
        class_path: mmalign.ExportTower
        init_args: {path: @BASE@, tower: text_en, field: text_en}
      text:
        class_path: mmalign.Tower
        init_args:
          field: text
          encoder: {class_path: encoders.UniversalSentenceEncoderM}
          projector:
            class_path: projectors.MLP
            init_args: {hidden_dim: 1024, num_blocks: 0, dropout: 0.1, norm: none, input_norm: false}
    objectives:
      - class_path: mmalign.Objective
        init_args:
          towers: [text, text_en]
          loss: {class_path: mmalign.ClipLoss}
      - class_path: mmalign.Objective
        init_args:
          towers: [text, text_en]
          weight: 10.0
          loss: {class_path: mmalign.MSELoss}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001, weight_decay: 0.01}
""" + _DATA,
    "3_sonar": "# Stage 3 (SONAR): speech -> @TARGET_DOC@, speech in en/de/es.\n"
    "seed_everything: 0\n" + _TRAINER + """model:
  class_path: mmalign.AlignmentModule
  init_args:
    towers:
      @TARGET@:
        class_path: mmalign.ExportTower
        init_args: {path: @BASE@, tower: @TARGET@, field: @TARGET@}
      speech:
        class_path: mmalign.Tower
        init_args:
          field: audio
          encoder:
            class_path: encoders.WhisperSpeechEncoder
            init_args: {model_name_or_path: "packaged:whisper-base", pooling: mean, pad_to_30s: false}
          projector:
            class_path: projectors.MLP
            init_args: {hidden_dim: 1024, num_blocks: 0, dropout: 0.5, norm: batch}
    objectives:
      - class_path: mmalign.Objective
        init_args:
          towers: [speech, @TARGET@]
          loss:
            class_path: mmalign.ClipLoss
            init_args: {false_negatives: mask, logit_scale: 30.0, learnable_scale: false}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001, weight_decay: 0.01}
""" + _DATA,
}


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


#: What stage 3's speech tower is trained to (``--speech_target``): ``text`` (SONAR through stage 2: the multilingual
#: text tower reading the transcript; two hops to the image) or ``text_en`` (the image-aligned English anchor itself,
#: reading the spoken concept's English name: one hop, cross-lingual targets for de/es clips).
SPEECH_TARGETS = {"text": "stage 2's multilingual text tower (the transcript)",
                  "text_en": "the English anchor of stage 1 (the concept's English name: the image-aligned space)"}


def stage_manifests(subset: dict[str, str], out: Path) -> dict[str, dict[str, str]]:
    """Per-stage train/val manifests cut from the study subset (English-only pairs for 1 and 2; heard speech for 3)."""
    train, val = _read(Path(subset["train"])), _read(Path(subset["val"]))
    strip = lambda rows, keep: [{k: v for k, v in r.items() if k in ("id", "concept", "lang", *keep)} for r in rows]  # noqa: E731
    return {
        "1_lit": {"train": _write(out / "1_train.jsonl", strip([r for r in train if r["lang"] == "en"], ("text_en", "image"))),
                  "val": _write(out / "1_val.jsonl", strip([r for r in val if r["lang"] == "en"], ("text_en", "image")))},
        "2_pivot": {"train": _write(out / "2_train.jsonl", strip([r for r in train if r["lang"] == "en"], ("text", "text_en"))),
                    "val": _write(out / "2_val.jsonl", strip([r for r in val if r["lang"] in USE_M], ("text", "text_en")))},
        "3_sonar": {"train": _write(out / "3_train.jsonl", strip([r for r in train if r["lang"] in HEARD and r.get("audio")], ("text", "text_en", "audio"))),
                    # every spoken val row (7 languages): the checkpoint is picked on val concepts, never on test
                    "val": _write(out / "3_val.jsonl", strip([r for r in val if r.get("audio")], ("text", "text_en", "audio")))},
    }


def seed_cache(reuse_cache: Path, out_cache: Path, prefixes: tuple[str, ...] = ("image--TimmImageEncoder-", "audio--WhisperSpeechEncoder-")) -> list[str]:
    """Copy finished cache entries of the same frozen encoders (trimodal study, same subset) into a stage's cache.

    ``mmalign cache`` then reuses a shard only if its marker's fingerprint matches (encoder cache_key, dtype, the
    shard's items and their file size/mtime), i.e. when the stage's split holds exactly those items in that order;
    otherwise it re-encodes. Nothing is trusted blindly: this is the cache's own resume check.
    """
    import shutil

    copied = []
    for split in ("train", "val"):
        src = reuse_cache / split
        if not src.is_dir():
            continue
        for entry in src.iterdir():
            dst = out_cache / split / entry.name
            if entry.is_dir() and entry.name.startswith(prefixes) and not dst.exists():
                shutil.copytree(entry, dst)
                copied.append(f"{split}/{entry.name}")
    return copied


def fit_and_export(recipe: Path, out: Path) -> Path:
    """Stage 1: cache, fit, export the best checkpoint (a plain recipe: nothing to extend yet)."""
    from lightning.pytorch.cli import SaveConfigCallback

    from mmalign.cache.command import cache
    from mmalign.export import export_module, load_checkpoint, load_export_state, training_languages
    from mmalign.recipe import load_recipe
    from mmalign.training.callbacks import _recipe_config

    cli = load_recipe(["--config", str(recipe), f"--trainer.default_root_dir={out}", f"--data.init_args.cache_dir={out / 'cache'}"],
                      save_config_callback=SaveConfigCallback, save_config_kwargs={"overwrite": True})
    cache(cli.model, cli.datamodule, output=str(out / "cache"))
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    state = load_checkpoint(ckpt)
    load_export_state(cli.model, state["state_dict"], ckpt)
    return export_module(cli.model, out / "export", languages=training_languages(datamodule=cli.datamodule),
                         recipe=_recipe_config(cli.trainer), checkpoint=ckpt, epoch=state.get("epoch"),
                         global_step=state.get("global_step"))


def cached(split_dir: Path, field: str, key_prefix: str) -> np.ndarray:
    from benchmarks.studies.extend import cached as read

    return read(split_dir, field, key_prefix)


def run(data: Path, output: Path, epochs: dict[str, int], reuse_cache: Path = Path("runs/trimodal/cache"),
        speech_target: str = "text", reuse_stages: Path | None = None) -> dict[str, Any]:
    """The three stages, then the held-out scores. ``reuse_stages``: a finished chain's folder whose stage 1 and 2
    exports (and caches) are taken as they are, so only stage 3 trains (same data and seeds)."""
    from benchmarks.studies.extend import apply, pick_lambda, r_at_1, ridge
    from benchmarks.studies.trimodal import subset_manifests
    from mmalign.extend import extend

    subset = subset_manifests(data, output / "data", speech_concepts=240, val_concepts=40, test_concepts=80, train_concepts=600)
    manifests = stage_manifests(subset, output / "data")
    seconds: dict[str, int] = {}
    base: Path | None = None
    stage_dir = {stage: output / stage for stage in STAGES}
    for stage, template in STAGES.items():
        start = time.time()
        if reuse_stages is not None and stage != "3_sonar":
            base = reuse_stages / stage / "export"
            stage_dir[stage] = reuse_stages / stage
            print(f"[uclip chain] {stage}: reused {base}")
            continue
        recipe = output / "stages" / f"{stage}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(template.replace("@EPOCHS@", str(epochs[stage])).replace("@BASE@", str(base))
                          .replace("@TARGET_DOC@", SPEECH_TARGETS[speech_target]).replace("@TARGET@", speech_target)
                          .replace("@TRAIN@", manifests[stage]["train"]).replace("@VAL@", manifests[stage]["val"]), encoding="utf-8")
        print(f"[uclip chain] {stage}: seeded {seed_cache(reuse_cache, output / stage / 'cache')}")
        if base is None:
            base = fit_and_export(recipe, output / stage)
        else:
            base = Path(extend(str(recipe), output=str(output / stage), evaluate=False)["export"])
        seconds[stage] = round(time.time() - start)
        print(f"[uclip chain] {stage}: {base} ({seconds[stage]} s)")
    final = base
    # -- held-out evaluation through the final export (raw features once, then each tower's projector) -------------
    from encoders.base import EncoderOutput
    from mmalign.export import AlignedModel

    model = AlignedModel.from_pretrained(final, device="cpu")
    test = _read(Path(subset["test"]))
    concepts = [r["concept"] for r in test]
    first: dict[str, int] = {}
    for i, c in enumerate(concepts):
        first.setdefault(c, i)
    img_rows = list(first.values())
    sp_rows = [i for i, r in enumerate(test) if r.get("audio")]
    text_rows = [i for i, r in enumerate(test) if r["lang"] in USE_M]

    def raw(tower: str, field: str, idx: list[int]) -> np.ndarray:
        """Frozen-encoder features of test rows ``idx``: from a feature cache of exactly these rows written with the
        export's own encoder (same cache_key; the trimodal study caches this subset), else encoded now."""
        key = model.config["towers"][tower]["encoder"]["cache_key"]
        split = reuse_cache / "test"
        entry = split / f"{field}--{key}"
        if entry.is_dir():
            from mmalign.cache.reader import cached_row_ids

            ids = cached_row_ids(split)  # cache format 2: the ids are not in manifest.json
            rows = cached(split, field, key)
            pos = {rid: k for k, rid in enumerate(ids)}
            if all(test[i]["id"] in pos for i in idx):
                print(f"[uclip chain] test {tower} features from {entry}")
                return rows[[pos[test[i]["id"]] for i in idx]]
        items = [test[i][field] for i in idx]
        return model._embed_items(items, tower, lambda f, name: f.pooled.float().cpu(), None, 16, True, None).numpy()

    feats = {"image": raw("image", "image", img_rows), "text": raw("text", "text", text_rows),
             "speech": raw("speech", "audio", sp_rows)}
    proj = {k: model.embed_features(EncoderOutput(pooled=torch.from_numpy(v)), k).numpy() for k, v in feats.items()}
    # -- the least-squares composition, fit on the same rows as each stage (λ on each stage's val) --------------------
    c1, c2, c3 = (stage_dir[s] / "cache" for s in STAGES)
    v1 = [r["concept"] for r in _read(Path(manifests["1_lit"]["val"]))]
    v2 = [r["concept"] for r in _read(Path(manifests["2_pivot"]["val"]))]
    v3 = [r["concept"] for r in _read(Path(manifests["3_sonar"]["val"]))]
    img_tr, anc_tr = cached(c1 / "train", "image", "TimmImageEncoder"), cached(c1 / "train", "text_en", "HFTextEncoder")
    img_va, anc_va = cached(c1 / "val", "image", "TimmImageEncoder"), cached(c1 / "val", "text_en", "HFTextEncoder")
    lam_i = pick_lambda(img_tr, anc_tr, img_va, anc_va, v1)
    w_img = ridge(img_tr, anc_tr, lam_i)
    use_tr, use_tgt = cached(c2 / "train", "text", "UniversalSentenceEncoderM"), cached(c2 / "train", "text_en", "ExportEncoder")
    use_va, use_va_tgt = cached(c2 / "val", "text", "UniversalSentenceEncoderM"), cached(c2 / "val", "text_en", "ExportEncoder")
    lam_t = pick_lambda(use_tr, use_tgt, use_va, use_va_tgt, v2)
    w_txt = ridge(use_tr, use_tgt, lam_t)
    sp_tr, sp_va = cached(c3 / "train", "audio", "WhisperSpeechEncoder"), cached(c3 / "val", "audio", "WhisperSpeechEncoder")
    if speech_target == "text_en":  # speech -> the anchor's embedding of the English name, as stage 3 was trained
        tgt_tr, tgt_va = cached(c3 / "train", "text_en", "ExportEncoder"), cached(c3 / "val", "text_en", "ExportEncoder")
    else:  # speech -> the ridge text map of the transcript (raw USE-m of the transcripts: stage 3 cached the projected ones)
        tr3, va3 = _read(Path(manifests["3_sonar"]["train"])), _read(Path(manifests["3_sonar"]["val"]))
        use_m = model.towers["text"].encoder
        enc = lambda rows: np.concatenate([use_m(use_m.preprocess([r["text"] for r in rows[i:i + 64]])).pooled.numpy()  # noqa: E731
                                           for i in range(0, len(rows), 64)])
        tgt_tr, tgt_va = apply(w_txt, enc(tr3)), apply(w_txt, enc(va3))
    lam_s = pick_lambda(sp_tr, tgt_tr, sp_va, tgt_va, v3)
    w_sp = ridge(sp_tr, tgt_tr, lam_s)
    ls = {"image": apply(w_img, feats["image"]), "text": apply(w_txt, feats["text"]), "speech": apply(w_sp, feats["speech"])}
    img_c = [concepts[i] for i in img_rows]
    results: dict[str, Any] = {"text->image": {}, "speech->image": {}, "speech->text": {}}
    for system, emb in (("uCLIP chain (3 extends)", proj), ("least-squares composition", ls)):
        for lang in USE_M:
            idx = [j for j, i in enumerate(text_rows) if test[i]["lang"] == lang]
            results["text->image"].setdefault(system, {})[lang] = r_at_1(emb["text"][idx], [concepts[text_rows[j]] for j in idx], emb["image"], img_c)
        for lang in (*HEARD, *UNHEARD):
            idx = [j for j, i in enumerate(sp_rows) if test[i]["lang"] == lang]
            q_c = [concepts[sp_rows[j]] for j in idx]
            results["speech->image"].setdefault(system, {})[lang] = r_at_1(emb["speech"][idx], q_c, emb["image"], img_c)
            t_idx = [j for j, i in enumerate(text_rows) if test[i]["lang"] == lang]
            results["speech->text"].setdefault(system, {})[lang] = r_at_1(
                emb["speech"][idx], q_c, emb["text"][t_idx], [concepts[text_rows[j]] for j in t_idx])
    import sys

    out = {"command": " ".join(["python -m benchmarks.studies.uclip_chain", *sys.argv[1:]]), "speech_target": speech_target,
           "chance": 1 / len(img_rows), "export": str(final),
           "towers": list(model.towers), "ridge_lambda": {"image": lam_i, "text": lam_t, "speech": lam_s}, "seconds": seconds,
           "epochs": epochs, "results": results}
    (output / "uclip_chain.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(tables(out))
    return out


def tables(out: dict[str, Any]) -> str:
    chance = out["chance"]
    blocks = []
    for direction, res in out["results"].items():
        langs = list(next(iter(res.values())))
        head = [f"{l}" + (" (heard)" if l in HEARD and "speech" in direction else " (never heard)" if l in UNHEARD and "speech" in direction else "")
                for l in langs]
        lines = [f"**{direction}** (R@1, {int(round(1 / chance))} held-out concepts, chance {chance:.3f})", "",
                 "| system | " + " | ".join(head) + " | mean |", "|---|" + "---|" * (len(langs) + 1)]
        for system, per in res.items():
            vals = [per[l] for l in langs]
            lines.append(f"| {system} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--output", default="runs/uclip_chain")
    p.add_argument("--epochs", default="40,60,40", help="epochs of stages 1,2,3")
    p.add_argument("--reuse_cache", default="runs/trimodal/cache",
                   help="a feature cache of the same test rows and encoders (python -m benchmarks.studies.trimodal)")
    p.add_argument("--speech_target", default="text", choices=sorted(SPEECH_TARGETS),
                   help="stage 3 trains speech to: " + "; ".join(f"{k}: {v}" for k, v in SPEECH_TARGETS.items()))
    p.add_argument("--reuse_stages", default=None,
                   help="a finished chain's output folder: take its stage 1 and 2 exports, train stage 3 only")
    args = p.parse_args()
    torch.set_num_threads(2)
    epochs = dict(zip(STAGES, (int(e) for e in args.epochs.split(","))))
    run(Path(args.data), Path(args.output), epochs, Path(args.reuse_cache), args.speech_target,
        Path(args.reuse_stages) if args.reuse_stages else None)


if __name__ == "__main__":
    main()
