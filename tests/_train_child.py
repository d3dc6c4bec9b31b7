"""Child process for the resume test: trains, and SIGKILLs itself at a given step to simulate a crash."""

import os
import signal
import sys

from sparseforge.api import train
from sparseforge.train import Callback, TrainConfig


class KillAt(Callback):
    name = "killat"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run_dir, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    cfg = TrainConfig.from_toml(open(sys.argv[4]).read())
    train(cfg, run_dir, resume=resume, callbacks=[KillAt(kill_at)] if kill_at > 0 else [], progress=False)
