"""``mmalign`` command line: LightningCLI for ``fit|validate|test|predict``, plain functions for the rest.

    mmalign fit --config configs/uclip_pivot.yaml
    mmalign test --config configs/uclip_pivot.yaml --ckpt_path best
    mmalign eval --config configs/uclip_pivot.yaml --ckpt_path best.ckpt --output eval/
    mmalign <tool> --help          # tools: see TOOLS below
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
    "extend": "mmalign.extend:extend",
}


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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Frozen encoders stay in eval mode by design; Lightning warns about it on every fit.
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # main() always hands LightningCLI an explicit argv (it is also called from Python and the tests)
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
    if argv and argv[0] == "eval":  # LightningCLI recipe options + report options
        from mmalign.evaluation.command import evaluate

        evaluate(argv[1:])
        return
    if argv and argv[0] in TOOLS:
        from jsonargparse import CLI

        args = _rename_options(argv[1:], OPTION_RENAMES.get(argv[0], {}))
        CLI(_load(TOOLS[argv[0]]), args=args, as_positional=False)
        return
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        print("tools:", ", ".join(sorted(TOOLS)))
    from mmalign.recipe import MMAlignCLI  # imported late: tools above need no Lightning trainer

    MMAlignCLI(args=argv)


if __name__ == "__main__":
    main()
