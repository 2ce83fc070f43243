"""``mmalign`` command line: LightningCLI for ``fit|validate|test|predict``, plain functions for the rest.

    mmalign fit  --config configs/uclip_pivot.yaml --config configs/offline/uclip_pivot.yaml
    mmalign test --config configs/uclip_pivot.yaml --config configs/offline/uclip_pivot.yaml --ckpt_path best
    mmalign <subcommand> --help
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable

#: Plain-function subcommands (``module:function``), parsed from the function's signature by jsonargparse.
TOOLS: dict[str, str] = {
    "quickstart": "mmalign.cli.quickstart:quickstart",
    "recipes": "mmalign.recipe:recipes",
    "data": "mmalign.datasets.commands:data",
    "convert": "encoders.commands:convert",
    "export": "mmalign.export.checkpoint:export",
    "embed": "mmalign.export.embed:embed",
    "cache": "mmalign.cache.command:cache",
    "classify": "mmalign.evaluation.classify:classify",
    "compare": "mmalign.evaluation.compare:compare",
    "extend": "mmalign.extend:extend",
}


#: Tools whose bare arguments are positional (``mmalign compare RUN_A RUN_B``): ``module:function`` taking argv.
ARGV_TOOLS: dict[str, str] = {"compare": "mmalign.evaluation.compare:main"}


#: Tool options renamed before jsonargparse sees them. Its CLI reserves ``--config`` for a file of the tool's own
#: arguments (and drops a parameter of that name before the call), but ``mmalign export --config RECIPE`` names
#: the recipe that trained the checkpoint, as ``--config`` does for ``fit``.
OPTION_RENAMES: dict[str, dict[str, str]] = {"export": {"--config": "--recipe"}}


def _rename_options(argv: list[str], renames: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(renames[name] + eq + value if name in renames else arg)
    return out


def _load(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


#: The LightningCLI subcommands (a recipe: ``--config RECIPE.yaml [--config OVERLAY.yaml] [--key value ...]``).
LIGHTNING = {
    "fit": "train the projectors of a recipe (checkpoints: <run>/checkpoints/{best,last}.ckpt)",
    "validate": "run the validation split (--ckpt_path best|last|RUN_DIR|FILE)",
    "test": "run the test split: per-language retrieval (--ckpt_path best|last|RUN_DIR|FILE)",
    "predict": "captions / embeddings of the predict split (needs --ckpt_path, or --allow_untrained true)",
    "eval": "test + a per-language report with plots (--output DIR, --ckpt_path ...; --benchmark NAME)",
}


def _summary(target: str) -> str:
    """First docstring line of a tool's function, read from its source (no import: ``--help`` stays fast)."""
    import ast
    import importlib.util

    module, fn = target.split(":")
    try:
        spec = importlib.util.find_spec(module)
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())  # type: ignore[union-attr, arg-type]
    except Exception:  # noqa: BLE001 - a listing never fails on one tool
        return ""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn:
            doc = ast.get_docstring(node) or ""
            return doc.strip().splitlines()[0].strip() if doc.strip() else ""
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == fn for t in node.targets) \
                and isinstance(node.value, ast.Dict):  # a {name: function} table: jsonargparse subcommands
            names = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
            doc = (ast.get_docstring(tree) or "").strip()
            head = doc.splitlines()[0].strip().rstrip(".") + ": " if doc else ""
            return f"{head}{' | '.join(names)}"
    return ""


def usage() -> str:
    """``mmalign --help``: every subcommand (the LightningCLI ones, every entry of :data:`TOOLS` and :data:`ARGV_TOOLS`)."""
    width = max(map(len, [*LIGHTNING, *TOOLS, *ARGV_TOOLS]))
    lines = [__doc__.strip().splitlines()[0], "", "usage: mmalign SUBCOMMAND [options]   (mmalign SUBCOMMAND --help: its options)", "",
             "recipe subcommands (LightningCLI: --config RECIPE.yaml [--config OVERLAY.yaml] [--section.key value ...]):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}  {_summary(target).replace('``', '')}" for name, target in sorted({**TOOLS, **ARGV_TOOLS}.items())]
    lines += ["", "--ckpt_path best (or last): the newest best.ckpt (last.ckpt) of the recipe's runs under its",
              "  default_root_dir (lightning_logs/version_*/checkpoints/); or a run folder, or a .ckpt file.",
              "Errors: configuration mistakes print one line; --debug (or MMALIGN_DEBUG=1) shows the full traceback."]
    return "\n".join(lines)


