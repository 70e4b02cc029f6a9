"""Hand a model on to other runtimes: ONNX (onnxruntime, TensorRT, ...), TorchScript (C++) or
OpenVINO IR (an .xml and a .bin beside it).

Every file carries the model's preprocessing in its metadata (`resnets.preprocess.METADATA_KEYS`,
the same keys in each format), takes any batch and image size unless exported `static`, and is
run against PyTorch on one batch before it is written: a file that does not compute what the
model computes never replaces anything.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write, atomic_write_files, load_model_file
from .errors import ResnetsError
from .preprocess import Preprocessing, preprocessing_for
from .weights import model_from_weights

FORMATS = ("onnx", "torchscript", "openvino")
EXTENSIONS = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts"), "openvino": (".xml",)}
# The modules each format needs beyond torch (to write the file and to run it), and the extra
# that installs them.
RUNTIMES = {"onnx": ("onnx", "onnxruntime"), "torchscript": (), "openvino": ("openvino",)}
ONNX_OPSET = 17  # supported by every onnxruntime of the last years; the nets need nothing newer
# Largest difference from PyTorch an export may show, relative to the largest logit where that is
# above 1: float32 kernels that add in another order differ by ~1e-6 of the values they sum.
TOLERANCE = 1e-4
# Dynamic exports are traced at batch 2 (a batch of 1 invites size-1 special cases into the
# graph) and checked at batch 3, which the trace never saw.
TRACE_BATCH = 2


class ExportError(ResnetsError):
    """A model that cannot be exported as asked, or an export that does not match the model."""


def format_of(path: str | os.PathLike) -> str | None:
    """The format `path`'s extension names, or None."""
    suffix = Path(path).suffix.lower()
    return next((fmt for fmt, exts in EXTENSIONS.items() if suffix in exts), None)


def check_request(fmt: str | None, out: str | os.PathLike, static: bool = False) -> str:
    """The format to write (`fmt`, or the one `out`'s extension names), checked against `out`'s
    extension, `static` and the installed runtimes; an `ExportError` saying what to change."""
    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    named = format_of(out)
    if fmt is None and named is None:
        raise ExportError(
            f"cannot tell the format from {out}: name it *.onnx, *.pt (TorchScript) or *.xml (OpenVINO), "
            "or give --format"
        )
    fmt = fmt or named
    if Path(out).suffix.lower() not in EXTENSIONS[fmt]:
        raise ExportError(f"{out}: {fmt} files are named *{' or *'.join(EXTENSIONS[fmt])}")
    if static and fmt == "torchscript":
        raise ExportError("--static is for onnx and openvino; a TorchScript trace takes any input size")
    check_runtime(fmt)
    return fmt


