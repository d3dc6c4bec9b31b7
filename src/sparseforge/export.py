"""Export for other runtimes: ONNX of the folded model (masks baked in; BN folded by the exporter/runtime)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
import torch.nn as nn

from .errors import SparseforgeError
from .sparsity import fold_masks


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path | None = None,
                opset: int = 17) -> bytes:
    """ONNX bytes (and file, when ``path`` is given) of ``model`` with masks folded; batch is dynamic."""
    m = fold_masks(copy.deepcopy(model)).eval()
    f = io.BytesIO()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (example_input,), f, dynamo=False, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset)
    except ImportError as e:
        raise SparseforgeError(f"ONNX export needs the 'onnx' package ({e}); pip install 'sparseforge[bench]'") from None
    data = f.getvalue()
    if path is not None:
        from .utils import atomic_write_bytes

        atomic_write_bytes(Path(path), data)
    return data