def _quiet(argv: list[str]) -> None:
    """Silence notices that say nothing about the user's run (each matched precisely)."""
    import logging

    # Frozen encoders stay in eval mode by design; Lightning warns about it on every fit.
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # main() always hands LightningCLI an explicit argv (it is also called from Python and the tests)
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
    # Lightning's logging step counter runs across epochs, so a recipe logging every 20 steps on a 7-batch epoch
    # still logs every 20 steps: the warning's "you will not see logs for the training epoch" does not apply.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    # Without tensorboard, Lightning falls back to CSV with a 4-line notice; say it in one line instead.
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")
    if argv and argv[0] in ("validate", "test", "predict", "eval"):  # a fit's ModelCheckpoint state, restored outside fit
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")

    class _NoCloudTips(logging.Filter):  # "Tip: ... try installing litlogger / litmodels" on every run
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud")

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoCloudTips) for f in logger.filters):
            logger.addFilter(_NoCloudTips())


def _tensorboard_notice(argv: list[str]) -> None:
    from importlib.util import find_spec

    if argv and argv[0] in ("fit", "validate", "test", "predict") and find_spec("tensorboard") is None \
            and find_spec("tensorboardX") is None:
        print("mmalign: tensorboard is not installed: logging to CSV (lightning_logs/version_*/metrics.csv); "
              "`pip install tensorboard` (scripts/setup.sh installs it) for `tensorboard --logdir lightning_logs`",
              file=sys.stderr)


def main(argv: list[str] | None = None, readable_errors: bool | None = None) -> None:
    """Run one ``mmalign`` subcommand.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
        readable_errors: Turn configuration mistakes into one short message and exit status 2
            (:mod:`mmalign.cli.errors`). Default: on for the console script (``argv`` not given), off for Python
            callers (they get the exception). ``--debug`` or ``MMALIGN_DEBUG=1`` turns it off.
    """
    from mmalign.cli.errors import READABLE, ConfigError, debug_requested, readable

    argv_given = argv is not None
    if readable_errors is None:
        readable_errors = not argv_given
    argv = list(sys.argv[1:] if argv is None else argv)
    if debug_requested(argv):
        readable_errors = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    READABLE["on"] = readable_errors
    try:
        _dispatch(argv)
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BrokenPipeError:
        if argv_given:
            raise
        # The reader of stdout went away (`mmalign recipes | head`): stop quietly, as the Python docs advise
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe), instead of a traceback on stderr.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None
    except BaseException as err:  # noqa: BLE001 - classified by readable(); anything else is re-raised
        if isinstance(err, SystemExit) and not isinstance(err, ConfigError):
            raise
        message = readable(err) if readable_errors else None
        if message is None:
            if isinstance(err, ConfigError):  # a Python caller: jsonargparse would have printed it before exiting
                print(f"mmalign: error: {err.message}", file=sys.stderr)
            raise
        known = command in LIGHTNING or command in TOOLS
        print(f"mmalign{' ' + command if command else ''}: error: {message}\n"
              f"  (mmalign{' ' + command if known else ''} --help lists the {'options' if known else 'subcommands'}; "
              "--debug or MMALIGN_DEBUG=1 shows the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        READABLE["on"] = False


def _dispatch(argv: list[str]) -> None:
    if not argv or (argv[0] in ("-h", "--help") and len(argv) == 1):
        print(usage())
        return
    if argv[0] == "eval":  # LightningCLI recipe options + report options
        from mmalign.evaluation.command import evaluate

        evaluate(argv[1:])
        return
    if argv[0] in ARGV_TOOLS:  # tools with bare (positional) arguments parse their own argv
        _load(ARGV_TOOLS[argv[0]])(argv[1:])
        return
    if argv[0] in TOOLS:
        from jsonargparse import CLI

        args = _rename_options(argv[1:], OPTION_RENAMES.get(argv[0], {}))
        CLI(_load(TOOLS[argv[0]]), args=args, as_positional=False)
        return
    if not argv[0].startswith("-") and argv[0] not in LIGHTNING:
        from mmalign.cli.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown subcommand {argv[0]!r}" + did_you_mean(argv[0], [*LIGHTNING, *TOOLS, *ARGV_TOOLS]))
    _tensorboard_notice(argv)
    from mmalign.recipe import MMAlignCLI  # imported late: tools above need no Lightning trainer

    MMAlignCLI(args=argv)


if __name__ == "__main__":
    main()
