"""Where inductor's and OpenVINO's time goes, for one network on the same weights.

Both engines run the network with BN folded, on the same weights and input: inductor
under `torch.profiler` (self CPU time of every op: oneDNN convolutions, inductor's fused kernels,
everything else), OpenVINO with `PERF_COUNT` on (the CPU plugin's time per executed node and the
kernel it chose). The time of each is split into convolutions and the rest, so the output says
whether a gap is in the conv kernels or around them (convs that deploy runs as a matrix multiply,
and the classifier, count as convs). Per-layer times are kept in execution order, with
OpenVINO's node names; the orders differ (OpenVINO runs a downsampling block's shortcut conv
before its last conv), so only the first layer, the stem, is compared one to one.

Usage:
  python benchmarks/profile_engines.py --net resnet50 --batch 1 --dtype bfloat16
Results: benchmarks/results/profile_engines_<net>_b<batch>_<dtype>.json (machine inside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from resnets import create_model, deploy
from resnets.bench import machine_info
from resnets.deploy import fold_batchnorm
from resnets.engines import OpenVinoEngine

RESULTS = Path(__file__).resolve().parent / "results"


def _is_conv(name: str) -> bool:
    """A conv or a matrix multiply: deploy runs some convs as one over gathered patches
    (mkldnn linear), and the classifier is one in both engines (OpenVINO: FullyConnected)."""
    return any(k in name.lower() for k in ("conv", "linear", "fullyconnected", "matmul"))


def _wall(fn, x: torch.Tensor, calls: int) -> float:
    """Median seconds of `calls` calls after three warm-up calls."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_inductor(model: torch.nn.Module, x: torch.Tensor, dtype: str, calls: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = deploy(model, dtype=dtype, backend="inductor")
        wall = _wall(fast, x, calls)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fast(x)
    by_op: dict[str, float] = defaultdict(float)
    conv_events: list[float] = []
    for ev in prof.events():
        # Self time: a region's time less that of the ops inside it, so the sums add up to the whole.
        by_op[ev.name] += ev.self_cpu_time_total / calls
        if _is_conv(ev.name):
            conv_events.append(ev.cpu_time_total)
    per_call = len(conv_events) // calls
    layer_us = [statistics.median(conv_events[i::per_call]) for i in range(per_call)] if per_call else []
    conv = sum(v for k, v in by_op.items() if _is_conv(k))
    return {
        "wall_ms": round(wall * 1e3, 3),
        "conv_ms": round(conv / 1e3, 3),
        "other_ms": round((sum(by_op.values()) - conv) / 1e3, 3),
        "top_ops_ms": {k: round(v / 1e3, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]},
        "conv_layers_us": [round(v, 1) for v in layer_us],
    }


def profile_openvino(model: torch.nn.Module, x: torch.Tensor, dtype: str, calls: int) -> dict[str, Any]:
    import copy

    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded)
    folded.requires_grad_(False)
    engine = OpenVinoEngine(folded, dtype, torch.get_num_threads(), config={"PERF_COUNT": True})
    wall = _wall(engine, x, calls)
    request = engine.requests[tuple(x.shape[1:])]
    by_type: dict[str, float] = defaultdict(float)
    kernels: dict[str, int] = defaultdict(int)
    layers: list[list[float]] = []
    names: list[str] = []
    for _ in range(calls):
        engine(x)
        convs, names = [], []
        for info in request.get_profiling_info():
            us = info.real_time.total_seconds() * 1e6
            by_type[info.node_type] += us / calls
            if _is_conv(info.node_type):
                convs.append(us)
                names.append(info.node_name)
                kernels[info.exec_type] += 1
        layers.append(convs)
    conv = sum(v for k, v in by_type.items() if _is_conv(k))
    return {
        "wall_ms": round(wall * 1e3, 3),
        "conv_ms": round(conv / 1e3, 3),
        "other_ms": round((sum(by_type.values()) - conv) / 1e3, 3),
        "node_types_ms": {
            k: round(v / 1e3, 3) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:12]
        },
        "conv_kernels": {k: v // calls for k, v in kernels.items()},
        "conv_layers_us": [round(statistics.median(col), 1) for col in zip(*layers)],
        "conv_layer_names": names,  # the traced module paths: check that the order is the model's
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = create_model(args.net).eval()
    x = torch.randn(
        args.batch, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(1)
    )
    ind = profile_inductor(model, x, args.dtype, args.calls)
    ov = profile_openvino(model, x, args.dtype, args.calls)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/profile_engines.py", *(argv or [])]),
        "machine": machine_info("cpu"),
        "net": args.net,
        "batch": args.batch,
        "input_size": args.input_size,
        "dtype": args.dtype,
        "inductor": ind,
        "openvino": ov,
        "stem_us_inductor_openvino": [ind["conv_layers_us"][0], ov["conv_layers_us"][0]],
    }
    out = args.out or RESULTS / f"profile_engines_{args.net}_b{args.batch}_{args.dtype}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{args.net} b{args.batch} {args.dtype}: inductor {ind['wall_ms']} ms wall, {ind['conv_ms']} ms in "
        f"{len(ind['conv_layers_us'])} convs, {ind['other_ms']} ms other; openvino {ov['wall_ms']} ms wall, "
        f"{ov['conv_ms']} ms in {len(ov['conv_layers_us'])} convs, {ov['other_ms']} ms other"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
