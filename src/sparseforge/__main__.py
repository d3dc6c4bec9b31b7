"""``python -m sparseforge``: the same CLI as the ``sparseforge`` entry point (for environments without scripts on
PATH, and ``python -m`` under torchrun)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
