"""Every CPU inference engine on the same weights, interleaved in one process.

For each network and batch size: the peer's eager model (torchvision / timm, float32), and
`resnets.deploy` with backend inductor, openvino, onnxruntime and auto, all on the same weights
and the same input. Timings are medians of interleaved rounds (`resnets.bench.time_interleaved`),
each timed call after two untimed ones (other engines' spinning threads would bill it
otherwise), reported as speed-ups over the peer's eager float32 (ours where no peer exists);
each engine's max abs logit difference from the eager model, its first-call (build / compile /
measure) time and its achieved GFLOP/s against a large fp32 matmul timed in the same process are
recorded beside it. `auto` builds its own
engines, so its first call is the sum of theirs plus the race.

`--dtype bfloat16` deploys every engine in bf16 (onnxruntime has no bf16 convolutions on CPU and is
left out): the peer runs eagerly in fp32 and under bf16 autocast, and the target is OpenVINO's
bf16; achieved GFLOP/s are against a bf16 matmul. Needs a CPU with native bf16 (AVX-512 BF16 /
AMX); elsewhere deploy stays fp32 and the benchmark stops.

`--int8 RUN` (a `resnets train` run on CIFAR-10, e.g. a degradation study's resnet20): int8
deploy (openvino / NNCF and inductor / PT2E, calibrated on 512 training images) against the fp32
and bf16 deploys (where the CPU has bf16) at batch 16, and the top-1 agreement with fp32 and
accuracy on the whole test set. `--int8-speed NET...`: the same deploys of ImageNet nets with
random weights, speed only.

Usage:
  python benchmarks/engines.py --nets resnet50 iresnet50 --batches 1 16
  python benchmarks/engines.py --dtype bfloat16 --out benchmarks/results/engines_cpu_bf16.json
  python benchmarks/engines.py --nets none --int8 runs/degradation_e5_s0/degradation_runs/resnet20
  python benchmarks/engines.py --nets none --int8-speed resnet50 --batches 16
Results: benchmarks/results/engines_<date>.json (machine and versions inside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from resnets import create_model, deploy
from resnets.bench import (
    build_peer,
    count_work,
    machine_info,
    peer_of,
    quartiles,
    share_weights,
    time_interleaved,
)
from resnets.deploy import _top1_agreement, low_precision_supported

NETS = [
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "res2net50_26w_4s",
    "preact_resnet50",
    "iresnet50",
    "iresgroup50",
]
ENGINES = ["inductor", "openvino", "onnxruntime", "auto"]
# The engines that run each deploy precision on CPU, and the ones the target compares auto with.
ENGINES_OF = {"float32": ENGINES, "bfloat16": ["inductor", "openvino", "auto"]}
RIVALS = {"float32": ("openvino", "onnxruntime"), "bfloat16": ("openvino",)}
# How each precision is named in the result keys (fraction_of_bf16_matmul_peak, ...).
PEAK_KEY = {"float32": "fp32", "bfloat16": "bf16"}
# Untimed calls before each timed one: the previous engine's threads (OpenMP, TBB, onnxruntime)
# spin on after its call and would otherwise bill the next engine (see bench.time_interleaved).
SETTLE = 2
RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import matmul_peak  # noqa: E402  (the same fp32 matmul ceiling as the speed benchmark)


def bench_net(
    name: str, batch: int, size: int, peak: float, max_seconds: float, dtype: str = "float32"
) -> dict[str, Any]:
    torch.manual_seed(0)
    ours = create_model(name).eval()
    peer_spec = peer_of(name)
    peer = None
    if peer_spec is not None:
        peer = build_peer(peer_spec, ours.num_classes).eval()
        if not share_weights(ours, peer, peer_spec.layout):
            raise SystemExit(f"{name}: the peer's weights could not be loaded into ours")
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ours(x)
    scale = max(1.0, want.abs().max().item())
    macs = count_work(ours, x[:1], False)[0] // 2
    row: dict[str, Any] = {
        "name": name,
        "batch": batch,
        "input_size": size,
        "gmacs_per_image": macs / 1e9,
        "peer": None if peer_spec is None else f"{peer_spec.library}.{peer_spec.name}",
        "dtype": dtype,
        "engines": {},
    }
    fns, names = [], []
    if peer is not None:

        def run_peer():
            with torch.inference_mode():
                return peer(x)

        with torch.inference_mode():
            row["peer_max_abs_diff"] = (peer(x) - want).abs().max().item()
        fns.append(run_peer)
        names.append("peer_eager")
        if dtype == "bfloat16":

            def run_peer_autocast():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return peer(x)

            fns.append(run_peer_autocast)
            names.append("peer_eager_bf16_autocast")
    with torch.inference_mode():
        fns.append(lambda: ours(x))
    names.append("ours_eager")
    for engine in ENGINES_OF[dtype]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = deploy(ours, backend=engine, dtype=dtype)
            t0 = time.perf_counter()
            got = fast(x)
        first = time.perf_counter() - t0
        if fast.precision != dtype:
            raise SystemExit(f"{name}: deploy ran {fast.precision}, not {dtype}, on this CPU")
        rec = {
            "first_call_s": round(first, 2),
            "backend": fast.backend,
            "max_abs_diff_over_scale": (got.float() - want).abs().max().item() / scale,
            "top1_agreement_with_fp32": _top1_agreement(got, want),
        }
        if engine == "auto":
            rec["report"] = fast.report
        row["engines"][engine] = rec
        fns.append(lambda f=fast: f(x))
        names.append(engine)
        print(f"  {name} b{batch} {engine}: built in {first:.1f} s ({fast.backend})", flush=True)
    with torch.inference_mode():
        samples = time_interleaved(
            fns, torch.device("cpu"), min_repeats=5, max_seconds=max_seconds, settle=SETTLE
        )
    ref_name = "peer_eager" if peer is not None else "ours_eager"
    med = {n: statistics.median(s) for n, s in zip(names, samples)}
    for n, s in zip(names, samples):
        entry = row["engines"].setdefault(n, {})
        entry["ms"] = round(med[n] * 1e3, 3)
        entry["ms_iqr"] = [round(v * 1e3, 3) for v in quartiles(s)[::2]]
        entry["rounds"] = len(s)
        entry["speedup_over_peer_eager"] = round(med[ref_name] / med[n], 3)
        entry["gflops"] = round(2 * macs * batch / med[n] / 1e9, 1)
        entry[f"fraction_of_{PEAK_KEY[dtype]}_matmul_peak"] = round(2 * macs * batch / med[n] / 1e9 / peak, 3)
    fastest_engine = min(RIVALS[dtype], key=lambda n: med[n])
    row["auto_over_fastest_engine"] = round(med[fastest_engine] / med["auto"], 3)
    row["inductor_over_fastest_engine"] = round(med[fastest_engine] / med["inductor"], 3)
    row["fastest_engine"] = fastest_engine
    return row


def _precision_deploys(model: torch.nn.Module, calib: list[torch.Tensor]) -> dict[str, Any]:
    """fp32 inductor, bf16 inductor and OpenVINO (where the CPU has bf16), int8 OpenVINO / NNCF and
    inductor / PT2E deploys of `model`, int8 calibrated on `calib`."""
    deployed = {"fp32_inductor": deploy(model, backend="inductor")}
    if low_precision_supported(torch.bfloat16, torch.device("cpu")):
        for backend in ("inductor", "openvino"):
            deployed[f"bf16_{backend}"] = deploy(model, dtype="bfloat16", backend=backend)
    for backend in ("openvino", "inductor"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = deploy(model, dtype="int8", backend=backend, calibration=calib)
        deployed[f"int8_{backend}"] = d
    return deployed


def _time_deploys(deployed: dict[str, Any], x: torch.Tensor, max_seconds: float) -> dict[str, float]:
    """Median seconds per call of each deploy on `x`, interleaved (engines built first)."""
    for d in deployed.values():
        d(x)
    samples = time_interleaved(
        [lambda d=d: d(x) for d in deployed.values()],
        torch.device("cpu"),
        max_seconds=max_seconds,
        settle=SETTLE,
    )
    return {k: statistics.median(s) for k, s in zip(deployed, samples)}


def bench_int8_speed(name: str, size: int, batch: int, max_seconds: float) -> dict[str, Any]:
    """Speed of the int8 deploys of an ImageNet net with random weights against its fp32 and bf16
    deploys. Calibrated on random inputs, so agreement is not measured: speed only."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    gen = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(4)]
    deployed = _precision_deploys(model, calib)
    x = torch.randn(batch, 3, size, size, generator=gen)
    med = _time_deploys(deployed, x, max_seconds)
    bf16 = [med[k] for k in deployed if k.startswith("bf16_")]
    macs = count_work(model, x[:1], False)[0] // 2
    return {
        "name": name,
        "batch": batch,
        "input_size": size,
        "engines": {
            k: {
                "ms": round(med[k] * 1e3, 3),
                "speedup_over_fp32_deploy": round(med["fp32_inductor"] / med[k], 3),
                "speedup_over_bf16_deploy": round(min(bf16) / med[k], 3) if bf16 else None,
                "gops": round(2 * macs * batch / med[k] / 1e9, 1),
            }
            for k in deployed
        },
    }


