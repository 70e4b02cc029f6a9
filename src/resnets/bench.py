"""Real speed next to the papers' FLOPs: latency, throughput, achieved GFLOP/s, memory, peers.

Timing rules, so that numbers from a busy or throttling machine still compare fairly:

- every model is warmed up first (a deployed model compiles on its first call, timed apart);
- with `peers=True` ours and the peer run interleaved, one call each per round, the order
  alternating, so drift and other load hit both alike; the ratio is taken from those rounds;
- rounds go on until the spread (IQR / median) is under `rel_spread` for every timed function,
  or until `max_seconds` has been used (at least `min_repeats` rounds either way, but no more
  than 3 rounds when one call alone eats the time budget).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, get_entry, list_models

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchError(ValueError):
    """A request the benchmark cannot run as asked (unknown device, missing peer library, ...)."""


# --- peers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    library: str  # torchvision or timm
    name: str  # the peer library's model name
    layout: str  # the resnets.convert layout that maps its weights to ours


_TORCHVISION = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
}
_TIMM_SAME_NAME = {
    "res2net50_26w_4s",
    "res2net50_48w_2s",
    "res2net50_14w_8s",
    "res2net50_26w_6s",
    "res2net50_26w_8s",
    "res2net101_26w_4s",
    "res2next50",
}
_TIMM_RENAMED = {
    "res2net50_v1b_26w_4s": Peer("timm", "res2net50d", "timm"),
    "res2net101_v1b_26w_4s": Peer("timm", "res2net101d", "timm"),
    "preact_resnet50": Peer("timm", "resnetv2_50", "timm_resnetv2"),
    "preact_resnet101": Peer("timm", "resnetv2_101", "timm_resnetv2"),
    "preact_resnet152": Peer("timm", "resnetv2_152", "timm_resnetv2"),
}


def peer_of(name: str) -> Peer | None:
    """The torchvision or timm implementation of the same network, or None where there is none."""
    if name in _TORCHVISION:
        return Peer("torchvision", name, "torchvision")
    if name in _TIMM_SAME_NAME:
        return Peer("timm", name, "timm")
    return _TIMM_RENAMED.get(name)


def build_peer(peer: Peer, num_classes: int = 1000) -> nn.Module:
    """Instantiate the peer with random weights; a clear error if its library is not installed."""
    try:
        if peer.library == "torchvision":
            import torchvision

            return getattr(torchvision.models, peer.name)(weights=None, num_classes=num_classes)
        import timm

        return timm.create_model(peer.name, pretrained=False, num_classes=num_classes)
    except ImportError:
        raise BenchError(
            f"--peers needs {peer.library} for {peer.name}: pip install {peer.library}"
        ) from None


def share_weights(ours: nn.Module, peer: nn.Module, layout: str) -> bool:
    """Load the peer's weights into ours, so both compute the same function; False if they don't map."""
    from .convert import to_ours

    try:
        ours.load_state_dict(to_ours(peer.state_dict(), layout))
    except (KeyError, RuntimeError, ValueError):
        return False
    return True


# --- machine and memory -----------------------------------------------------------------------


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, threads, GPU, library versions and the load average when asked."""
    from .runtime import cpu_name

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device)
        if device.startswith("cuda") and torch.cuda.is_available()
        else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        # Thread settings change CPU timings a lot (OpenMP threads spin-wait on a shared machine).
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
            if k in os.environ
        },
    }
    for lib in ("torchvision", "timm"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_avg_1m"] = None
    return info


def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory one call of `fn` adds on top of what is already held (MiB).

    CUDA: the caching allocator's peak. CPU: the resident-set high-water mark, which Linux lets us
    reset (/proc/self/clear_refs), after asking malloc to hand freed memory back so that a
    buffer left over from an earlier call does not hide this call's needs. Elsewhere: the growth
    of getrusage's max RSS, which is 0 when an earlier call already peaked higher.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_kib("VmRSS")
    except OSError:
        base = None
    if base is None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    fn()
    return max(0, (_proc_kib("VmHWM") or base) - base) / 1024


# --- counting ---------------------------------------------------------------------------------


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    *args,
    **kwargs,
) -> int:
    """FLOPs of a conv's backward: the input gradient and the weight gradient each cost what the
    forward pass does. torch's own formula counts a grouped conv's weight gradient as if the conv
    were dense, `groups` times too much (a 32-group 3x3: 34x its forward FLOPs instead of 3x)."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def count_work(model: nn.Module, x: torch.Tensor, train: bool) -> tuple[int, int]:
    """(FLOPs of one step on `x`, conv output elements per forward) counted on the meta device.

    A training step's FLOPs include the backward pass as autograd runs it (no input gradient for
    the first conv). Activations follow the RegNet paper: the sizes of all conv outputs.
    """
    meta = {
        k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad and train)
        for k, v in model.state_dict(keep_vars=True).items()
    }
    acts = [0]

    def hook(_module, _inp, out):
        acts[0] += out.numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop}
    )
    # Eval mode: BN's FLOPs are not counted either way, and batch statistics of one image at a
    # tiny size would be refused (one value per channel).
    was_training = model.training
    model.eval()
    try:
        with counter, torch.set_grad_enabled(train):
            out = torch.func.functional_call(model, meta, (x.to("meta"),))
            if train:
                out.float().sum().backward()
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counter.get_total_flops(), acts[0]


# --- timing -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    device: torch.device,
    *,
    min_repeats: int = 5,
    max_repeats: int = 200,
    max_seconds: float = 30.0,
    rel_spread: float = 0.05,
    settle: int = 0,
) -> list[list[float]]:
    """Seconds per call of each function, one timed call of each per round, order alternating by round.

    `settle` untimed calls precede each timed one. Engines with their own thread pools (OpenMP,
    OpenVINO's TBB, onnxruntime) keep spinning for a while after a call; on a machine with few
    cores that steals the next function's cores, so without settling calls the timed call pays for
    whatever ran before it (2-core EPYC, resnet50 at batch 1 on inductor: 127 ms right after
    OpenVINO and onnxruntime calls, 79 ms alone; within a few percent of alone after 2 settling
    calls).
    """
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(max_repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            for _ in range(settle):
                fns[i]()
            _sync(device)
            t0 = time.perf_counter()
            fns[i]()
            _sync(device)
            samples[i].append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        rounds = r + 1
        if rounds >= min_repeats and all(spread(s) <= rel_spread for s in samples):
            break
        if elapsed > max_seconds and (rounds >= min_repeats or rounds >= 3):
            break
    return samples


def time_rounds(
    fns: Sequence[Callable[[], Any]], device: torch.device, rounds: int, settle: int = 0
) -> list[list[float]]:
    """`time_interleaved` for exactly `rounds` rounds, however stable or slow the timings are."""
    return time_interleaved(
        fns,
        device,
        min_repeats=rounds,
        max_repeats=rounds,
        max_seconds=float("inf"),
        rel_spread=0.0,
        settle=settle,
    )


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def spread(xs: Sequence[float]) -> float:
    """IQR / median: the relative spread that decides when timing is stable."""
    if len(xs) < 2:
        return math.inf
    q1, q2, q3 = quartiles(xs)
    return (q3 - q1) / q2


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    q1, q2, q3 = quartiles(seconds)
    return {
        "latency_ms": q2 * 1e3,
        "latency_q1_ms": q1 * 1e3,
        "latency_q3_ms": q3 * 1e3,
        "latency_iqr_ms": (q3 - q1) * 1e3,
        "latency_min_ms": min(seconds) * 1e3,
        "repeats": len(seconds),
    }


# --- one model --------------------------------------------------------------------------------


def _step_fn(
    model: nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype, autocast: bool
) -> Callable[[], Any]:
    """One call of what is timed: a forward pass (eval), or forward + backward + SGD step (train)."""
    device = x.device
    amp = torch.autocast(device.type, dtype=dtype, enabled=autocast)
    if mode == "eval":

        def forward() -> Any:
            with torch.inference_mode(), amp:
                return model(x)

        return forward
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    labels = torch.randint(0, model.num_classes if hasattr(model, "num_classes") else 1000, (x.shape[0],))
    labels = labels.to(device)

    def train_step() -> Any:
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss

    return train_step


def _check_request(device: torch.device, mode: str, deploy: bool, dtype: torch.dtype) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"unknown device {device.type!r} (expected cpu or cuda)")
    if mode not in ("eval", "train"):
        raise BenchError(f"unknown mode {mode!r} (expected eval or train)")
    if deploy and mode == "train":
        raise BenchError("--deploy is inference-only; use --mode eval")
    if dtype not in DTYPES.values():
        raise BenchError(f"unsupported dtype {dtype} (expected one of {', '.join(DTYPES)})")


def bench_model(
    name: str,
    *,
    batch_size: int = 1,
    input_size: int | None = None,
    device: str = "cpu",
    mode: str = "eval",
    deploy: bool = False,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    peers: bool = False,
    peer_dtype: torch.dtype = torch.float32,
    min_repeats: int = 5,
    max_seconds: float = 30.0,
    rel_spread: float = 0.05,
) -> dict[str, Any]:
    """Time one registered model (and its peer, interleaved); returns one result row.

    Eager low precision is autocast (how one runs an eager model in bf16/fp16); `deploy=True`
    casts the weights instead (`resnets.deploy`). The peer always runs eager, in `peer_dtype`
    (float32: the baseline a user of torchvision / timm gets by default).
    """
    dev = torch.device(device)
    _check_request(dev, mode, deploy, dtype)
    if batch_size < 1:
        raise BenchError(f"--batch-size must be at least 1, got {batch_size}")
    entry = get_entry(name)
    size = entry.input_size if input_size is None else input_size
    torch.manual_seed(0)
    ours = create_model(name).to(dev).train(mode == "train")
    x = torch.randn(batch_size, entry.spec.in_chans, size, size, device=dev)
    try:
        flops, acts = count_work(ours, x[:1], mode == "train")
    except RuntimeError as exc:  # e.g. an input too small for the network's strides
        raise BenchError(f"{name} cannot run on {size}x{size} input: {str(exc).splitlines()[0]}") from None
    macs = count_work(ours, x[:1], False)[0] // 2 if mode == "train" else flops // 2

    row: dict[str, Any] = {
        "name": name,
        "family": entry.family,
        "mode": mode,
        "deploy": deploy,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(dev),
        "batch_size": batch_size,
        "input_size": size,
        "params": sum(p.numel() for p in ours.parameters()),
        "macs_per_image": macs,
        "gmacs": macs / 1e9,
        "activations_per_image": acts,
        # What GFLOP/s is computed from: 2 FLOPs per MAC; a training step adds the backward pass.
        "flops_per_step": flops * batch_size,
    }

    peer_model = None
    peer = peer_of(name) if peers else None
    if peers:
        row["peer"] = None if peer is None else f"{peer.library}.{peer.name}"
    if peer is not None:
        peer_model = build_peer(peer, entry.spec.num_classes).to(dev).train(mode == "train")
        row["same_weights"] = share_weights(ours, peer_model, peer.layout)
        if row["same_weights"] and mode == "eval":
            with torch.inference_mode():
                row["peer_max_abs_diff"] = (ours.eval()(x) - peer_model.eval()(x)).abs().max().item()

    run = ours
    if deploy:
        from .deploy import deploy as make_deployed
        from .engines import BackendUnavailable

        try:
            run = make_deployed(ours.eval(), dtype=None if dtype == torch.float32 else dtype, backend=backend)
        except BackendUnavailable as exc:
            raise BenchError(str(exc)) from None
        t0 = time.perf_counter()
        run(x)  # compiles
        _sync(dev)
        row["compile_s"] = time.perf_counter() - t0
        row["backend"] = run.backend
        row["deploy_report"] = run.report  # which engines were measured, and why this one
        # What actually ran: deploy keeps float32 where the device has no native bf16/fp16.
        row["deployed_dtype"] = str(run.dtype).removeprefix("torch.")
        # CPU: convs timed at this shape, and how many run as a matrix multiply (resnets.deploy.GemmConv2d).
        row["convs_timed"] = len(run.conv_paths)
        row["convs_as_gemm"] = sum(gemm for _, _, gemm in run.conv_paths)
    fns = [_step_fn(run, x, mode, dtype, autocast=not deploy and dtype != torch.float32)]
    if peer_model is not None:
        fns.append(_step_fn(peer_model, x, mode, peer_dtype, autocast=peer_dtype != torch.float32))

    # Warm-up: oneDNN picks and caches its kernels on the first calls of each shape.
    warm_until = time.perf_counter() + 0.5
    for k in range(10):
        for fn in fns:
            fn()
        if k >= 1 and time.perf_counter() > warm_until:
            break
    _sync(dev)
    peaks = [peak_memory_mb(fn, dev) for fn in fns]
    samples = time_interleaved(
        fns, dev, min_repeats=min_repeats, max_seconds=max_seconds, rel_spread=rel_spread
    )

    stats = summarize(samples[0])
    seconds = stats["latency_ms"] / 1e3
    row.update(stats)
    row["images_per_s"] = batch_size / seconds
    row["gflops_per_s"] = row["flops_per_step"] / seconds / 1e9
    row["peak_mem_mb"] = peaks[0]
    if peer_model is not None:
        ps = summarize(samples[1])
        row["peer_dtype"] = str(peer_dtype).removeprefix("torch.")
        row["peer_latency_ms"] = ps["latency_ms"]
        row["peer_latency_iqr_ms"] = ps["latency_iqr_ms"]
        row["peer_peak_mem_mb"] = peaks[1]
        row["ratio"] = row["latency_ms"] / ps["latency_ms"]  # ours / peer: below 1 means ours is faster
        # Per-round ratios cancel slow drift (other load, clocks) that both runs of a round share.
        row["ratio_paired_median"] = statistics.median(a / b for a, b in zip(samples[0], samples[1]))
    return row


# --- many models ------------------------------------------------------------------------------


def resolve_names(names_or_patterns: Sequence[str]) -> list[str]:
    """Exact names (an unknown one raises with suggestions) and fnmatch patterns, in order, no repeats."""
    out: list[str] = []
    for item in names_or_patterns:
        if any(c in item for c in "*?["):
            found = list_models(item)
            if not found:
                raise BenchError(f"no model matches {item!r}; `resnets list` shows them all")
        else:
            get_entry(item)
            found = [item]
        out += [n for n in found if n not in out]
    return out


def run_bench(names: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """`bench_model` for each name; the report holds the machine, the settings and one row per model."""
    device = kwargs.get("device", "cpu")
    _check_request(
        torch.device(device),
        kwargs.get("mode", "eval"),
        kwargs.get("deploy", False),
        kwargs.get("dtype", torch.float32),
    )
    names = resolve_names(names)
    report: dict[str, Any] = {"machine": machine_info(device), "settings": dict(kwargs), "results": []}
    for key in ("dtype", "peer_dtype"):
        if key in report["settings"]:
            report["settings"][key] = str(report["settings"][key]).removeprefix("torch.")
    for name in names:
        report["results"].append(bench_model(name, **kwargs))
    report["machine"]["load_avg_1m_end"] = machine_info(device)["load_avg_1m"]
    return report


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['torch_threads']} threads"
        + (f", {m['gpu']}" if m["gpu"] else "")
        + f"; torch {m['torch']}; load average {m['load_avg_1m']}",
    ]
    rows = report["results"]
    with_peer = any("peer" in r for r in rows)
    header = ["name", "params_m", "gmacs", "acts_m", "latency_ms", "iqr_ms", "img/s", "GFLOP/s", "peak_mb"]
    if with_peer:
        header += ["peer", "peer_ms", "ours/peer"]
    table = []
    for r in rows:
        line = [
            r["name"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['gmacs']:.3f}",
            f"{r['activations_per_image'] / 1e6:.2f}",
            f"{r['latency_ms']:.2f}",
            f"{r['latency_iqr_ms']:.2f}",
            f"{r['images_per_s']:.1f}",
            f"{r['gflops_per_s']:.1f}",
            f"{r['peak_mem_mb']:.0f}",
        ]
        if with_peer:
            has = r.get("peer_latency_ms") is not None
            line += [
                r.get("peer") or "-",
                f"{r['peer_latency_ms']:.2f}" if has else "-",
                f"{r['ratio']:.3f}" if has else "-",
            ]
        table.append(line)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    for line in [header, ["-" * w for w in widths], *table]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    s = report["settings"]
    lines.append(
        f"mode {s.get('mode', 'eval')}, batch {s.get('batch_size', 1)}, dtype {s.get('dtype', 'float32')}"
        + (", deployed" if s.get("deploy") else ", eager")
        + "; latency = median per batch; GFLOP/s = 2 x MACs (+ backward in train) / latency"
    )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str) -> None:
    """GMACs against measured latency, one labelled point per model (and per peer, if timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.scatter([r["gmacs"] for r in rows], [r["latency_ms"] for r in rows], label="resnets", zorder=3)
    for r in rows:
        ax.annotate(
            r["name"], (r["gmacs"], r["latency_ms"]), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    peers = [r for r in rows if r.get("peer_latency_ms") is not None]
    if peers:
        ax.scatter(
            [r["gmacs"] for r in peers],
            [r["peer_latency_ms"] for r in peers],
            marker="x",
            label="peer (torchvision / timm)",
            zorder=3,
        )
    s, m = report["settings"], report["machine"]
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel(f"median latency per batch of {s.get('batch_size', 1)} (ms)")
    ax.set_title(f"{m['gpu'] or m['cpu']}\n{s.get('mode', 'eval')}, {s.get('dtype', 'float32')}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------


def add_bench_arguments(p) -> None:
    """The options of `resnets bench` (the parser itself lives in cli.py)."""
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="model names or fnmatch patterns, e.g. 'resnet5*'"
    )
    p.add_argument("--batch-size", type=int, default=1, help="[1]")
    p.add_argument("--input-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    p.add_argument(
        "--mode", choices=["eval", "train"], default="eval", help="forward only, or a training step"
    )
    p.add_argument("--deploy", action="store_true", help="time resnets.deploy(model): BN folded, compiled")
    p.add_argument(
        "--backend",
        choices=["auto", "inductor", "openvino", "onnxruntime"],
        default="auto",
        help="with --deploy: the engine, or auto (the fastest that agrees with eager) [auto]",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="[float32]")
    p.add_argument("--peers", action="store_true", help="time torchvision / timm's same network, interleaved")
    p.add_argument("--peer-dtype", choices=list(DTYPES), default="float32", help="the peer's dtype [float32]")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time budget per model [30]")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--plot", metavar="FILE.png", help="draw GMACs against latency")


MAX_INPUT_VALUES = 1 << 31  # 8 GiB of float32 input


def bench_from_args(args) -> dict[str, Any]:
    """Run what the parsed command line asks; user mistakes raise BenchError."""
    if not args.names:
        raise BenchError("name at least one model or pattern, e.g. `resnets bench resnet50 --peers`")
    if args.input_size is not None and args.input_size < 1:
        raise BenchError(f"--input-size must be positive, got {args.input_size}")
    if not 0 < args.max_seconds < float("inf"):  # nan and inf would time for ever
        raise BenchError(f"--max-seconds must be a positive number of seconds, got {args.max_seconds}")
    for name in resolve_names(args.names):  # the input tensor alone, before anything is timed
        entry = get_entry(name)
        size = args.input_size or entry.input_size
        values = args.batch_size * entry.spec.in_chans * size * size
        if values > MAX_INPUT_VALUES:
            raise BenchError(
                f"{name}: a batch of {args.batch_size} at {size}x{size} is {values:,} input values, "
                f"more than the {MAX_INPUT_VALUES:,} a benchmark may allocate"
            )
    if args.plot and not args.plot.lower().endswith(".png"):
        raise BenchError(f"--plot writes a PNG file; got {args.plot!r}")
    report = run_bench(
        args.names,
        batch_size=args.batch_size,
        input_size=args.input_size,
        device=args.device,
        mode=args.mode,
        deploy=args.deploy,
        backend=args.backend,
        dtype=DTYPES[args.dtype],
        peers=args.peers,
        peer_dtype=DTYPES[args.peer_dtype],
        max_seconds=args.max_seconds,
    )
    if args.plot:
        plot_report(report, args.plot)
    return report
