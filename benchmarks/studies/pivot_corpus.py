"""Corpus-scale uCLIP pivot (issue 17.1): USE-m student -> all-MiniLM-L6-v2 English anchor, trained on English text only.

Trains the offline pivot recipe (``configs/uclip_pivot.yaml`` + ``configs/offline/uclip_pivot.yaml`` +
``configs/offline/uclip_pivot_corpus.yaml``) on the English corpus of ``mmalign data corpus`` and measures,
per language, student(L) -> teacher(English) R@1 on held-out emoji concepts and on held-out CLDR domains
(territories, currencies, languages: ``data/corpus/domains``, never a training source), each beside the
ceiling (the frozen student's own cross-lingual retrieval: student(L) -> student(English), no projector),
the least-squares map and a linear projector. Variants are chosen on the emoji VALIDATION split only.

    mmalign data corpus --root data/corpus --sources '[data/emoji/train.jsonl, wordfreq, wordnet]' \\
        --exclude '[data/emoji/val.jsonl, data/emoji/test.jsonl]'
    python -m benchmarks.studies.pivot_corpus encode            # frozen features (resumable chunks)
    python -m benchmarks.studies.pivot_corpus run --seeds 0 1 2 # trains, writes docs/results/pivot_corpus.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings  # noqa: E402

for _msg in (".*LightningCLI's args parameter.*", ".*validation_step.*", ".*LeafSpec.*", ".*self.log.*"):
    warnings.filterwarnings("ignore", message=_msg)

import torch  # noqa: E402

from benchmarks.studies.pivot_features import encode_chunked, read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path(os.environ.get("MMALIGN_CACHE_DIR", Path.home() / ".cache" / "mmalign")) / "pivot_corpus"
EMOJI_LANGS = ["en", "es", "ja", "ko", "pt", "it", "fr", "de", "zh", "ru", "tr", "ar"]
DOMAINS = ["territories", "currencies", "languages"]
MAIN = "recipe on corpus (chosen variant)"


def encoders():
    """The recipe's frozen encoders ``{"student": USE-m, "teacher": MiniLM}`` (built from its YAML)."""
    from mmalign.recipe import build, load_config

    model, _ = build(load_config("uclip_pivot", variant="offline"))
    return {name: model.towers[name].encoder.eval() for name in ("student", "teacher")}


def eval_texts(path: Path, langs: list[str] | None = None) -> dict[str, list]:
    """Rows of an evaluation manifest: student texts (every row) and teacher texts (one English name per concept)."""
    rows = [r for r in read_jsonl(path) if langs is None or r["lang"] in langs]
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    first = {}
    for r in rows:
        first.setdefault(r["concept"], r["text_en"])
    return {"rows": rows, "student": [r["text"] for r in rows], "concepts": concepts, "teacher": [first[c] for c in concepts]}


def feature_dir(cache: Path, name: str, tower: str, enc) -> Path:
    return cache / name / f"{tower}-{enc.cache_key.replace('/', '_')[:80]}"


def encode_plan(args) -> None:
    torch.set_num_threads(2)
    enc = encoders()
    corpus = [line.rstrip("\n") for line in open(args.corpus / "train.txt", encoding="utf-8")]
    sets = {"emoji-val": eval_texts(args.data / "val.jsonl", EMOJI_LANGS),
            "emoji-test": eval_texts(args.data / "test.jsonl", EMOJI_LANGS)}
    for d in DOMAINS:
        sets[d] = eval_texts(args.corpus / "domains" / f"{d}.jsonl")
    train_en = [r["text"] for r in read_jsonl(args.data / "train.jsonl") if r["lang"] == "en"]

    def do_set(name):
        s = sets[name]
        for tower in ("student", "teacher"):
            encode_chunked(enc[tower], s[tower], feature_dir(args.cache, name, tower, enc[tower]), log=f"{name}/{tower}")

    def do_corpus(limit):
        for tower in ("student", "teacher"):
            encode_chunked(enc[tower], corpus, feature_dir(args.cache, "corpus", tower, enc[tower]), limit=limit, log=f"corpus/{tower}")

    do_set("emoji-val")
    for tower in ("student", "teacher"):
        encode_chunked(enc[tower], train_en, feature_dir(args.cache, "emoji-train-en", tower, enc[tower]), log=f"emoji-train-en/{tower}")
    do_corpus(args.first_corpus)  # then every held-out set, then the rest of the corpus, 10k at a time
    for name in ("territories", "currencies", "emoji-test", "languages"):
        do_set(name)
    for limit in range(args.first_corpus + 10240, len(corpus) + 10240, 10240):
        do_corpus(limit)