def bench_int8(run: Path, data_dir: str, max_seconds: float) -> dict[str, Any]:
    from dataclasses import replace

    from resnets.checkpoint import load_model_file
    from resnets.data import load_data

    path = run / "model.safetensors" if run.is_dir() else run
    model, meta = load_model_file(path)
    model.eval()
    data = load_data(meta.get("data", "cifar10"), data_dir)
    if "mean" in meta and "std" in meta:
        data = replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    from resnets.data.augment import normalize

    # Calibration comes from the first 512 training images (no augmentation), never the test set.
    train_x = data.train_x[:512]
    calib = [normalize(train_x[i : i + 64], data.mean, data.std) for i in range(0, len(train_x), 64)]
    deployed = _precision_deploys(model, calib)
    first: dict[str, float] = {}
    counts = {k: {"hit": 0, "agree": 0} for k in deployed}
    n = hit32 = 0
    for xb, yb in data.eval_batches(500, 0, 1):
        with torch.inference_mode():
            p32 = model(xb).argmax(1)
        hit32 += (p32 == yb).sum().item()
        n += len(yb)
        for k, d in deployed.items():
            t0 = time.perf_counter()
            p = d(xb).argmax(1)
            first.setdefault(k, time.perf_counter() - t0)
            counts[k]["hit"] += (p == yb).sum().item()
            counts[k]["agree"] += (p == p32).sum().item()
    x = next(iter(data.eval_batches(16, 0, 1)))[0]
    med = _time_deploys(deployed, x, max_seconds)
    bf16 = [med[k] for k in deployed if k.startswith("bf16_")]
    return {
        "run": str(run),
        "name": model.name,
        "test_images": n,
        "top1_fp32_eager": hit32 / n,
        "engines": {
            k: {
                "top1": counts[k]["hit"] / n,
                "top1_agreement_with_fp32": counts[k]["agree"] / n,
                "batch16_ms": round(med[k] * 1e3, 3),
                "speedup_over_fp32_deploy": round(med["fp32_inductor"] / med[k], 3),
                # over the faster of the bf16 deploys (inductor, OpenVINO), where the CPU has bf16
                "speedup_over_bf16_deploy": round(min(bf16) / med[k], 3) if bf16 else None,
                "first_call_s": round(first[k], 2),
                "calibration_top1_agreement": deployed[k].calibration_agreement or None,
            }
            for k in deployed
        },
        "calibration_images": sum(len(c) for c in calib),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=NETS, help="'none' for no ImageNet nets")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--max-seconds", type=float, default=20.0, help="timing budget per case")
    p.add_argument("--dtype", choices=sorted(ENGINES_OF), default="float32", help="deploy precision")
    p.add_argument("--int8", type=Path, help="a CIFAR-10 training run for the int8 part")
    p.add_argument(
        "--int8-speed", nargs="+", default=[], metavar="NET", help="int8 speed (random weights) of these nets"
    )
    p.add_argument("--data-dir", default="data/cifar10-jpeg")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dtype != "float32" and not low_precision_supported(
        getattr(torch, args.dtype), torch.device("cpu")
    ):
        raise SystemExit(f"this CPU has no native {args.dtype}; deploy would stay float32")
    peak = matmul_peak(torch.device("cpu"), [getattr(torch, args.dtype)], 2048, 5)[args.dtype]
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/engines.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info("cpu"),
        "dtype": args.dtype,
        f"{PEAK_KEY[args.dtype]}_matmul_peak_gflops": round(peak, 1),
        "rows": [],
    }
    out = args.out or RESULTS / f"engines_{datetime.now():%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    nets = [] if args.nets == ["none"] else args.nets
    for name in nets:
        for batch in args.batches:
            report["rows"].append(bench_net(name, batch, args.input_size, peak, args.max_seconds, args.dtype))
            r = report["rows"][-1]
            print(
                f"{name} b{batch}: "
                + ", ".join(f"{k} {v['speedup_over_peer_eager']:.2f}x" for k, v in r["engines"].items())
                + f"; auto picked {r['engines']['auto']['backend']}",
                flush=True,
            )
            out.write_text(json.dumps(report, indent=1) + "\n")
    for name in args.int8_speed:
        for batch in args.batches:
            row = bench_int8_speed(name, args.input_size, batch, args.max_seconds)
            report.setdefault("int8_speed", []).append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    if args.int8:
        report["int8"] = bench_int8(args.int8, args.data_dir, args.max_seconds)
        print(json.dumps(report["int8"], indent=1), flush=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
