"""``python -m mmalign.cli ...`` is ``mmalign ...``."""

from mmalign.cli.main import main

main()
