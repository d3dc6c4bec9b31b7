"""Child process for the recipe resume test: runs a recipe, SIGKILLs itself at a global step of one stage."""

import os
import signal
import sys

from sparseforge.recipe import Recipe, RecipeRunner
from sparseforge.train import Callback


class KillAt(Callback):
    name = "killat"

    def __init__(self, stage_marker: str, step: int):
        self.marker, self.step = stage_marker, step

    def on_step_end(self, trainer):
        if self.marker in str(trainer.run_dir) and trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    recipe_path, run_dir, marker, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cbs = (KillAt(marker, step),) if step > 0 else ()
    RecipeRunner(Recipe.load_file(recipe_path), run_dir, progress=False, callbacks=cbs).run(resume=True)
