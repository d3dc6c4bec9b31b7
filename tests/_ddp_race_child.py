"""``sparseforge.cli`` under torchrun with rank 1 held back 3 s at the point where a rank used to decide on its own
whether a file rank 0 writes exists: ``recipe`` before the start evaluation (start.json), ``train`` before the run
directory's config.toml is looked at. With per-rank decisions the late rank saw rank 0's file, skipped the barrier
rank 0 waited in (recipe: both ranks hung in different collectives) or refused the run as an existing one (train)."""

import os
import sys
import time

import sparseforge.recipe as recipe
import sparseforge.utils as utils
from sparseforge.cli import main

SLOW = int(os.environ.get("RANK", "0")) != 0

if SLOW:
    _state, _resolve = recipe.RecipeRunner._state, utils.resolve_device

    def late_state(self):
        st = _state(self)
        time.sleep(3)
        return st

    def late_resolve(*a, **k):
        time.sleep(3)
        return _resolve(*a, **k)

    recipe.RecipeRunner._state = late_state
    utils.resolve_device = late_resolve

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
