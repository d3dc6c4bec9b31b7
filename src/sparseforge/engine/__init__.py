"""The sparse compiler: trace -> fold -> plan -> codegen -> build -> run."""

from .artefact import save_engine
from .compiler import Stages, compile, load_engine
from .plan import PlanOptions
from .qdq import export_qdq
from .quant import Int8Config, QuantizedModel, quantize
from .runtime import CompiledModel

__all__ = ["compile", "CompiledModel", "Stages", "PlanOptions", "load_engine", "save_engine", "quantize",
           "Int8Config", "QuantizedModel", "export_qdq"]
