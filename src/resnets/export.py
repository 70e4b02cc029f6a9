"""Hand a model on to other runtimes: ONNX (onnxruntime, TensorRT, ...) or TorchScript (C++)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write
from .weights import model_from_weights

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17  # supported by every onnxruntime of the last years; the nets need nothing newer


def build_for_export(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """`create_model(name)` in eval mode, or the model `weights` (any supported layout) holds."""
    from .registry import create_model

    if weights is None:
        return create_model(name).eval()
    return model_from_weights(weights, name)[0]


def export(model: nn.Module, out: str | os.PathLike, fmt: str, input_size: int = 224) -> dict[str, Any]:
    """Write `model` as ONNX or TorchScript with a dynamic batch dimension.

    The file is built in memory and written with `atomic_write`: an existing `out` is replaced
    whole or, if the write fails (full disk, read-only folder) or is killed, kept as it was."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    model = model.eval()
    example = torch.randn(2, 3, input_size, input_size)
    out = Path(out)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # Both exporters warn that they are superseded by torch.export; their output is still the
        # format the consumers of these files read.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|legacy TorchScript-based ONNX).*")
        # Option-A shortcuts slice with a step; the exporter only notes it cannot pre-compute that.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        if fmt == "onnx":
            torch.onnx.export(
                model,
                (example,),
                buf,
                dynamo=False,  # the torch.export-based exporter needs onnxscript, not a dependency
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
            )
        else:
            # Tracing records one path through the net; ours has no data-dependent control flow,
            # and no op reads the batch size, so the batch stays free.
            torch.jit.save(torch.jit.trace(model, example), buf)
    atomic_write(out, lambda f: f.write(buf.getbuffer()))
    return {"format": fmt, "out": str(out), "input": ["batch", 3, input_size, input_size]}
