"""Every command line in a ```bash block of README.md and docs/*.md runs as written, on tiny recipes.

Commands are read from the docs (``mmalign ...``, ``python -m ...``, ``python -c ...``; ``\\`` continuations,
``VAR="..."`` assignments and ``for k in ...; do ... done`` loops, run with their first value, are expanded),
so a command changed in a doc is tested as changed. Substitutions, so each runs in seconds on CPU:

- a shipped recipe ``configs/X.yaml`` (or ``configs/offline/X.yaml``) becomes ``configs/X.yaml`` +
  ``configs/tiny/X.yaml`` (random tiny twins of the same encoder families, the synthetic data);
- a ``fit`` gets a logger and a ``ModelCheckpoint`` (``save_last``), as the offline recipes have, so ``best.ckpt``
  / ``last.ckpt`` and ``--ckpt_path best`` are exercised, and 1 epoch of 2 batches; evaluations 2 batches;
- stand-in inputs where a doc names user files (``texts.txt``, ``captions.txt``, ``data/test.jsonl``).

Commands run in-process (``mmalign.cli.main``) in one temporary working directory per doc file (``configs/``
linked in, ``data/synthetic`` built), in doc order, and identical substituted commands run once (the README's
hub/tiny/offline fits of one recipe are one tiny fit). :data:`SKIPPED` lists what does not run here and why; a
command that matches no entry there and fails is a broken doc (fix the code or the doc).
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: ``(regex on the expanded command, why it is not run here)``. Keep each reason honest and specific.
SKIPPED: list[tuple[str, str]] = [
    (r"^bash scripts/setup\.sh", "installs Debian and pip packages (the CI set-up)"),
    (r"^mmalign quickstart", "the ~3-minute offline main job on real encoders (tests/test_wheel.py, README figures)"),
    (r"^python -m pytest", "the test suite itself"),
    (r"^mmalign data (emoji|words|robust)", "builds the real emoji/words/styled-speech data (espeak-ng, renders: "
                                            "minutes); tests/test_emoji_data.py, tests/test_words_data.py and "
                                            "tests/test_robust_data.py build small subsets"),
    (r"--benchmark ", "needs a local copy of the benchmark; tests/test_benchmarks_data.py runs it on fixtures"),
    (r"^mmalign classify", "needs a folder of photos or Babel-ImageNet; tests/test_benchmarks_data.py runs it on fixtures"),
    (r"^python -m benchmarks\.studies\.", "research runs on real encoders (minutes to hours); their docs give the figures"),
    (r"^python -m benchmarks\.perf\.bench_sources", "a 10M-row I/O benchmark (minutes)"),
    (r"--trainer\.devices=(4|8)\b|16-mixed", "needs several GPUs / a CUDA GPU"),
    (r"configs/trainer/ddp\.yaml", "2+ processes; tests/test_scaling.py::test_two_process_ddp_fit_via_cli runs the CPU one"),
    (r"--config recipe\.yaml", "'recipe.yaml' stands for any recipe; tests/test_cache.py tests the sharded cache"),
    (r"^torchrun ", "torchrun launch; tests/test_scaling.py runs the sharded cache"),
    (r"^python benchmarks/perf/", "perf benchmarks (minutes each); docs/benchmarks.md gives their figures and commands"),
    (r"^mmalign extend .*--base runs/quickstart/export", "extends the quickstart's export (run mmalign quickstart first)"),
    (r"^mmalign extend --recipe extend ", "hub models and a real anchor-bind export"),
]

#: What a doc assumes was run before its commands (``docs/export.md`` starts from a fitted checkpoint).
PREAMBLE = {"docs/export.md": ["mmalign fit --config configs/lit_contrastive.yaml --config configs/tiny/lit_contrastive.yaml"]}
#: Files a doc names as the user's own, created in the working directory.
STANDINS = {
    "texts.txt": "a red apple\nein roter Apfel\nune voiture\n",
    "captions.txt": "a dog runs on the beach\na cat sleeps\n",
}
#: Paths a doc names, mapped to the tiny data.
PATHS = {"data/test.jsonl": "data/synthetic/test.jsonl", "test.jsonl": "data/synthetic/test.jsonl"}

FIT_EXTRA = ["--trainer.logger=true", "--trainer.enable_checkpointing=true",
             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
             "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--trainer.num_sanity_val_steps=0"]
EVAL_EXTRA = ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1"]
RECIPE_COMMANDS = ("fit", "validate", "test", "predict", "eval", "cache")


@dataclass
class DocCommand:
    file: str
    line: int
    text: str  # as expanded from the doc

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    """``cmd  # note`` -> ``cmd`` (a ``#`` inside quotes stays)."""
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).strip()


