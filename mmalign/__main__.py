"""``python -m mmalign ...`` is ``mmalign ...``."""

from mmalign.cli.main import main

main()
