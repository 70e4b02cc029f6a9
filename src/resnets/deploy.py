"""Inference-ready models: BatchNorm folded into convs, channels-last, compiled, optional bf16.

`deploy(model)` never touches `model`: it works on a deep copy. Folding is explicit: every block
class lists in `fold_pairs()` the (conv, BN) pairs whose BN reads exactly that conv's output;
the conv gets the BN's scale and shift (a biased conv) and the BN becomes `nn.Identity`, so each
block's own forward still runs unchanged. BNs that precede a conv (pre-activation) or follow an
add (iResNet end blocks) are left alone: folding them would change the function.

On the CPU, a convolution with a large weight and few output pixels (the last stage of an
ImageNet net at small batch: 1024 x 1024 x 3 x 3 over a 7 x 7 map) runs 2-3x faster as one matrix
multiply over gathered patches than through the convolution kernel (measured: 43 against 139
GFLOP/s on a 2-core AVX-512 machine; benchmarks/gemm_conv.py). Which path wins depends on the
machine and the shape, so `deploy` times both for every such conv at the first call with each
input shape and keeps the faster (`GemmConv2d`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import types
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .engines import (
    BACKENDS,
    BackendUnavailable,
    OnnxRuntimeEngine,
    OpenVinoEngine,
    calibration_batches,
    quantize_pt2e,
    require,
)
from .engines import unavailable as unavailable_reason

__all__ = [
    "BackendUnavailable",
    "Deployed",
    "GemmConv2d",
    "choose_conv_paths",
    "conv_as_gemm",
    "deploy",
    "fold_batchnorm",
    "fold_pairs",
]


def fold_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Full attribute paths of every (conv, BN) pair the model's modules declare foldable."""
    pairs = []
    for prefix, module in model.named_modules():
        declare = getattr(module, "fold_pairs", None)
        if callable(declare):
            dot = f"{prefix}." if prefix else ""
            pairs += [(dot + conv, dot + bn) for conv, bn in declare()]
    return pairs


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Give `conv` the affine map of `bn` (eval mode: running statistics)."""
    # float64 so that folding adds no rounding of its own beyond the final cast.
    w = conv.weight.detach().double()
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    if conv.bias is not None:
        shift = shift + conv.bias.detach().double() * scale
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(
        (w * scale.view(-1, 1, 1, 1)).to(dtype), requires_grad=conv.weight.requires_grad
    )
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every declared (conv, BN) pair; returns how many were folded.

    A pair whose BN is already an Identity (folded before) is skipped, so folding twice is harmless.
    The model must be in eval mode: a BN in training mode normalises by batch statistics, which
    no fixed conv can reproduce.
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        raise ValueError("fold_batchnorm needs the model in eval mode (call model.eval() first)")
    folded = 0
    for conv_path, bn_path in fold_pairs(model):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != bn.num_features:
            raise ValueError(f"{conv_path} -> {bn_path} is declared foldable but is not a matching conv/BN")
        if bn.running_mean is None or bn.running_var is None:
            continue  # no running statistics: eval mode still uses batch statistics
        _fold_into(conv, bn)
        parent_path, _, attr = bn_path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, nn.Identity())
        folded += 1
    return folded


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def low_precision_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` runs `dtype` convolutions natively (not emulated at a fraction of fp32 speed)."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        check = {
            torch.bfloat16: "_is_mkldnn_bf16_supported",
            torch.float16: "_is_mkldnn_fp16_supported",
        }.get(dtype)
        return check is not None and bool(getattr(torch.ops.mkldnn, check)())
    return False


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own.

    Dynamo keeps compiled graphs, and counts recompilations against its limit (8), per code
    object. Compiling the model itself would file every deployment under the one shared
    `ResNet.forward`, so the ninth deployed model (or shape) in a process would silently run
    eager; a private entry point per deployment keeps each one's graphs apart.
    """
    code = fn.__code__.replace()  # an equal but distinct code object
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _out_size(n: int, conv: nn.Conv2d) -> int:
    """Output length of a square-kernel, square-stride, dilation-1 conv along an input side of n."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (n + 2 * p - k) // s + 1


def conv_as_gemm(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)` as im2col + one matrix multiply, in channels-last order throughout.

    The patches are gathered as (batch, out_h, out_w, kh * kw * in_channels), which is the order
    of a channels-last weight's memory, so the weight is used as a (out, kh * kw * in) matrix
    without a copy, and the product (batch, out_h, out_w, out) is the output in channels-last
    layout. Needs groups 1, dilation 1, zero padding, square kernel and stride.
    """
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    b, _, h, w = x.shape
    out_h, out_w = _out_size(h, conv), _out_size(w, conv)
    xp = x.permute(0, 2, 3, 1)
    if p:
        xp = F.pad(xp, (0, 0, p, p, p, p))
    if k == 1:
        cols = xp[:, ::s, ::s, :] if s > 1 else xp
    else:
        # (b, out_h, out_w, C, kh, kw) windows as a view, then one copy into (kh, kw, C) order.
        windows = xp.unfold(1, k, s).unfold(2, k, s)
        cols = windows.permute(0, 1, 2, 4, 5, 3).reshape(b, out_h, out_w, -1)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    return F.linear(cols, weight, conv.bias).permute(0, 3, 1, 2)