def doc_commands(path: Path) -> list[DocCommand]:
    """The command lines of the ```bash blocks of one doc, expanded (see the module docstring)."""
    text = path.read_text(encoding="utf-8")
    out: list[DocCommand] = []
    for block in re.finditer(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        start = text[: block.start()].count("\n") + 2
        variables: dict[str, str] = {}
        lines = block.group(1).splitlines()
        joined: list[tuple[int, str]] = []
        i = 0
        while i < len(lines):
            n, line = start + i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            joined.append((n, _strip_comment(line)))
            i += 1
        loop: dict[str, str] = {}
        for n, line in joined:
            if not line or line == "done":
                loop = {} if line == "done" else loop
                continue
            if m := re.match(r"for (\w+) in (\S+)[^;]*; do$", line):
                loop = {m.group(1): m.group(2)}  # the first value stands for all
                continue
            if m := re.match(r'^([A-Z_][A-Z0-9_]*)="(.*)"$', line):
                variables[m.group(1)] = m.group(2)
                continue
            for var, value in {**variables, **loop}.items():
                line = re.sub(rf"\${{?{var}\b}}?", value, line)
            for part in line.split("&&"):
                part = part.strip().rstrip("&").strip()
                if re.match(r"^(mmalign|python -m|python -c|python \S+\.py|bash|torchrun)\b", part) \
                        or re.match(r"^\w+=\S+ (python|mmalign)", part):
                    out.append(DocCommand(str(path.relative_to(ROOT)), n, re.sub(r"^(\w+=\S+ )+", "", part)))
    return out


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if re.search(pattern, command)), None)


def _recipe_names() -> set[str]:
    from mmalign.recipe import list_recipes

    return set(list_recipes())


def tiny_argv(command: str) -> list[str]:
    """The argv (without the program) that runs ``command`` on tiny recipes and data (module docstring)."""
    argv = shlex.split(command)
    if argv[0] in ("python", "python3"):
        return argv
    argv = argv[1:]  # mmalign
    recipes = _recipe_names()
    out: list[str] = []
    configs: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None:
            out.append(PATHS.get(arg, arg))
        else:
            m = re.fullmatch(r"configs/(?:offline/|tiny/)?(\w+)\.yaml", value)
            if m and m.group(1) in recipes and argv[0] in RECIPE_COMMANDS:
                name = m.group(1)
                for f in (f"configs/{name}.yaml", f"configs/tiny/{name}.yaml"):
                    if f not in configs:
                        configs.append(f)
            else:
                configs.append(value)
        i += 1
    head, rest = out[:1], out[1:]
    argv = head + [a for c in configs for a in ("--config", c)] + rest
    if argv[0] == "fit":
        argv += FIT_EXTRA
    elif argv[0] in ("validate", "test", "predict", "eval"):
        argv += EVAL_EXTRA
    return argv


def test_every_doc_command_is_run_or_skipped_for_a_reason():
    """Fast: the parser finds the commands, and each one is either runnable here or in SKIPPED."""
    commands = [c for doc in DOCS for c in doc_commands(doc)]
    assert len(commands) >= 30, [str(c) for c in commands]
    texts = [c.text for c in commands]
    assert any(t.startswith("mmalign fit ") and "uclip_pivot" in t for t in texts)  # README's Use block ($R expanded)
    run = [c for c in commands if skip_reason(c.text) is None]
    assert not [str(c) for c in run if "$" in c.text], "a variable the doc block does not set"
    assert not [str(c) for c in run if "..." in c.text or "<" in c.text], "placeholders cannot run as written"
    for c in run:
        argv = tiny_argv(c.text)
        if argv[0] in RECIPE_COMMANDS[:-1] and argv[0] != "eval" or argv[0] == "cache":
            assert any(a.startswith("configs/tiny/") for a in argv), f"{c}: no tiny overlay substituted: {argv}"


def _prepare(workdir: Path) -> None:
    from mmalign.datasets.synthetic import build_synthetic_dataset

    (workdir / "configs").symlink_to(ROOT / "configs")
    build_synthetic_dataset(workdir / "data" / "synthetic")
    for name, text in STANDINS.items():
        (workdir / name).write_text(text)


def _run(argv: list[str]) -> None:
    if argv[0] in ("python", "python3"):
        if argv[1] == "-c":
            exec(compile(argv[2], "<doc>", "exec"), {"__name__": "__doc_command__"})  # noqa: S102 - our own docs
            return
        raise AssertionError(f"no in-process runner for {argv}")
    from mmalign.cli import main

    main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d.relative_to(ROOT).as_posix() for d in DOCS])
def test_doc_commands_run(doc, tmp_path, monkeypatch):
    commands = [DocCommand(doc, 0, t) for t in PREAMBLE.get(doc, [])]
    commands += [c for c in doc_commands(ROOT / doc) if skip_reason(c.text) is None]
    if not commands:
        pytest.skip(f"{doc}: no runnable command (all in SKIPPED, or none)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _prepare(tmp_path)
    done: set[tuple[str, ...]] = set()
    for c in commands:
        argv = tiny_argv(c.text)
        if tuple(argv) in done:
            continue
        done.add(tuple(argv))
        start = time.perf_counter()
        try:
            _run(argv)
        except SystemExit as err:
            if err.code not in (0, None):
                raise AssertionError(f"{c}\n  ran as: mmalign {shlex.join(argv)}\n  exit {err.code}") from err
        except Exception as err:
            raise AssertionError(f"{c}\n  ran as: mmalign {shlex.join(argv)}\n  {type(err).__name__}: {err}") from err
        print(f"[doc command] {time.perf_counter() - start:5.1f} s  {c}")
    assert not (tmp_path / "config.yaml").exists(), "a run wrote config.yaml into the working directory"
