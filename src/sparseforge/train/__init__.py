"""Training: the loop, callbacks, schedules and checkpoints."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import Callback, Trainer, build_optimizer, evaluate
from .schedule import lr_factor

__all__ = ["TrainConfig", "Trainer", "Callback", "evaluate", "build_optimizer", "lr_factor",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint"]
