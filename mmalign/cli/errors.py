"""Errors a person can read: configuration mistakes end in one short message, not a 60-line traceback.

``mmalign`` (the console script) turns the mistakes a user makes in a recipe or on the command line into
``mmalign fit: error: <what>; did you mean <the closest name>?`` and exit status 2:

- a misspelled option or key (``--trainer.max_epoc``, ``batch_sise:`` in a YAML, a projector's ``hiden_dim``):
  the closest accepted names (difflib) of that class or parser;
- a wrong name in a list the message gives (``objective names tower 'teachr'; towers are [...]``), an unknown
  language (``english`` -> ``en``), a missing file (the closest names in its folder, or "no such directory");
- ``--trainer.accelerator gpu`` on a machine without a visible GPU.

Everything else (a bug, a tensor shape mismatch) keeps Python's traceback. ``--debug`` anywhere on the command
line, or ``MMALIGN_DEBUG=1``, keeps the full traceback for these too. The Python API is unchanged:
:func:`mmalign.cli.main` called with an explicit ``argv`` raises as before unless ``readable_errors=True``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Iterable, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

DEBUG_ENV = "MMALIGN_DEBUG"


class ConfigError(SystemExit):
    """A command-line or recipe mistake (exit status 2), raised where jsonargparse would print its usage and exit.

    A ``SystemExit``, as the parser's exit was: code that caught that still does. ``str(err)`` is the parser's
    message; :func:`readable` condenses it.
    """

    def __init__(self, message: str, parser: Any = None) -> None:
        super().__init__(2)
        self.message = message
        self.parser = parser

    def __str__(self) -> str:
        return self.message


#: Set by :func:`mmalign.cli.main` while it runs with readable errors (the console script).
READABLE = {"on": False}


class MMAlignParser(LightningArgumentParser):
    """LightningCLI's parser, raising :class:`ConfigError` where it would print its usage (~50 lines) and exit,
    while :func:`mmalign.cli.main` runs with readable errors (elsewhere it behaves as jsonargparse's).

    Only the exiting path changes: internally jsonargparse still gets the ``ArgumentError`` it catches while
    trying the subtypes of a union.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or not READABLE["on"]:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise ConfigError(message, parser) from ex


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` in ``argv`` (removed from it, in place) or ``MMALIGN_DEBUG`` set to a true value."""
    found = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return found or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def did_you_mean(name: str, choices: Iterable[str], n: int = 2) -> str:
    """``"; did you mean 'x'?"`` (or ``'x' or 'y'``) for the closest ``choices`` to ``name``, else ``""``."""
    choices = sorted({str(c) for c in choices})
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not close:  # a prefix or a dotted tail (``max_epoc`` -> ``max_epochs``)
        close = [c for c in choices if c.startswith(name) or name.startswith(c) and len(c) > 2][:n]
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""


# -- condensing jsonargparse's nested messages -----------------------------------------------------------------

_NOISE = re.compile(
    r"^\s*(- )?(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Expected a <class 'NoneType'>"
    r"|Given value type:|Given value:|Got value:)"
)
_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)$")
_OPTION = re.compile(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)")


def _class_params(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001 - a suggestion is best effort
        return []


def _condense_parse_error(message: str, parser: Any = None) -> str:
    """``Parser key "model": ... class_path 'projectors.MLP': Option 'hiden_dim' is not accepted`` ->
    ``model ... projector (projectors.MLP): no option 'hiden_dim'; did you mean 'hidden_dim'?``."""
    keys: list[str] = []
    classes: list[str] = []
    leaves: list[str] = []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or _NOISE.match(line):
            continue
        line = line.removeprefix("- ").strip()
        for pattern, store in ((_KEY, keys), (_CLASS, classes)):
            while (m := pattern.search(line)) is not None:
                store.append(m.group(1))
                line = m.group(2).strip()
        # a callable-typed projector nests "Type ... expects a function or a callable class: <reason>. Got value: ..."
        if "Got value:" in line and (m := re.search(r"class_path='([^']+)'", line)) is not None:
            classes.append(m.group(1))
        line = re.sub(r"^Type .* expects a function or a callable class:\s*", "", line)
        line = re.sub(r"\s*Got value: .*$", "", line)
        if line and not _NOISE.match(line) and line not in leaves:
            leaves.append(line)
    if not leaves:
        return message.strip().splitlines()[0] if message.strip() else message
    where = ".".join(keys)
    out = []
    for leaf in leaves[:3]:
        hint = ""
        if (m := _OPTION.search(leaf)) is not None:
            params = _class_params(classes[-1]) if classes else []
            leaf = f"{classes[-1]} has no option {m.group(1)!r}" if classes else leaf
            hint = did_you_mean(m.group(1), params)
            if params and not hint:
                hint = f" (it takes {', '.join(params)})"
        elif leaf.startswith("module ") and "has no attribute" in leaf:
            m = re.search(r"module '([^']+)' has no attribute '([^']+)'", leaf)
            if m:
                try:
                    names = [n for n in dir(importlib.import_module(m.group(1))) if not n.startswith("_")]
                except Exception:  # noqa: BLE001
                    names = []
                leaf = f"no class {m.group(1)}.{m.group(2)}"
                hint = did_you_mean(m.group(2), names)
                hint = hint.replace("'", f"'{m.group(1)}.", 1).replace(" or '", f" or '{m.group(1)}.") if hint else ""
        elif "either not accessible or invalid" in leaf:
            continue  # jsonargparse tried the value as a path to a config file too
        out.append(leaf + hint + _hints_in_message(leaf))
    text = "; ".join(out) if out else leaves[0]
    if where and not text.startswith(where):
        text = f"{where}: {text}"
    return text


def _known_options(parser: Any) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommand parsers."""
    known: list[str] = []
    for action in getattr(parser, "_actions", []):
        known += [s for s in getattr(action, "option_strings", []) if s.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                known += _known_options(sub)
    return known


def _unrecognized(message: str, parser: Any) -> str:
    """``unrecognized arguments: --trainer.maxx_epochs 4`` with the closest options of the parser."""
    args = message.split(":", 1)[1].split()
    options = [a for a in args if a.startswith("--")]
    known = _known_options(parser)
    parts = []
    for opt in options or args[:1]:
        parts.append(f"unknown option {opt.split('=')[0]}" + did_you_mean(opt.split("=")[0], known))
    return "; ".join(parts) or message


# -- exceptions raised after parsing ----------------------------------------------------------------------------

def _hints_in_message(text: str) -> str:
    """Suggestions for messages that list the names they accept (``tower 'teachr'; towers are ['student', ...]``,
    ``no rows in language(s) ['english']``)."""
    m = re.search(r"'([^']+)'[^\[\]]*?\b(?:are|is one of|has|known|choices|expected one of)\b[^\[\]]*\[([^\]]*)\]", text)
    if m and "did you mean" not in text:
        choices = re.findall(r"'([^']*)'", m.group(2))
        if m.group(1) not in choices:
            hint = did_you_mean(m.group(1), choices)
            if hint:
                return hint
    m = re.search(r"language\(s\) \[([^\]]*)\]", text)
    if m:
        try:
            from mmalign.data.langs import suggest_language  # noqa: PLC0415
        except ImportError:
            return ""
        hints = [f"{c!r} -> {s!r}" for c in re.findall(r"'([^']*)'", m.group(1)) if (s := suggest_language(c))]
        return f"; did you mean {', '.join(hints)}? (languages are ISO 639-1 codes)" if hints else ""
    return ""


def _missing_file(err: OSError, what: str | None = None) -> str:
    """``<what>: <path>`` + "no such directory: <folder>" when the folder is missing too, else the closest names
    in the folder."""
    text = what + ": " + str(err.filename) if what else str(err)
    path = getattr(err, "filename", None)
    if not path:
        m = re.search(r"(?:not found|does not exist|no such file)[^:]*:\s*'?([^'\s]+)'?\s*$", text, re.IGNORECASE)
        path = m.group(1) if m else None
    if not path:
        return text
    p = Path(str(path))
    parent = p.parent
    if str(parent) not in ("", ".") and not parent.is_dir():
        return f"{text} (no such directory: {parent})"
    try:
        names = [c.name for c in parent.iterdir()]
    except OSError:
        return text
    close = difflib.get_close_matches(p.name, sorted(names), n=2, cutoff=0.6)
    if not close:
        return text
    shown = [str(parent / c) if str(parent) not in ("", ".") else c for c in close]
    return text + "; did you mean " + " or ".join(repr(c) for c in shown) + "?"


def _accelerator(text: str) -> str | None:
    if re.search(r"gpu backend|CUDAAccelerator can not run|No supported gpu|cuda.*not available", text, re.IGNORECASE):
        return (f"{text.rstrip('!.')}: no GPU is visible to torch here (torch.cuda.is_available() is False); "
                "use --trainer.accelerator cpu (or auto), or run on a machine with a GPU")
    return None


def readable(err: BaseException) -> str | None:
    """The one-paragraph message for a user mistake, or None when ``err`` should keep its traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, ConfigError):
        msg = err.message
        if msg.startswith("unrecognized arguments"):
            return _unrecognized(msg, err.parser)
        if (m := re.search(r"does not accept option '([^']+)'", msg)) is not None:  # a key in a YAML file
            known = [o.removeprefix("--") for o in _known_options(err.parser)]
            return f"unknown key {m.group(1)!r} (in a --config file or on the command line)" + did_you_mean(m.group(1), known)
        if 'Parser key "config"' in msg or "File does not exist" in msg:
            m = re.search(r"File does not exist: '([^']+)'", msg)
            if m:
                return _missing_file(FileNotFoundError(2, "no such file", m.group(1)), "no such config file")
        return _condense_parse_error(msg, err.parser)
    if isinstance(err, argparse.ArgumentError) or "Does not validate against any of the Union subtypes" in str(err) \
            or str(err).startswith('Parser key "'):
        return _condense_parse_error(str(err))
    if isinstance(err, MisconfigurationException):
        return _accelerator(str(err)) or str(err)
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return _missing_file(err)
    if isinstance(err, ValueError):  # ManifestError, ExportError, BadInputError, ... and mmalign's checks
        text = str(err)
        return _accelerator(text) or text + _hints_in_message(text)
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"{err}: an optional dependency is missing (pip install -e '.[offline,data,generate]' has them all)"
    return None


def exit_readably(err: BaseException, command: str) -> NoReturn:
    """Print ``mmalign <command>: error: ...`` for a user mistake and exit 2; re-raise anything else."""
    import sys

    message = readable(err)
    if message is None:
        raise err
    print(f"mmalign {command}: error: {message}\n"
          f"  (mmalign {command} --help lists the options; add --debug or set {DEBUG_ENV}=1 for the full traceback)",
          file=sys.stderr)
    raise SystemExit(2)
