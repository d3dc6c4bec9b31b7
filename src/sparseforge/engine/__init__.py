"""The sparse compiler: trace -> fold -> plan -> codegen -> build -> run."""

from .compiler import Stages, compile
from .runtime import CompiledModel

__all__ = ["compile", "CompiledModel", "Stages"]
