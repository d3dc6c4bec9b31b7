"""sparseforge: make convolutional networks small and measurably fast on CPUs."""

__version__ = "0.1.0"

from .errors import SparseforgeError  # noqa: E402
from .models import create_model, load_model, load_weights, reparameterize  # noqa: E402
from .engine import CompiledModel, Int8Config, QuantizedModel, compile, export_qdq, load_engine, quantize  # noqa: E402
from .sparsity import ADMMConfig, MagnitudeConfig, Mask, PatternConfig, fold_masks, prune  # noqa: E402
from . import structured  # noqa: E402  (registers StructuredConfig with prune)
from .structured import DepthConfig, EarlyBirdConfig, GroupLassoConfig, StructuredConfig  # noqa: E402
from .lowbit import Pow2Config, ProgressivePrecisionConfig  # noqa: E402
from . import distill, regularize, report  # noqa: E402

__all__ = ["__version__", "SparseforgeError", "create_model", "load_model", "load_weights", "reparameterize", "prune", "fold_masks", "Mask",
           "PatternConfig", "ADMMConfig", "MagnitudeConfig", "compile", "load_engine", "CompiledModel", "quantize", "Int8Config", "QuantizedModel", "export_qdq", "structured", "StructuredConfig", "DepthConfig", "GroupLassoConfig", "EarlyBirdConfig",
           "Pow2Config", "ProgressivePrecisionConfig", "distill", "regularize", "report"]
