"""The inference engines behind `resnets.deploy`: OpenVINO, onnxruntime, and int8 quantization.

Each engine takes the folded eager network (`resnets.deploy` has already folded BN) and runs it
on torch tensors, returning torch tensors; what it needs to build for a new input shape it builds
in `prepare(shape)`. The inductor engine (torch.compile) lives in `resnets.deploy`; here are the
ones that hand the network to another runtime, and the two int8 flows:

- onnxruntime: the ONNX file of `resnets.export` (dynamic batch) in an `InferenceSession` with
  every graph optimisation on and the process's thread count;
- openvino: `openvino.convert_model` (dynamic batch) + `compile_model` on the CPU, latency hint,
  the process's thread count, fp32 precision unless bf16 is asked for. (OpenVINO's
  torch.compile backend was the other way in; with torch 2.14 it fails while building dynamo's
  guards, so the converted model is the one used);
- int8, OpenVINO: NNCF post-training static quantization of the converted model (with the full
  bias correction);
- int8, inductor: PyTorch's PT2E flow with the X86InductorQuantizer (torchao's copy where
  installed, else torch.ao's), then torch.compile with freezing, which lowers the quantized
  patterns to oneDNN int8 kernels.

A backend whose package is missing raises `BackendUnavailable`, naming the extra to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

BACKENDS = ("inductor", "openvino", "onnxruntime")
PRECISIONS = ("float32", "bfloat16", "int8")

# (backend, precision) -> (the modules it imports, the extra of this package that installs them).
_NEEDS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("openvino", "float32"): (("openvino",), "openvino"),
    ("openvino", "bfloat16"): (("openvino",), "openvino"),
    ("openvino", "int8"): (("openvino", "nncf"), "openvino"),
    ("onnxruntime", "float32"): (("onnxruntime",), "onnx"),
    ("inductor", "int8"): (("torchao",), "int8"),
}
# Which precisions each backend runs; onnxruntime's CPU kernels have no bf16 convolutions, and its
# int8 flow (QDQ models) is not wired up here: OpenVINO and inductor cover int8.
SUPPORTED = {
    "inductor": ("float32", "bfloat16", "float16", "int8"),
    "openvino": ("float32", "bfloat16", "int8"),
    "onnxruntime": ("float32",),
}


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here: its package is not installed, or it does not run this case."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _int8_inductor_missing() -> str | None:
    """Why the PT2E int8 flow cannot run here, or None."""
    if not hasattr(torch.export, "Dim") or not hasattr(torch.export.Dim, "AUTO"):
        return f"int8 on inductor needs torch >= 2.6 (this is {torch.__version__}); use backend='openvino'"
    if _has("torchao") or _has("torch.ao.quantization.quantize_pt2e"):
        return None
    return "int8 on inductor needs torchao (PT2E quantization left torch.ao): pip install 'resnets[int8]'"


def unavailable(backend: str, precision: str, device: torch.device) -> str | None:
    """Why `backend` cannot run `precision` on `device` here, or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
    if precision not in SUPPORTED[backend]:
        runs = ", ".join(SUPPORTED[backend])
        return f"backend {backend!r} runs {runs} here, not {precision}"
    if backend != "inductor" and device.type != "cpu":
        return f"backend {backend!r} runs on the CPU; the model is on {device.type}"
    if backend == "inductor" and precision == "int8":
        if device.type != "cpu":
            return f"int8 deploy runs on the CPU; the model is on {device.type}"
        return _int8_inductor_missing()
    needs = _NEEDS.get((backend, precision))
    if needs is not None:
        missing = [m for m in needs[0] if not _has(m)]
        if missing:
            return f"backend {backend!r} needs {' and '.join(missing)}: pip install 'resnets[{needs[1]}]'"
    return None


def require(backend: str, precision: str, device: torch.device) -> None:
    """Raise `BackendUnavailable` with the reason when `backend` cannot run `precision` here."""
    why = unavailable(backend, precision, device)
    if why is not None:
        raise BackendUnavailable(why)


def _example(shape: Sequence[int]) -> torch.Tensor:
    """A normal (not inference-mode) input of `shape` for the exporters to trace with."""
    with torch.inference_mode(False):
        return torch.randn(*shape)