# -- features ------------------------------------------------------------------------------------
class EvalSet:
    """A held-out set: rows, student features of every row, teacher features of one English name per concept."""

    def __init__(self, name: str, texts: dict, student: torch.Tensor, teacher: torch.Tensor) -> None:
        self.name, self.rows, self.concepts = name, texts["rows"], texts["concepts"]
        self.student, self.teacher = student, teacher
        self.langs = list(dict.fromkeys(r["lang"] for r in self.rows))

    def r1(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> dict[str, float]:
        """R@1 student(L) -> teacher(English names of the set's concepts), per language."""
        from mmalign.evaluation.baselines import r1

        out = {}
        for lang in self.langs:
            idx = [i for i, r in enumerate(self.rows) if r["lang"] == lang]
            out[lang] = r1(student_emb[idx], teacher_emb, [self.rows[i]["concept"] for i in idx], self.concepts)
        return out

    def ceiling(self) -> dict[str, float]:
        """The frozen student's own retrieval student(L) -> student(en), no projector (evaluation.baselines)."""
        from mmalign.evaluation.baselines import student_ceiling

        c = student_ceiling(self.student, [r["lang"] for r in self.rows], [r["concept"] for r in self.rows], pivot="en",
                            keys=[r["text"] for r in self.rows], languages=self.langs)
        return {lang: m["R@1"] for lang, m in c.items()}


def load_features(args, enc) -> tuple[dict[str, EvalSet], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Eval sets, the corpus prefix with both towers encoded, and the English emoji training names."""
    from benchmarks.studies.pivot_features import available

    sets = {}
    specs = {"emoji-val": (args.data / "val.jsonl", EMOJI_LANGS), "emoji-test": (args.data / "test.jsonl", EMOJI_LANGS)}
    specs.update({d: (args.corpus / "domains" / f"{d}.jsonl", None) for d in DOMAINS})
    for name, (path, langs) in specs.items():
        texts = eval_texts(path, langs)
        dirs = {t: feature_dir(args.cache, name, t, enc[t]) for t in ("student", "teacher")}
        if any(available(texts[t], dirs[t]) < len(texts[t]) for t in dirs):
            print(f"  {name}: features not encoded yet (run `encode`); left out", flush=True)
            continue
        feats = {t: torch.from_numpy(encode_chunked(enc[t], texts[t], dirs[t])) for t in dirs}
        sets[name] = EvalSet(name, texts, feats["student"], feats["teacher"])
    corpus = [line.rstrip("\n") for line in open(args.corpus / "train.txt", encoding="utf-8")]
    n = min(available(corpus, feature_dir(args.cache, "corpus", t, enc[t])) for t in ("student", "teacher"))
    if args.max_corpus:
        n = min(n, args.max_corpus)
    train = {t: torch.from_numpy(encode_chunked(enc[t], corpus, feature_dir(args.cache, "corpus", t, enc[t]), limit=n))
             for t in ("student", "teacher")}
    train_en = [r["text"] for r in read_jsonl(args.data / "train.jsonl") if r["lang"] == "en"]
    emoji = {t: torch.from_numpy(encode_chunked(enc[t], train_en, feature_dir(args.cache, "emoji-train-en", t, enc[t])))
             for t in ("student", "teacher")}
    return sets, train, emoji


# -- training on the features ----------------------------------------------------------------------
class UclipHead(torch.nn.Module):
    """uCLIP's projection head (Linear-BatchNorm-ReLU-Linear), for comparison with the recipe's MLP."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden_dim), torch.nn.BatchNorm1d(hidden_dim), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden_dim, out_dim))

    def forward(self, features) -> torch.Tensor:
        return self.net(features.pooled)


@__import__("functools").lru_cache(maxsize=None)
def _recipe_config() -> dict:
    from mmalign.recipe import load_config, recipe_files

    files = recipe_files("uclip_pivot", "offline") + [ROOT / "configs" / "offline" / "uclip_pivot_corpus.yaml"]
    return load_config(files)


def recipe_config(batch_size: int | None = None) -> dict:
    """The composed corpus recipe (uclip_pivot + offline + corpus overlays) as a dict."""
    import copy

    cfg = copy.deepcopy(_recipe_config())
    if batch_size:
        cfg["data"]["init_args"]["batch_size"] = batch_size
    return cfg


def variant_config(v: dict) -> dict:
    """The composed recipe with a variant's patches: projector, loss weights, temperature, queue, mixup."""
    import copy

    cfg = copy.deepcopy(recipe_config(v.get("batch_size")))
    m = cfg["model"]["init_args"]
    if v.get("linear"):
        m["towers"]["student"]["init_args"]["projector"] = {"class_path": "projectors.Linear"}
    if "mse_weight" in v:
        m["objectives"][1]["init_args"]["weight"] = v["mse_weight"]
    if v.get("temperature"):
        m["objectives"][0]["init_args"]["loss"] = {"class_path": "mmalign.ClipLoss", "init_args": {
            "logit_scale": 1.0 / v["temperature"], "learnable_scale": False}}
    # the queue only where the variant asks for it (the corpus overlay's 4,096 is the variant {"queue": 4096})
    m["objectives"][0]["init_args"]["loss"].setdefault("init_args", {})["queue_size"] = int(v.get("queue") or 0)
    if v.get("mixup"):
        m["mixup_alpha"] = float(v["mixup"])
    return cfg


_BASE: dict = {}


def base_model():
    """The composed recipe's module, built once (LightningCLI parse + frozen encoders); variants are deep copies."""
    if "model" not in _BASE:
        from mmalign.recipe import build

        _BASE["model"], _ = build(recipe_config(), seed=0)
    return _BASE["model"]


def variant_model(v: dict, seed: int):
    """A copy of the recipe's module with a variant's changes, projector initialised from ``seed``: the same module
    ``mmalign fit`` builds from the patched YAML (:func:`variant_config`), without re-parsing it for every run."""
    import copy

    import projectors
    from mmalign import ClipLoss

    model = copy.deepcopy(base_model())
    tower = model.towers["student"]
    in_dim = int(v.get("in_dim") or tower.encoder.output_dim)  # in_dim: features of another student encoder
    torch.manual_seed(seed)
    if v.get("linear"):
        tower.projector = projectors.Linear(in_dim, model.embed_dim)
    elif v.get("uclip_head"):
        tower.projector = UclipHead(in_dim, model.embed_dim, hidden_dim=int(v.get("hidden_dim") or 1024))
    elif any(k in v for k in ("hidden_dim", "num_blocks", "norm", "dropout")):  # projectors.MLP with other capacity
        tower.projector = projectors.MLP(in_dim, model.embed_dim, hidden_dim=int(v.get("hidden_dim") or 1024),
                                         num_blocks=int(v.get("num_blocks") or 0), dropout=float(v.get("dropout", 0.1)),
                                         norm=v.get("norm", "none"), input_norm=False)
    else:
        tower.projector = tower._projector_factory(in_dim, model.embed_dim)
    head = v.get("teacher_head")
    if head:  # two-sided (uCLIP trains a head on each encoder): the anchor side gets a trainable projector too
        teacher = model.towers["teacher"]
        t_in = teacher.encoder.output_dim
        if head == "linear":
            teacher.projector = projectors.Linear(t_in, model.embed_dim)
            if t_in == model.embed_dim:  # start at the frozen anchor's own space
                with torch.no_grad():
                    teacher.projector.proj.weight.copy_(torch.eye(t_in))
                    teacher.projector.proj.bias.zero_()
        elif head == "uclip":
            teacher.projector = UclipHead(t_in, model.embed_dim, hidden_dim=int(v.get("hidden_dim") or 1024))
        else:
            teacher.projector = projectors.MLP(t_in, model.embed_dim, hidden_dim=int(v.get("hidden_dim") or 1024),
                                               num_blocks=0, dropout=float(v.get("dropout", 0.1)), norm="none", input_norm=False)
    if "mse_weight" in v:
        model.objectives[1].weight = float(v["mse_weight"])
    if v.get("cosine"):  # cosine distillation beside InfoNCE (and the recipe's MSE)
        from mmalign import Objective
        from mmalign.training.losses import CosineLoss

        model.objectives.append(Objective(CosineLoss(), ["student", "teacher"], weight=float(v["cosine"])))
    if v.get("clip_weight") is not None:
        model.objectives[0].weight = float(v["clip_weight"])
    queue = int(v.get("queue") or 0)  # the product's queue of negatives: ClipLoss(queue_size=...), as the YAML sets it
    if v.get("temperature"):
        model.objectives[0].loss = ClipLoss(logit_scale=1.0 / v["temperature"], learnable_scale=False, queue_size=queue)
    else:
        model.objectives[0].loss = ClipLoss(queue_size=queue)
    model.hparams["mixup_alpha"] = v.get("mixup")
    return model


def fit_features(v: dict, x_s: torch.Tensor, x_t: torch.Tensor, steps: int, seed: int):
    """Train the student tower of the (patched) recipe on paired features: the module's own losses
    (``compute_losses``) and latent mixup (``mixup_batch``) as in ``AlignmentModule.training_step``, AdamW as in the
    recipe (lr 1e-3, weight decay 0.01), ``steps`` steps of the recipe's batch size.

    Variant keys beyond :func:`variant_model`'s: ``steps`` and ``batch_size`` (override the arguments), ``lr``,
    ``schedule: cosine`` (``CosineAnnealingLR`` over the ``steps``: cosine decay to 0), ``noise`` (Gaussian input
    noise std), ``bank`` (a memory bank of ``bank`` teacher rows drawn at random from the training set each step as
    extra InfoNCE negatives for the student -> teacher direction: the teacher is frozen and has no projector, so its
    features are exact, never stale; a bank row equal to a batch row's own text is masked), ``bank_weight``.
    ``queue`` (a :func:`variant_model` key): the product's version of the bank, ``mmalign.ClipLoss(queue_size=queue)``:
    a FIFO of the teacher rows of the last ``queue / batch`` steps inside the InfoNCE's student -> teacher softmax
    (no separate loss term), what ``queue_size`` in the recipe YAML trains."""
    import torch.nn.functional as F

    from mmalign.training.mixup import mixup_batch

    model = variant_model(v, seed)
    model.train()
    steps = int(v.get("steps") or steps)
    bs = int(v.get("batch_size") or recipe_config()["data"]["init_args"]["batch_size"])
    noise = float(v.get("noise") or 0.0)
    bank, bank_w = int(v.get("bank") or 0), float(v.get("bank_weight", 1.0))
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(v.get("lr") or 1e-3), weight_decay=0.01)
    sched = None
    if v.get("schedule") == "cosine":  # what the recipe's `scheduler: CosineAnnealingLR` (stepped every step) does
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    n, step = len(x_s), 0
    x_tn = F.normalize(x_t.float(), dim=-1) if bank else None
    while step < steps:
        order = torch.randperm(n, generator=g)
        for start in range(0, n - bs + 1 if n > bs else 1, bs):
            idx = order[start:start + bs]
            xs = x_s[idx]
            if noise:
                xs = xs + noise * torch.randn(xs.shape, generator=g)
            batch = {"meta": {"id": [str(i) for i in idx.tolist()], "concept": [str(i) for i in idx.tolist()]},
                     "features": {"student": {"pooled": xs}, "teacher": {"pooled": x_t[idx]}}}
            if model.hparams.get("mixup_alpha"):
                batch = mixup_batch(batch, model.hparams["mixup_alpha"], generator=g)
            embeds = model(batch)
            losses = model.compute_losses(embeds)
            if bank:
                bidx = torch.randint(0, n, (bank,), generator=g)
                s = F.normalize(embeds["student"].float(), dim=-1)
                t = F.normalize(embeds["teacher"].float(), dim=-1)
                if v.get("teacher_head"):  # the bank through the trainable anchor head (fresh, with gradients)
                    negatives = F.normalize(project_train(model, "teacher", x_t[bidx]).float(), dim=-1)
                else:
                    negatives = x_tn[bidx]
                logits = model.objectives[0].loss.logit_scale() * (s @ torch.cat([t, negatives]).T)
                logits[:, len(idx):] = logits[:, len(idx):].masked_fill(idx[:, None] == bidx[None, :], float("-inf"))
                losses["bank_loss"] = bank_w * F.cross_entropy(logits, torch.arange(len(idx)))
            loss = torch.stack(list(losses.values())).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if step == steps:
                break
    return model.eval()


def project_train(model, tower: str, x: torch.Tensor) -> torch.Tensor:
    from encoders.base import EncoderOutput

    return model.towers[tower].project(EncoderOutput(pooled=x))


def project(model, tower: str, x: torch.Tensor) -> torch.Tensor:
    from encoders.base import EncoderOutput

    with torch.no_grad():
        return model.towers[tower].project(EncoderOutput(pooled=x))


def score_model(model, sets: dict[str, EvalSet]) -> dict[str, dict[str, float]]:
    return {name: s.r1(project(model, "student", s.student), project(model, "teacher", s.teacher)) for name, s in sets.items()}


def mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def ridge_scores(x_s, x_t, sets):
    """Least-squares (ridge) map student -> teacher on the training features; lambda picked on emoji val."""
    from mmalign.evaluation.baselines import pick_ridge

    val = sets["emoji-val"]
    fn, lam = pick_ridge(x_s, x_t, lambda f: mean(val.r1(f(val.student), val.teacher)))
    return {name: s.r1(fn(s.student), s.teacher) for name, s in sets.items()}, lam


VARIANTS = {
    "recipe (GELU MLP, InfoNCE learnable T + MSE x10, batch 128)": {},
    "uCLIP head Linear-BN-ReLU-Linear": {"uclip_head": True},
    "InfoNCE T=0.01 fixed": {"temperature": 0.01},
    "MSE weight 0.1 (intra-modal L2, lambda 0.1)": {"mse_weight": 0.1},
    "input noise std sqrt(0.004)": {"noise": 0.004 ** 0.5},
    "latent mixup alpha 1": {"mixup": 1.0},
}


def run(args) -> None:
    import json
    import statistics
    import time

    torch.set_num_threads(1)  # one thread: a loaded shared CPU stalls multi-threaded small matmuls
    enc = encoders()
    sets, train, emoji = load_features(args, enc)
    out: dict = {"corpus_rows": len(train["student"]), "steps": args.steps, "seeds": args.seeds,
                 "baseline_seeds": args.baseline_seeds, "command": "python -m benchmarks.studies.pivot_corpus " + " ".join(sys.argv[1:]), "sets": {}}
    print(f"corpus rows with features: {len(train['student'])}; sets: {sorted(sets)}", flush=True)
    for name, s in sets.items():
        out["sets"][name] = {"concepts": len(s.concepts), "rows": len(s.rows), "languages": s.langs, "ceiling": s.ceiling()}
    results: dict = {}

    def record(label, scores_per_seed):
        results[label] = {name: {lang: [sc[name][lang] for sc in scores_per_seed] for lang in scores_per_seed[0][name]}
                          for name in scores_per_seed[0]}
        val = [mean(sc["emoji-val"]) for sc in scores_per_seed]
        save()  # after every row: a run stopped early keeps what it measured
        print(f"  {label}: emoji-val mean R@1 {statistics.mean(val):.3f}" +
              "".join(f" | {n} {statistics.mean(mean(sc[n]) for sc in scores_per_seed):.3f}" for n in scores_per_seed[0] if n != "emoji-val"),
              flush=True)

    def seeded(label, v, seeds):  # one row over seeds, recorded (and saved) after each seed
        scores = []
        for seed in seeds:
            scores.append(score_model(fit_features(v, train["student"], train["teacher"], args.steps, seed), sets))
            record(label, scores)

    t0 = time.time()
    path = args.output.with_name(f"{args.output.stem}-{'-'.join(args.parts)}.json")

    def save():
        out["results"], out["seconds"] = results, round(time.time() - t0)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")

    variants = json.loads(args.variants) if args.variants else VARIANTS
    if "variants" in args.parts:  # chosen on emoji VALIDATION only (seed 0 unless --variant_seeds)
        for label, v in variants.items():
            t1 = time.time()
            record(f"variant: {label}", [score_model(fit_features(v, train["student"], train["teacher"], args.steps, s), sets)
                                         for s in args.variant_seeds])
            print(f"    ({time.time() - t1:.0f} s)", flush=True)
    if args.best == "auto":  # the single change that scored best on emoji VALIDATION (never on a test set)
        val = {label: mean({lang: sum(v) / len(v) for lang, v in results[f"variant: {label}"]["emoji-val"].items()})
               for label in variants}
        chosen = max(val, key=val.get)
        best = variants[chosen]
        out["chosen_label"] = chosen
        print(f"chosen on emoji val: {chosen} {best}", flush=True)
    else:
        best = json.loads(args.best) if args.best else {}
    out["chosen"], out["chosen_steps"] = best, int(best.get("steps") or args.steps)
    if "curve" in args.parts:
        for n in args.curve:
            n = min(n, len(train["student"]))
            record(f"corpus prefix {n} (best)", [score_model(fit_features(best, train["student"][:n], train["teacher"][:n], args.steps, 0), sets)])
    if "baselines" in args.parts:
        record("ridge on emoji English names", [ridge_scores(emoji["student"], emoji["teacher"], sets)[0]])
        record("recipe on emoji English names", [score_model(fit_features({}, emoji["student"], emoji["teacher"], args.steps, s), sets) for s in args.names_seeds])
        rs, lam = ridge_scores(train["student"], train["teacher"], sets)
        record(f"least squares on corpus (ridge, lambda={lam:g})", [rs])
    if "baselines" in args.parts or "linear" in args.parts:
        seeded("linear projector on corpus", {**best, "linear": True, "uclip_head": False}, args.baseline_seeds)
    if "final" in args.parts:
        seeded(MAIN, best, args.seeds)
    save()
    print(f"wrote {path}")


def default_sources():
    """The study's default data, corpus and feature-cache paths (what ``run`` reads without options)."""
    import argparse

    return argparse.Namespace(data=ROOT / "data" / "emoji", corpus=ROOT / "data" / "corpus", cache=DEFAULT_CACHE,
                              max_corpus=None)


def write_result(path: Path, out: dict, t0: float) -> None:
    """Write a side study's JSON (``seconds`` since ``t0`` added) and say where."""
    import json
    import time

    out["seconds"] = round(time.time() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


# -- report ------------------------------------------------------------------------------------------
def _cell(values: list[float], digits: int = 2) -> str:
    import statistics

    m = statistics.mean(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f}±{statistics.stdev(values):.{digits}f}"


def tables(result: dict, names: list[str], methods: list[str]) -> str:
    """Markdown: per held-out set, R@1 per language of each method (mean±std over seeds) beside the ceiling,
    and the chosen recipe's fraction of the ceiling."""
    import statistics

    lines = []
    for name in names:
        meta = result["sets"].get(name)
        if meta is None:
            continue
        langs = meta["languages"]
        lines += [f"**{name}** ({meta['concepts']} concepts, gallery = their English names; R@1, chance {1 / meta['concepts']:.3f})", "",
                  "| method | " + " | ".join(langs) + " | mean |", "|---|" + "---|" * (len(langs) + 1)]
        ceil = meta["ceiling"]
        lines.append("| ceiling: frozen USE-m, student(L) -> student(en) | " + " | ".join(f"{ceil[l]:.2f}" for l in langs)
                     + f" | {statistics.mean(ceil[l] for l in langs):.2f} |")
        for method in methods:
            r = result["results"].get(method, {}).get(name)
            if r is None:
                continue
            per_seed_mean = [statistics.mean(r[l][i] for l in langs) for i in range(len(r[langs[0]]))]
            lines.append(f"| {method} | " + " | ".join(_cell(r[l]) for l in langs) + f" | {_cell(per_seed_mean)} |")
        main = result["results"].get(methods[-1], {}).get(name)
        if main:
            frac = {l: statistics.mean(main[l]) / ceil[l] if ceil[l] else float("nan") for l in langs}
            lines.append(f"| {methods[-1]}: fraction of the ceiling | " + " | ".join(f"{frac[l]:.2f}" for l in langs)
                         + f" | {statistics.mean(statistics.mean(main[l]) for l in langs) / statistics.mean(ceil[l] for l in langs):.2f} |")
        lines.append("")
    return "\n".join(lines)


def curve_table(result: dict) -> str:
    """Markdown: the learning curve, mean R@1 over languages per corpus prefix (and the full run's MAIN row)."""
    import statistics

    rows = {int(k.split()[2]): r for k, r in result["results"].items() if k.startswith("corpus prefix ")}
    if not rows:
        return ""
    if MAIN in result["results"] and result.get("main_rows"):  # the full run's seed-0 row is the curve's last point
        rows.setdefault(result["main_rows"], result["results"][MAIN])
    names = list(result["sets"])
    lines = ["| corpus texts | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for n in sorted(rows):
        lines.append(f"| {n:,} | " + " | ".join(f"{statistics.mean(v[0] for v in rows[n][name].values()):.3f}" for name in names) + " |")
    return "\n".join(lines)


def variant_table(result: dict) -> str:
    """Markdown: each variant's mean R@1 over languages (mean over its seeds; ± std when several)."""
    import statistics

    names = [n for n in result["sets"] if n != "emoji-val"]
    lines = ["| variant | seeds | emoji val mean R@1 | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for label, r in result["results"].items():
        if label.startswith("variant: "):
            k = len(next(iter(r["emoji-val"].values())))
            cells = [_cell([statistics.mean(v[i] for v in r[n].values()) for i in range(k)], 3) for n in ["emoji-val"] + names]
            lines.append(f"| {label[9:]} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["encode", "run", "tables"])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "emoji")
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--parts", nargs="+", default=["variants", "curve", "baselines", "final"],
                    choices=["variants", "curve", "baselines", "linear", "final"], help="linear: only the linear projector row")
    ap.add_argument("--inputs", type=Path, nargs="+", help="tables: JSON files of several runs, merged in order")
    ap.add_argument("--best", default="", help="JSON patch of the chosen variant (picked on emoji val), e.g. '{\"mixup\": 1}'")
    ap.add_argument("--variants", default="", help="JSON {label: patch} of variants to try instead of VARIANTS")
    ap.add_argument("--variant_seeds", type=int, nargs="+", default=[0], help="seeds of each variant")
    ap.add_argument("--curve", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 110000])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the chosen recipe on the corpus")
    ap.add_argument("--baseline_seeds", type=int, nargs="+", default=[0], help="seeds of the trained baselines")
    ap.add_argument("--names_seeds", type=int, nargs="+", default=[0], help="seeds of the recipe on the emoji English names")
    ap.add_argument("--max_corpus", type=int, default=None, help="train on at most this many corpus texts")
    ap.add_argument("--first_corpus", type=int, default=6144, help="encode: corpus texts encoded before the held-out sets")
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "pivot_corpus.json")
    args = ap.parse_args(argv)
    if args.mode == "encode":
        encode_plan(args)
    elif args.mode == "tables":  # markdown of a run's JSON (docs/results_pivot.md quotes it)
        import json

        paths = args.inputs or [args.output]
        result = json.loads(paths[0].read_text())
        for path in paths[1:]:  # runs of several parts: the sets of the first, every run's rows in order
            result["results"].update(json.loads(path.read_text())["results"])
        for path in paths:  # the corpus size of the run holding the final recipe (the learning curve's last point)
            r = json.loads(path.read_text())
            if MAIN in r["results"]:
                result["main_rows"] = r["corpus_rows"]
        methods = [m for m in result["results"] if not m.startswith(("variant: ", "corpus prefix "))]
        methods = [m for m in methods if m != MAIN] + [m for m in methods if m == MAIN]  # the fraction row is MAIN's
        print("\n\n".join(t for t in (variant_table(result), curve_table(result),
                                       tables(result, list(result["sets"]), methods) if methods else "") if t))
    else:
        run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