# Convs with fewer inputs per output (in_channels x kh x kw) than this stay conv kernels: a matrix
# multiply that thin gains nothing, and inductor compiles such gathers very slowly (a stem conv over
# 3 channels as a matrix multiply stalled its scheduler for minutes).
MIN_GEMM_DEPTH = 256


def _gemm_capable(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] >= MIN_GEMM_DEPTH
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and len(set(conv.padding)) == 1
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.stride[0] == conv.stride[1]
    )


class GemmConv2d(nn.Conv2d):
    """An `nn.Conv2d` that runs as `conv_as_gemm` for the input shapes listed in `gemm_shapes`.

    `deploy` turns eligible convs of its private copy into this class (same parameters, same
    state dict) and `choose_conv_paths` fills `gemm_shapes` by timing. Under `torch.compile` the
    shape test is resolved at trace time, so each compiled graph holds one path per conv.
    """

    gemm_shapes: frozenset = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exporters that trace (ONNX, OpenVINO) get the plain conv: a traced gather would fix the batch.
        if self.gemm_shapes and not torch.jit.is_tracing() and tuple(x.shape) in self.gemm_shapes:
            return conv_as_gemm(x, self)
        return super().forward(x)


def _best_time(fn: Callable[[], object], other: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` calls of each, alternating, after one warm-up call of each."""
    fn(), other()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, f in enumerate((fn, other)):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


# Beyond this many output rows (batch x out_h x out_w) the conv kernels are efficient and the
# gathered patches large (9x the input for a 3x3 conv): not worth timing.
MAX_GEMM_ROWS = 4096
# The matrix multiply must win by this factor, so that timing noise does not flip a choice.
GEMM_MARGIN = 0.95


def choose_conv_paths(
    model: nn.Module, x: torch.Tensor, *, repeats: int = 3
) -> list[tuple[str, tuple, bool]]:
    """Time both paths of every `GemmConv2d` at the shape `x` gives it; returns (conv, shape, gemm).

    One eager forward records each conv's input shape (channels-last inputs only: the gathered
    path is written for them); each distinct (conv configuration, shape) is then timed once on a
    random input of that shape, conv kernel against matrix multiply, and the multiply is kept
    where it is at least 5% faster.
    """
    seen: dict[GemmConv2d, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        inp = args[0]
        if inp.ndim == 4 and inp.is_contiguous(memory_format=torch.channels_last):
            seen.setdefault(module, tuple(inp.shape))

    names = {m: n for n, m in model.named_modules()}
    convs = [m for m in model.modules() if isinstance(m, GemmConv2d)]
    hooks = [m.register_forward_pre_hook(record) for m in convs]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    verdicts: dict[tuple, bool] = {}
    chosen = []
    with torch.inference_mode():
        for conv, shape in seen.items():
            if shape[0] * _out_size(shape[2], conv) * _out_size(shape[3], conv) > MAX_GEMM_ROWS:
                continue
            key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            key += (conv.bias is not None, shape)
            if key not in verdicts:
                inp = torch.randn(shape, device=conv.weight.device).to(
                    dtype=conv.weight.dtype, memory_format=torch.channels_last
                )
                t_gemm, t_conv = _best_time(
                    lambda c=conv, i=inp: conv_as_gemm(i, c),
                    lambda c=conv, i=inp: nn.Conv2d.forward(c, i),
                    repeats,
                )
                verdicts[key] = t_gemm < GEMM_MARGIN * t_conv
            if verdicts[key]:
                conv.gemm_shapes = conv.gemm_shapes | {shape}
            chosen.append((names[conv], shape, verdicts[key]))
    return chosen


def _freezing():
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


class _CompiledOrFrozen:
    """Runs `torch.compile` with inductor freezing; if compiling fails, a frozen TorchScript trace.

    Freezing turns the weights into constants, so inductor can pre-pack them for oneDNN (CPU)
    and fold what folding left; that, not compile alone, is what makes CPU inference faster.
    Compile failures only show on the first call (no C++ compiler, unsupported Python), so the
    choice is made there, with the first input as the trace example.

    Freezing is switched on in inductor's global config around every call (a call with a new
    shape compiles again): passed as `torch.compile(options={"freezing": True})` it reaches
    inductor but not dynamo, which then hands the weights over as graph inputs, so nothing is
    pre-packed (torch 2.14: plain `convolution` calls instead of oneDNN's fused conv + ReLU / add,
    and PT2E int8 graphs fail to lower at all).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled: Callable | None = None
        self.backend = "pending"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with _freezing():
            if self.compiled is None:
                self.compiled, self.backend = self._build(x)
            return self.compiled(x)

    def _build(self, x: torch.Tensor) -> tuple[Callable, str]:
        model = self.model

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x)

        try:
            # dynamic=False: one specialised graph per input shape, as a deployed model sees few.
            compiled = torch.compile(_own_code(forward), dynamic=False)
            compiled(x)
            return compiled, "inductor"
        except Exception as exc:  # compile has many failure types; each one means "use the fallback"
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "using a frozen TorchScript trace instead",
                RuntimeWarning,
                stacklevel=4,
            )
        return frozen_torchscript(self.model, x), "torchscript"


def frozen_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """`torch.jit.trace` + `freeze` + `optimize_for_inference`: the path without torch.compile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: this is the fallback on purpose
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


# auto: the fastest backend must keep fp32 logits within this fraction of their scale (the largest
# absolute logit, at least 1) of the eager model's, and bf16 / int8 top-1 predictions agree on at
# least this share of the images compared.
FP32_TOLERANCE = 1e-4
MIN_TOP1_AGREEMENT = 0.9
# auto: after each backend's first two calls, timed rounds go on for this long (at least one).
AUTO_TIMING_S = 4.0
AUTO_MAX_ROUNDS = 5
# When the runner-up's median is within AUTO_CLOSE of the leader's, the two race again, alone, for
# up to AUTO_RUNOFF_ROUNDS more rounds (or AUTO_TIMING_S) and decide on all their samples: five
# rounds of three engines misjudged 3-8% gaps at batch 1 (resnext50_32x4d, iresnet50,
# iresgroup50 on a 2-core EPYC, benchmarks/results/engines_cpu.json).
AUTO_CLOSE = 0.10
AUTO_RUNOFF_ROUNDS = 15

log = logging.getLogger(__name__)


def _precision(dtype: torch.dtype | str | None) -> str:
    """float32, bfloat16, float16 or int8, from a torch dtype or its name."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.int8, torch.qint8):
            return "int8"
        name = str(dtype).removeprefix("torch.")
    else:
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    if name not in ("float32", "bfloat16", "float16", "int8"):
        raise ValueError(f"unsupported deploy dtype {dtype!r}; expected float32, bfloat16, float16 or int8")
    return name


def _race(fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """Median seconds per call of each, in interleaved rounds (order alternating) for
    `AUTO_TIMING_S` or `AUTO_MAX_ROUNDS` rounds, whichever ends first (at least one round); each
    timed call follows an untimed one, so it does not pay for the previous engine's spinning threads.
    A close finish of the two fastest (within `AUTO_CLOSE`) goes to a runoff of those two alone,
    and their medians are then taken over both races' samples."""
    from .bench import time_interleaved

    samples = dict(
        zip(
            fns,
            time_interleaved(
                list(fns.values()),
                device,
                min_repeats=1,
                max_repeats=AUTO_MAX_ROUNDS,
                max_seconds=AUTO_TIMING_S,
                settle=1,
            ),
        )
    )
    medians = {k: statistics.median(v) for k, v in samples.items()}
    if len(fns) > 1:
        first, second = sorted(medians, key=medians.get)[:2]
        if medians[second] <= medians[first] * (1 + AUTO_CLOSE):
            more = time_interleaved(
                [fns[first], fns[second]],
                device,
                min_repeats=AUTO_RUNOFF_ROUNDS,
                max_repeats=AUTO_RUNOFF_ROUNDS,
                max_seconds=AUTO_TIMING_S,
                settle=1,
            )
            for name, extra in zip((first, second), more):
                medians[name] = statistics.median(samples[name] + extra)
    return medians


def _top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


class Deployed(nn.Module):
    """An inference-only model: casts the input to the deployed dtype and memory format, no autograd.

    The output comes back in the input's dtype, so float32 callers get float32 logits from a bf16
    model. `.model` is the folded eager network (its `spec` and `name` are copied here). At the
    first call with each input shape it builds (and, for `backend="auto"`, measures) the engines;
    `.choices` holds, per input shape, which backend runs it and why, and `.report` all of it.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        channels_last: bool,
        backends: dict[str, Callable[[], Callable]],
        *,
        precision: str = "float32",
        requested: str = "auto",
        unavailable: dict[str, str] | None = None,
        calibration: list[torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.precision = precision
        self.requested = requested
        self.channels_last = channels_last
        self.spec, self.name = getattr(model, "spec", None), getattr(model, "name", None)
        # (conv, input shape, runs as matrix multiply) for every conv timed so far; see GemmConv2d.
        self.conv_paths: list[tuple[str, tuple, bool]] = []
        # input shape -> {"backend", "why", "first_call_s", "latency_ms", "agreement", ...}
        self.choices: dict[tuple[int, ...], dict] = {}
        # backend -> why it could not run here (auto skips it)
        self.unavailable: dict[str, str] = dict(unavailable or {})
        # backend -> int8 top-1 agreement with the fp32 model over the calibration batches
        self.calibration_agreement: dict[str, float] = {}
        # Not submodules: the engines share `model`'s parameters, which must not be listed twice
        # in the state dict.
        self.__dict__["_factories"] = backends
        self.__dict__["_engines"] = {}
        self.__dict__["_calibration"] = calibration
        self.__dict__["_time_convs"] = any(isinstance(m, GemmConv2d) for m in model.modules())
        self.training = False

    @property
    def backend(self) -> str:
        """What ran the latest new input shape: eager, inductor, torchscript (inductor's fallback),
        openvino or onnxruntime; pending before the first call."""
        if not self.choices:
            return "pending"
        name = next(reversed(self.choices.values()))["backend"]
        engine = self._engines.get(name)
        return getattr(engine, "backend", name) if name == "inductor" else name

    @property
    def report(self) -> dict:
        """What was asked, what ran each input shape and why, and what could not run (JSON-ready)."""
        return {
            "requested": self.requested,
            "precision": self.precision,
            "choices": {"x".join(map(str, k)): v for k, v in self.choices.items()},
            "unavailable": dict(self.unavailable),
            "calibration_top1_agreement": dict(self.calibration_agreement),
        }

    def train(self, mode: bool = True) -> Deployed:
        if mode:
            raise RuntimeError("a deployed model is inference-only; train the original model")
        return super().train(False)

    def _engine(self, name: str) -> Callable:
        """The engine `name`, built on first use (int8: calibrated and checked against fp32)."""
        if name not in self._engines:
            engine = self._factories[name]()
            if self.precision == "int8":
                self.calibration_agreement[name] = self._calibration_top1(engine)
            self._engines[name] = engine
        return self._engines[name]

    def _calibration_top1(self, engine: Callable) -> float:
        hits = n = 0
        for xb in self._calibration:
            y = self._cast(xb)
            hits += _top1_agreement(engine(y), self.model(y)) * len(xb)
            n += len(xb)
        return hits / n

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=fmt)

    def _first_call(self, name: str, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        engine = self._engine(name)
        prepare = getattr(engine, "prepare", None)
        if prepare is not None:
            prepare(y.shape)
        out = engine(y)
        return out, time.perf_counter() - t0

    def _choose(self, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Build the engines for `y`'s shape; with several candidates, measure them and keep the
        fastest whose outputs agree with the eager model. Returns the record and `y`'s output."""
        names = list(self._factories)
        if len(names) == 1:
            out, first = self._first_call(names[0], y)
            record = {"backend": names[0], "why": "asked for", "first_call_s": {names[0]: round(first, 2)}}
            if self.precision == "int8":
                record["calibration_top1_agreement"] = self.calibration_agreement.get(names[0])
            return record, out
        ref = self.model(y)
        scale = max(1.0, ref.float().abs().max().item())
        outs, first, agreement, skipped = {}, {}, {}, {}
        for name in names:
            try:
                outs[name], first[name] = self._first_call(name, y)
            except BackendUnavailable as exc:  # e.g. a shape this engine does not take
                skipped[name] = str(exc)
                continue
            if self.precision == "float32":
                agreement[name] = (outs[name].float() - ref.float()).abs().max().item() / scale
            elif self.precision == "int8":
                agreement[name] = self.calibration_agreement[name]
            else:
                agreement[name] = _top1_agreement(outs[name], ref)
        if self.precision == "float32":
            ok = [n for n in outs if agreement[n] <= FP32_TOLERANCE]
        else:
            ok = [n for n in outs if agreement[n] >= MIN_TOP1_AGREEMENT]
        for name in ok:  # a second call each: oneDNN and OpenVINO settle their kernels on it
            self._engines[name](y)
        seconds = _race({n: (lambda e=self._engines[n]: e(y)) for n in ok}, y.device) if len(ok) > 1 else {}
        if ok:
            best = min(ok, key=lambda n: seconds.get(n, 0.0))
            measure = "max abs logit diff / scale" if self.precision == "float32" else "top-1 agreement"
            others = ", ".join(f"{n} {seconds[n] * 1e3:.1f} ms" for n in ok if n != best)
            why = (
                f"fastest that agrees ({measure} {agreement[best]:.3g})"
                if seconds
                else "the only one that agrees"
            )
            if others:
                why += f"; {best} {seconds[best] * 1e3:.1f} ms against {others}"
        else:
            if self.precision == "float32" or not outs:
                best, why = "eager", "no backend agreed with the eager model"
                outs[best] = ref
            else:
                best = max(outs, key=lambda n: agreement[n])
                why = f"none reached {MIN_TOP1_AGREEMENT:.0%} top-1 agreement; the closest"
            warnings.warn(f"deploy(backend='auto'): {why}; using {best}", RuntimeWarning, stacklevel=4)
            if best == "eager" and "eager" not in self._engines:
                self._engines["eager"] = self.model
        rejected = [n for n in outs if n not in ok and n != best]
        if rejected:
            why += "; outputs too far off: " + ", ".join(f"{n} ({agreement[n]:.3g})" for n in rejected)
        if self.unavailable or skipped:
            why += "; not available: " + "; ".join(
                f"{k}: {v}" for k, v in {**self.unavailable, **skipped}.items()
            )
        record = {
            "backend": best,
            "why": why,
            "first_call_s": {k: round(v, 2) for k, v in first.items()},
            "latency_ms": {k: round(v * 1e3, 3) for k, v in seconds.items()},
            ("max_abs_diff_over_scale" if self.precision == "float32" else "top1_agreement"): agreement,
        }
        log.info("deploy auto, input %s: %s (%s)", "x".join(map(str, y.shape)), best, why)
        return record, outs[best]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self._cast(x)
            shape = tuple(y.shape)
            if shape in self.choices:
                out = self._engines[self.choices[shape]["backend"]](y)
            else:
                if self._time_convs:
                    # Before compiling for this shape, so the graph is traced with the chosen paths.
                    self.conv_paths += choose_conv_paths(self.model, y)
                self.choices[shape], out = self._choose(y)
            return out.to(x.dtype) if x.is_floating_point() else out


def _backend_factories(
    net: nn.Module, names: Sequence[str], precision: str, calibration: list[torch.Tensor] | None
) -> dict[str, Callable[[], Callable]]:
    """name -> a function that builds that engine on `net` (called at its first use)."""

    def inductor() -> Callable:
        return _CompiledOrFrozen(quantize_pt2e(net, calibration) if precision == "int8" else net)

    def eager() -> Callable:
        return quantize_pt2e(net, calibration) if precision == "int8" else net

    def openvino() -> Callable:
        return OpenVinoEngine(net, precision, torch.get_num_threads(), calibration)

    def onnxruntime() -> Callable:
        return OnnxRuntimeEngine(net, torch.get_num_threads())

    known = {"inductor": inductor, "eager": eager, "openvino": openvino, "onnxruntime": onnxruntime}
    return {n: known[n] for n in names}


def deploy(
    model: nn.Module,
    *,
    dtype: torch.dtype | str | None = None,
    backend: str = "auto",
    calibration: Iterable | None = None,
    channels_last: bool = True,
    compile: bool = True,
    conv_gemm: bool = True,
) -> Deployed:
    """An inference-ready copy of `model`: BN folded, channels-last, compiled, optionally bf16/fp16/int8.

    `backend`: "inductor" (torch.compile with freezing), "openvino", "onnxruntime" (CPU), or
    "auto" (default): at the first call with each input shape, every backend installed here is
    built and timed on that input, and the fastest whose outputs agree with the eager model is
    kept (fp32: max abs logit difference <= `FP32_TOLERANCE` of the logits' scale; bf16 / int8:
    top-1 agreement >= `MIN_TOP1_AGREEMENT`); `Deployed.choices` records the choice and why.
    Without OpenVINO and onnxruntime, auto is inductor. A backend asked for by name that cannot
    run here raises `BackendUnavailable` naming the extra to install.

    In float32 its outputs match the original's (eval mode) to float rounding. `dtype=torch.bfloat16`
    (or float16) casts the weights; where the device has no native support for it, a warning is
    given and the model stays float32. `dtype="int8"` quantizes after training (static, per-channel
    int8 weights, activation ranges from `calibration`, an iterable of input batches or (input,
    label) pairs): NNCF for openvino, PT2E's X86InductorQuantizer for inductor; the top-1
    agreement with the fp32 model on the calibration batches is in `Deployed.calibration_agreement`.
    Compilation happens on the first call (seconds to minutes); if `torch.compile` fails, inductor
    falls back to a frozen TorchScript trace. `compile=False` runs the folded model eagerly (int8:
    the quantized graph, uncompiled), whatever `backend` says.

    `conv_gemm` (CPU, channels-last, inductor and eager): at the first call with each input
    shape, convs with at most `MAX_GEMM_ROWS` output rows and at least `MIN_GEMM_DEPTH` inputs per
    output are timed as a conv kernel and as a matrix multiply over gathered patches, and run the
    faster way from then on (`Deployed.conv_paths` lists the choices). It changes outputs only by
    float rounding.
    """
    precision = _precision(dtype)
    net = copy.deepcopy(model).eval()
    fold_batchnorm(net)
    net.requires_grad_(False)
    device, param_dtype = _param_device_dtype(net)
    if precision in ("bfloat16", "float16") and getattr(torch, precision) != param_dtype:
        if low_precision_supported(getattr(torch, precision), device):
            net.to(getattr(torch, precision))
        else:
            warnings.warn(
                f"{precision} is not supported natively on this {device.type}; the deployed model stays "
                f"{param_dtype}",
                RuntimeWarning,
                stacklevel=2,
            )
            precision = str(param_dtype).removeprefix("torch.")
    calib = None
    if precision == "int8":
        if calibration is None:
            raise ValueError("dtype='int8' needs calibration=batches: a few batches of typical inputs")
        calib = calibration_batches(calibration)
    unavailable: dict[str, str] = {}
    if not compile:
        names = ["eager"]
        if precision == "int8":
            require("inductor", precision, device)  # the PT2E flow is what runs it
    elif backend == "auto":
        names = []
        for name in BACKENDS:
            why = unavailable_reason(name, precision, device)
            if why is None:
                names.append(name)
            else:
                unavailable[name] = why
        if not names:
            raise BackendUnavailable("; ".join(unavailable.values()))
        if unavailable:
            log.info("deploy auto: %s", "; ".join(f"{k} skipped ({v})" for k, v in unavailable.items()))
    else:
        require(backend, precision, device)
        names = [backend]
    if channels_last:
        net.to(memory_format=torch.channels_last)
        if conv_gemm and device.type == "cpu" and precision != "int8" and {"inductor", "eager"} & set(names):
            for module in net.modules():
                if _gemm_capable(module):
                    module.__class__ = GemmConv2d  # same parameters and state dict, one more path
    return Deployed(
        net,
        _param_device_dtype(net)[1],
        channels_last,
        _backend_factories(net, names, precision, calib),
        precision=precision,
        requested=backend if compile else "eager",
        unavailable=unavailable,
        calibration=calib,
    )