def calibration_batches(batches: Iterable, limit: int = 1024) -> list[torch.Tensor]:
    """The input tensors of `batches` (tensors, or (input, label) pairs) as float32 batches, at
    most `limit` images in all: enough for activation ranges, few enough to stay quick."""
    out, n = [], 0
    for item in batches:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError("calibration must yield image batches (N, C, H, W), or (batch, labels) pairs")
        with torch.inference_mode(False):
            x = x.detach().float().cpu().contiguous().clone()
        out.append(x[: limit - n])
        n += len(out[-1])
        if n >= limit:
            break
    if not out:
        raise ValueError("calibration is empty: pass a few batches of typical inputs")
    shapes = {tuple(x.shape[1:]) for x in out}
    if len(shapes) > 1:
        raise ValueError(f"calibration batches differ in image shape: {sorted(shapes)}")
    return out


def _numpy_input(x: torch.Tensor):
    return x.detach().to(torch.float32).contiguous().cpu().numpy()


# --- onnxruntime ------------------------------------------------------------------------------


class OnnxRuntimeEngine:
    """The network as ONNX (`resnets.export`, dynamic batch) in one onnxruntime session per image shape."""

    name = "onnxruntime"

    def __init__(self, net: nn.Module, threads: int):
        self.net, self.threads = net, threads
        self.sessions: dict[tuple[int, ...], object] = {}

    def prepare(self, shape: Sequence[int]) -> None:
        key = tuple(shape[1:])
        if key in self.sessions:
            return
        import onnxruntime as ort

        from .export import export

        c, h, w = key
        if h != w or c != 3:
            raise BackendUnavailable(f"onnxruntime: the ONNX export takes square 3-channel images, not {key}")
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False):
            path = Path(tmp) / "model.onnx"
            export(self.net, path, "onnx", input_size=h)
            data = path.read_bytes()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1  # one chain of convs: parallelism is inside each op
        opts.log_severity_level = 3
        self.sessions[key] = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare(x.shape)
        out = self.sessions[tuple(x.shape[1:])].run(None, {"input": _numpy_input(x)})[0]
        return torch.from_numpy(out)


# --- OpenVINO ---------------------------------------------------------------------------------


def _quiet_nncf() -> None:
    import nncf

    nncf.set_log_level(logging.ERROR)


class OpenVinoEngine:
    """The network converted to OpenVINO (dynamic batch), compiled for the CPU; int8 through NNCF."""

    name = "openvino"

    def __init__(
        self,
        net: nn.Module,
        precision: str,
        threads: int,
        calibration: list[torch.Tensor] | None = None,
        config: dict | None = None,
    ):
        if precision == "int8" and not calibration:
            raise ValueError("int8 needs calibration batches")
        self.net, self.precision, self.threads, self.calibration = net, precision, threads, calibration
        self.extra_config = dict(config or {})  # more CPU plugin properties, e.g. PERF_COUNT
        self.requests: dict[tuple[int, ...], object] = {}

    def prepare(self, shape: Sequence[int]) -> None:
        key = tuple(shape[1:])
        if key in self.requests:
            return
        import openvino as ov

        net = self.net
        if next(net.parameters()).dtype != torch.float32:  # bf16 deploy: OpenVINO gets fp32 and a hint
            import copy

            net = copy.deepcopy(net).float()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # OpenVINO's converter traces with torch.jit.trace, which torch warns is deprecated: a
            # note to OpenVINO, not to the user of deploy().
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
            model = ov.convert_model(
                net, example_input=_example((1, *key)), input=[ov.PartialShape([-1, *key])]
            )
        if self.precision == "int8":
            import nncf

            calib_key = tuple(self.calibration[0].shape[1:])
            if calib_key != key:
                raise BackendUnavailable(f"openvino int8 was calibrated on {calib_key} images, not {key}")
            _quiet_nncf()
            data = nncf.Dataset([_numpy_input(x) for x in self.calibration])
            # The full bias correction, not NNCF's fast one: on a CIFAR-10 ResNet-20 the fast one
            # left 94.7% top-1 agreement with fp32 on 2,000 test images, the full one 99.1%.
            with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars (rich) write to stdout
                model = nncf.quantize(
                    model, data, subset_size=len(self.calibration), fast_bias_correction=False
                )
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            # OpenVINO would run an fp32 model in bf16 on a CPU that has it; fp32 means fp32 here.
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bfloat16" else "f32",
            **self.extra_config,
        }
        self.requests[key] = ov.Core().compile_model(model, "CPU", config).create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare(x.shape)
        request = self.requests[tuple(x.shape[1:])]
        request.infer({0: _numpy_input(x)}, share_inputs=True)
        # The request reuses its output buffer on the next call: copy out.
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


