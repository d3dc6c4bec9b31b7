"""Recipe stages: every method a recipe can name is a registered ``StageMethod`` (see ``base``).

The modules below register the built-in stages when imported; a stage defined anywhere else registers itself
the same way (one decorator), and the recipe finds it by name.
"""

from . import lowbit, measure, sparsity, structured, training, tickets  # noqa: F401  (registers the stages)
from .base import STAGES, Stage, StageMethod, register_stage, stage_configs
from .context import RunState, StageContext, load_stage_model, save_model, write_json, write_text
from .measure import CompileConfig, RobustnessConfig
from .training import FinetuneConfig

__all__ = ["STAGES", "Stage", "StageMethod", "StageContext", "RunState", "register_stage", "stage_configs",
           "CompileConfig", "RobustnessConfig", "FinetuneConfig", "load_stage_model", "save_model", "write_json", "write_text"]
