"""One convolution two ways: the conv kernel against `conv_as_gemm` (patches + one matrix multiply).

This is the measurement behind `deploy`'s per-shape choice (`resnets.deploy.GemmConv2d`): for
the conv shapes of the ResNet family's ImageNet stages (at batch 1 and 16) and CIFAR stages (at
batch 128), both paths run interleaved on channels-last inputs, and the script prints GFLOP/s
of each and the ratio conv time / gemm time (above 1: the matrix multiply is faster).

Usage:
  python benchmarks/gemm_conv.py                # writes benchmarks/results/gemm_conv_<device>.json
  python benchmarks/gemm_conv.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from resnets.bench import machine_info, time_interleaved
from resnets.deploy import MAX_GEMM_ROWS, conv_as_gemm

# (in, out, kernel, stride, input size, batch, where it occurs)
SHAPES = [
    (1024, 1024, 3, 1, 7, 1, "wide_resnet50_2 layer4 3x3"),
    (1024, 1024, 3, 2, 14, 1, "wide_resnet50_2 layer4 first 3x3"),
    (2048, 1024, 1, 1, 7, 1, "wide_resnet50_2 layer4 1x1 in"),
    (1024, 2048, 1, 1, 7, 1, "wide_resnet50_2 layer4 1x1 out"),
    (512, 512, 3, 1, 7, 1, "resnet50 layer4 3x3"),
    (2048, 512, 1, 1, 7, 1, "resnet50 layer4 1x1 in"),
    (512, 512, 3, 1, 14, 1, "wide_resnet50_2 layer3 3x3"),
    (256, 256, 3, 1, 14, 1, "resnet50 layer3 3x3"),
    (128, 128, 3, 1, 28, 1, "resnet50 layer2 3x3"),
    (1024, 1024, 3, 1, 7, 16, "wide_resnet50_2 layer4 3x3"),
    (512, 512, 3, 1, 7, 16, "resnet50 layer4 3x3"),
    (512, 512, 3, 1, 14, 16, "wide_resnet50_2 layer3 3x3"),
    (2048, 512, 1, 1, 7, 16, "resnet50 layer4 1x1 in"),
    (64, 64, 3, 1, 8, 128, "resnet56 stage 3"),
    (640, 640, 3, 1, 8, 128, "wrn28_10 stage 3"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cpu")
    out = args.out or Path(__file__).resolve().parent / "results" / f"gemm_conv_{dev.type}_{args.dtype}.json"
    info = machine_info("cpu")
    print(f"machine: {info}", flush=True)
    rows = []
    for cin, cout, k, s, size, batch, where in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, s, k // 2).eval().to(dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(batch, cin, size, size).to(dtype=dtype, memory_format=torch.channels_last)
        with torch.inference_mode():
            fns = [lambda c=conv, x=x: c(x), lambda c=conv, x=x: conv_as_gemm(x, c)]
            for fn in fns:
                fn()
            samples = time_interleaved(fns, dev, min_repeats=5, max_seconds=8, rel_spread=0.05)
            y = conv(x)
        flops = 2 * y.numel() * cin * k * k
        t_conv, t_gemm = (statistics.median(v) for v in samples)
        row = {
            "where": where,
            "in": cin,
            "out": cout,
            "kernel": k,
            "stride": s,
            "input_size": size,
            "batch": batch,
            "rows": y.shape[0] * y.shape[2] * y.shape[3],
            "timed_by_deploy": y.shape[0] * y.shape[2] * y.shape[3] <= MAX_GEMM_ROWS,
            "conv_gflops_per_s": flops / t_conv / 1e9,
            "gemm_gflops_per_s": flops / t_gemm / 1e9,
            "conv_over_gemm": t_conv / t_gemm,
            "paired_median": statistics.median(a / b for a, b in zip(*samples)),
        }
        rows.append(row)
        print(
            f"  {where:<34} b{batch:<4} rows {row['rows']:6d}: conv {row['conv_gflops_per_s']:6.1f}, "
            f"gemm {row['gemm_gflops_per_s']:6.1f} GFLOP/s; conv/gemm time {row['conv_over_gemm']:.2f}",
            flush=True,
        )
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["gemm_conv.py", *(argv if argv is not None else sys.argv[1:])]),
        "dtype": args.dtype,
        "machine": info,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
