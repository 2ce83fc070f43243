"""The ``mmalign`` command line: ``main`` dispatches LightningCLI subcommands and the plain-function tools."""

from mmalign.cli.main import main

__all__ = ["main"]
