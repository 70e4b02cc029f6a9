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
import time
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
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
        if tuple(x.shape) in self.gemm_shapes:
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


class _CompiledOrFrozen:
    """Runs `torch.compile` with inductor freezing; if compiling fails, a frozen TorchScript trace.

    Freezing turns the weights into constants, so inductor can pre-pack them for oneDNN (CPU)
    and fold what folding left; that, not compile alone, is what makes CPU inference faster.
    Compile failures only show on the first call (no C++ compiler, unsupported Python), so the
    choice is made there, with the first input as the trace example.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled: Callable | None = None
        self.backend = "pending"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            self.compiled, self.backend = self._build(x)
        return self.compiled(x)

    def _build(self, x: torch.Tensor) -> tuple[Callable, str]:
        model = self.model

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x)

        try:
            # dynamic=False: one specialised graph per input shape, as a deployed model sees few.
            compiled = torch.compile(_own_code(forward), dynamic=False, options={"freezing": True})
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


class Deployed(nn.Module):
    """An inference-only model: casts the input to the deployed dtype and memory format, no autograd.

    The output comes back in the input's dtype, so float32 callers get float32 logits from a bf16
    model. `.model` is the folded eager network (its `spec` and `name` are copied here).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, channels_last: bool, compile: bool):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self.spec, self.name = getattr(model, "spec", None), getattr(model, "name", None)
        # (conv, input shape, runs as matrix multiply) for every conv timed so far; see GemmConv2d.
        self.conv_paths: list[tuple[str, tuple, bool]] = []
        self.__dict__["_timed_shapes"] = set()
        self.__dict__["_time_convs"] = any(isinstance(m, GemmConv2d) for m in model.modules())
        # Not a submodule: the compiled wrapper shares `model`'s parameters, which must not be
        # listed twice in the state dict.
        self.__dict__["_runner"] = _CompiledOrFrozen(model) if compile else None
        self.training = False

    @property
    def backend(self) -> str:
        """eager, inductor, torchscript, or pending (compiled on the first call)."""
        return "eager" if self._runner is None else self._runner.backend

    def train(self, mode: bool = True) -> Deployed:
        if mode:
            raise RuntimeError("a deployed model is inference-only; train the original model")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.contiguous_format
            y = x.to(dtype=self.dtype, memory_format=fmt)
            if self._time_convs and tuple(y.shape) not in self._timed_shapes:
                # Before compiling for this shape, so the graph is traced with the chosen paths.
                self.conv_paths += choose_conv_paths(self.model, y)
                self._timed_shapes.add(tuple(y.shape))
            out = self.model(y) if self._runner is None else self._runner(y)
            return out.to(x.dtype) if x.is_floating_point() else out


def deploy(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    compile: bool = True,
    conv_gemm: bool = True,
) -> Deployed:
    """An inference-ready copy of `model`: BN folded, channels-last, compiled, optionally bf16/fp16.

    In float32 its outputs match the original's (eval mode) to float rounding. `dtype=torch.bfloat16`
    (or float16) casts the weights; where the device has no native support for it, a warning is
    given and the model stays float32. Compilation happens on the first call (seconds to minutes);
    if `torch.compile` is unavailable it falls back to a frozen TorchScript trace.

    `conv_gemm` (CPU, channels-last): at the first call with each input shape, convs with at
    most `MAX_GEMM_ROWS` output rows and at least `MIN_GEMM_DEPTH` inputs per output are timed
    as a conv kernel and as a matrix multiply over gathered patches, and run the faster way from
    then on (`Deployed.conv_paths` lists the choices). It changes outputs only by float rounding.
    """
    net = copy.deepcopy(model).eval()
    fold_batchnorm(net)
    net.requires_grad_(False)
    device, param_dtype = _param_device_dtype(net)
    if dtype is not None and dtype != param_dtype:
        if low_precision_supported(dtype, device):
            net.to(dtype)
        else:
            warnings.warn(
                f"{dtype} is not supported natively on this {device.type}; the deployed model stays "
                f"{param_dtype}",
                RuntimeWarning,
                stacklevel=2,
            )
    if channels_last:
        net.to(memory_format=torch.channels_last)
        if conv_gemm and device.type == "cpu":
            for module in net.modules():
                if _gemm_capable(module):
                    module.__class__ = GemmConv2d  # same parameters and state dict, one more path
    return Deployed(net, _param_device_dtype(net)[1], channels_last, compile)