# --- int8 with PT2E (inductor) ----------------------------------------------------------------


def _pt2e_api():
    """prepare_pt2e, convert_pt2e and the X86 quantizer module: torchao's, else torch.ao's."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        try:
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as x86
        except ImportError:
            raise BackendUnavailable(_int8_inductor_missing() or "no PT2E quantization found") from None
    return prepare_pt2e, convert_pt2e, x86


_PARTITION_TYPES = (nn.Conv2d, nn.Linear, nn.ReLU)


def _one_partition_per_call(gm: torch.fx.GraphModule) -> None:
    """Give each call of a leaf module its own source partition.

    The quantizer finds conv -> add -> ReLU patterns by source partitions. Without dynamo's
    `source_fn_stack` (torch.export of torch >= 2.10), they are grouped by the calling module's
    name, so a block's one ReLU module applied twice becomes one partition with two outputs, which
    the quantizer refuses ("Input partition has more than one output node").
    """
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.meta.get("source_fn_stack") is not None:
            continue
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        fqn, cls = list(stack.values())[-1]
        if isinstance(cls, str):  # "torch.nn.modules.activation.ReLU"
            cls = getattr(nn, cls.rpartition(".")[2], None) if cls.startswith("torch.nn.") else None
        if isinstance(cls, type) and issubclass(cls, _PARTITION_TYPES):
            node.meta["source_fn_stack"] = [(f"{fqn}/{node.name}", cls)]


def _has_vnni() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else True


def _x86_config(x86):
    """X86InductorQuantizer's default config; on a CPU without VNNI, activations get 7 bits.

    Without VNNI, oneDNN's u8 x s8 convolutions multiply-add pairs into int16 (AVX2
    `vpmaddubsw`), which saturates when both operands use their full range (2 x 255 x 127 >
    32767). Halving the activations' range keeps every pair in range, as fbgemm's `reduce_range`
    does. Measured on a 2-core AVX2 EPYC, CIFAR-10 ResNet-20, 10,000 test images: top-1
    agreement with fp32 91.2% with 8-bit activations once inductor lowers the graph (99.0% for the
    same graph run eagerly), 98.5% with 7 bits, lowered or not.
    """
    from dataclasses import replace

    config = x86.get_default_x86_inductor_quantization_config()
    if _has_vnni():
        return config
    act = replace(config.input_activation, quant_min=0, quant_max=127)
    return replace(config, input_activation=act)


def quantize_pt2e(net: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """`net` (folded, eval) as a PT2E int8 graph: symmetric per-channel int8 weights, uint8
    activations with ranges observed on `calibration` (X86InductorQuantizer's defaults; 7-bit
    activations on a CPU without VNNI, see `_x86_config`)."""
    missing = _int8_inductor_missing()
    if missing:
        raise BackendUnavailable(missing)
    prepare_pt2e, convert_pt2e, x86 = _pt2e_api()
    with torch.inference_mode(False), torch.no_grad():
        example = calibration[0]
        # run_decompositions({}) makes relu_/add_ functional, as the quantizer's patterns expect;
        # a free batch dimension lets calibration and inputs differ in batch size.
        exported = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        gm = exported.run_decompositions({}).module()
        _one_partition_per_call(gm)
        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(_x86_config(x86))
        prepared = prepare_pt2e(gm, quantizer)
        for x in calibration:
            prepared(x)
        return convert_pt2e(prepared)
