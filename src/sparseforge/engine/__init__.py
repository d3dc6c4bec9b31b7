"""The sparse compiler: trace -> fold -> plan -> codegen -> build -> run."""

from .artefact import load_engine, save_engine
from .compiler import Stages, compile
from .runtime import CompiledModel

__all__ = ["compile", "CompiledModel", "Stages", "load_engine", "save_engine"]