def check_runtime(fmt: str) -> None:
    """An `ExportError` naming the extra to install when `fmt`'s writer or runtime is missing."""
    missing = [m for m in RUNTIMES[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{fmt} export needs {' and '.join(missing)}: pip install 'resnets[{fmt}]'")


def output_files(out: str | os.PathLike, fmt: str) -> list[Path]:
    """The files an export writes: OUT, and for OpenVINO its weights OUT.bin beside it."""
    out = Path(out)
    return [out, out.with_suffix(".bin")] if fmt == "openvino" else [out]


def load_source(
    source: str, weights: str | os.PathLike | None = None
) -> tuple[nn.Module, Preprocessing, str]:
    """The model to export and its preprocessing, from a training run (its folder,
    `model.safetensors` or `last.ckpt`: built from the file's own spec, with the run's
    normalisation, size and class names) or a registered name (with `weights` in any supported
    layout, or random weights). The third value says which: "run", "weights" or "random"."""
    from .registry import ENTRIES, create_model, get_entry

    path = Path(source)
    if weights is None and path.exists():
        if path.is_file() and path.suffix not in (".safetensors", ".ckpt"):
            raise ExportError(
                f"{source} is not a resnets run file (.safetensors or .ckpt); for weights in another "
                f"layout give the model's name and --weights {source}"
            )
        model, meta = load_model_file(path)
        return model, preprocessing_for(model, meta), "run"
    if source in ENTRIES:
        if weights is None:
            model = create_model(source).eval()
            return model, preprocessing_for(model), "random"
        model = model_from_weights(weights, source)[0]
        return model, preprocessing_for(model), "weights"
    if weights is not None and path.exists():
        raise ExportError(f"--weights goes with a model name; {source} holds weights of its own")
    if weights is None and (os.sep in source or path.suffix in (".safetensors", ".ckpt", ".pth", ".pt")):
        raise ExportError(f"{source} does not exist")
    get_entry(source)  # an unknown name: raises with the closest names
    raise ExportError(f"{source} is neither a model name nor a file")


def export(
    model: nn.Module,
    out: str | os.PathLike,
    fmt: str,
    input_size: int | None = None,
    *,
    preprocessing: Preprocessing | None = None,
    static: bool = False,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Write `model` as ONNX, TorchScript or OpenVINO IR, check it, and say what was written.

    The input is `(batch, in_chans, height, width)`, batch and image size free; `static=True`
    fixes them to `(batch_size, in_chans, input_size, input_size)` (ONNX and OpenVINO; a
    TorchScript trace takes what the network takes). `input_size` defaults to the
    preprocessing's (the training run's, or the model's 32 / 224). The preprocessing
    (`preprocessing`, default `preprocessing_for(model)`) goes into the file's metadata.

    Before anything is written, the file's bytes are run (onnxruntime, `torch.jit.load`,
    OpenVINO's CPU plugin in f32) on one batch against PyTorch; a difference beyond `TOLERANCE`
    is an `ExportError`. The bytes are then written with `atomic_write` (OpenVINO's pair with
    `atomic_write_files`): an existing file is replaced whole or, if the write fails (full disk,
    read-only folder) or is killed, kept as it was."""
    check_request(fmt, out, static)
    model = model.eval()
    prep = (preprocessing or preprocessing_for(model)).with_input_size(input_size)
    c, s = prep.in_chans, prep.input_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size if static else TRACE_BATCH, c, s, s, generator=gen)
    batch = example if static else torch.randn(TRACE_BATCH + 1, c, s, s, generator=gen)
    with torch.no_grad():
        expected = model(batch.to(device)).float().cpu().numpy()
    with _quiet_exporters(), torch.no_grad():
        files, run, runtime = WRITERS[fmt](model, example.to(device), prep.metadata(), static)
    got = run(batch.numpy())
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    allowed = TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if not diff <= allowed:  # also NaN
        shape = (
            f"shape {tuple(got.shape)} instead of {tuple(expected.shape)}, " if diff == float("inf") else ""
        )
        raise ExportError(
            f"the {fmt} export does not compute what the model does ({shape}max abs difference {diff:.3g} "
            f"on a batch of {tuple(batch.shape)}, {allowed:.3g} allowed); nothing was written"
        )
    paths = output_files(out, fmt)
    if len(paths) == 1:
        atomic_write(paths[0], lambda f: f.write(files[0]))
    else:
        atomic_write_files({p: (lambda f, blob=blob: f.write(blob)) for p, blob in zip(paths, files)})
    shape = list(example.shape) if static else ["batch", c, "height", "width"]
    return {
        "format": fmt,
        "out": str(out),
        "files": [str(p) for p in paths],
        "input": shape,
        "example": list(example.shape),
        "runtime": runtime,
        "checked_on": list(batch.shape),
        "max_abs_diff": diff,
        "metadata": prep.metadata(),
    }


class _quiet_exporters(warnings.catch_warnings):
    def __enter__(self):
        super().__enter__()
        # The exporters warn that they are superseded by torch.export; their output is still the
        # format the consumers of these files read.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|legacy TorchScript-based ONNX).*")
        # Option-A shortcuts slice with a step; the exporter only notes it cannot pre-compute that.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")


Runner = Callable[[np.ndarray], np.ndarray]


def _onnx(
    model: nn.Module, example: torch.Tensor, meta: dict[str, str], static: bool
) -> tuple[list[bytes], Runner, str]:
    import onnx
    import onnxruntime as ort

    buf = io.BytesIO()
    free = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    torch.onnx.export(
        model,
        (example,),
        buf,
        dynamo=False,  # the torch.export-based exporter needs onnxscript, not a dependency
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=None if static else free,
        opset_version=ONNX_OPSET,
    )
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, meta)
    blob = proto.SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return [blob], lambda x: session.run(None, {"input": x})[0], f"onnxruntime {ort.__version__}"


def _torchscript(
    model: nn.Module, example: torch.Tensor, meta: dict[str, str], static: bool
) -> tuple[list[bytes], Runner, str]:
    # Tracing records one path through the net; ours has no data-dependent control flow, and no
    # op reads the batch or image size, so both stay free.
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, example), buf, _extra_files=meta)
    blob = buf.getvalue()
    loaded = torch.jit.load(io.BytesIO(blob), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).float().numpy()

    return [blob], run, f"torch.jit.load (torch {torch.__version__})"


def _openvino(
    model: nn.Module, example: torch.Tensor, meta: dict[str, str], static: bool
) -> tuple[list[bytes], Runner, str]:
    import openvino as ov

    converted = ov.convert_model(model, example_input=example)
    n, c, h, w = example.shape
    converted.reshape({converted.inputs[0]: ov.PartialShape([n, c, h, w] if static else [-1, c, -1, -1])})
    converted.inputs[0].get_tensor().set_names({"input"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    for key, value in meta.items():
        converted.set_rt_info(value, key)
    # save_model writes to paths only: it goes to a private temporary folder, and the bytes are
    # written into place by atomic_write_files (whose errors say what a full disk is).
    with tempfile.TemporaryDirectory(prefix="resnets-openvino-") as tmp:
        xml = Path(tmp) / "model.xml"
        try:
            ov.save_model(converted, xml, compress_to_fp16=False)  # keep float32 weights
        except RuntimeError as exc:
            raise ExportError(f"OpenVINO could not save the model in {tmp} ({str(exc).strip()})") from None
        blobs = [xml.read_bytes(), xml.with_suffix(".bin").read_bytes()]
    core = ov.Core()
    weights = ov.Tensor(np.frombuffer(blobs[1], dtype=np.uint8).copy())
    compiled = core.compile_model(
        core.read_model(blobs[0].decode(), weights), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    return blobs, lambda x: compiled(x)[0], f"OpenVINO {ov.get_version().split('-')[0]} CPU"


WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "openvino": _openvino}
