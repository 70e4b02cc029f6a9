"""The speed targets: our models against torchvision / timm, deploy mode, training steps, CIFAR nets.

Every comparison is a ratio measured in one process with the two sides interleaved call by call
(`resnets.bench`), so other load on the machine hits both alike. Parts:

- eager:  ours / peer latency, eval, batch 1 and 16 (target <= 1.02);
- train:  ours / peer time of one training step (forward, backward, SGD step), batch 16 (<= 1.02);
- deploy: peer eager float32 / ours deployed, float32 (target >= 1.3) and bfloat16 (>= 2);
- cifar:  resnet56, preact_resnet164, wrn28_10, resnext29_8x64d at 32x32, batch 128: eager vs
          deployed (float32, bfloat16) latency, interleaved, and training images/s;
- agree:  top-1 agreement of a deployed bf16 model with float32 on the CIFAR-10 test set, for a
          model trained by `resnets train` (--checkpoint; target >= 99%).

Each run also times a large fp32 and bf16 matmul, and reports every model's achieved GFLOP/s as
a fraction of that measured peak. Results merge into benchmarks/results/speed_<device>.json: a
part run again replaces that part, so the parts can be run one at a time on a busy machine.

Usage:
  python benchmarks/speed.py                          # all timing parts
  python benchmarks/speed.py --only eager --quick     # one part, fewer repeats
  python benchmarks/speed.py --only deploy --nets resnet50 --batches 1
  python benchmarks/speed.py --only agree --checkpoint runs/cifar10_resnet20/model.safetensors
  python benchmarks/speed.py --device cuda            # the same on a GPU (adds float16)
  bash benchmarks/gpu_check.sh                        # every GPU check in one call (see there)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from resnets import create_model, deploy
from resnets.bench import bench_model, machine_info, summarize, time_interleaved
from resnets.deploy import low_precision_supported

NETS = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "res2net50_26w_4s", "preact_resnet50"]
CIFAR_NETS = ["resnet56", "preact_resnet164", "wrn28_10", "resnext29_8x64d"]
PARTS = ["eager", "train", "deploy", "cifar", "agree"]
TARGETS = {"eager": 1.02, "train": 1.02, "deploy_float32": 1.3, "deploy_bfloat16": 2.0, "agree": 0.99}
RESULTS = Path(__file__).resolve().parent / "results"


def load_snapshot() -> dict[str, Any]:
    """Load average and the busiest other processes: whether other work ran during a part."""
    snap: dict[str, Any] = {"load_avg": [round(v, 2) for v in os.getloadavg()]}
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=5
        ).stdout.splitlines()[1:]
        me = os.getpid()
        busy = [line.split(None, 2) for line in out]
        snap["busy_processes"] = [
            {"pid": int(p), "cpu_percent": float(c), "command": n}
            for p, c, n in busy[:6]
            if int(p) != me and float(c) >= 10.0
        ]
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return snap


def matmul_peak(device: torch.device, dtypes: list[torch.dtype], n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of an n x n x n matmul per dtype: the practical ceiling the models are measured against."""
    peaks = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            torch.mm(a, b)
        samples = time_interleaved(
            [lambda a=a, b=b: torch.mm(a, b)], device, min_repeats=repeats, max_seconds=20, rel_spread=0.03
        )[0]
        peaks[str(dtype).removeprefix("torch.")] = 2 * n**3 / min(samples) / 1e9
    return peaks


def with_peak(row: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    peak = peaks.get(row["dtype"])
    row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak if peak else None
    return row


def part_eager(args, peaks) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batches:
        for name in args.nets:
            row = bench_model(name, batch_size=batch, device=args.device, peers=True, **args.timing)
            rows.append(with_peak(row, peaks))
            report(f"eager b{batch}", row, f"ours/peer {row['ratio']:.3f}")
    return rows


def part_train(args, peaks) -> list[dict[str, Any]]:
    rows = []
    for name in args.nets:
        row = bench_model(name, batch_size=16, device=args.device, mode="train", peers=True, **args.timing)
        rows.append(with_peak(row, peaks))
        report("train b16", row, f"ours/peer {row['ratio']:.3f}")
    return rows


def part_deploy(args, peaks) -> list[dict[str, Any]]:
    rows = []
    for dtype in args.dtypes:
        for batch in args.batches:
            for name in args.nets:
                row = bench_model(
                    name,
                    batch_size=batch,
                    device=args.device,
                    deploy=True,
                    dtype=dtype,
                    peers=True,
                    **args.timing,
                )
                row["speedup_vs_peer_eager_float32"] = 1 / row["ratio"]
                rows.append(with_peak(row, peaks))
                report(f"deploy {row['dtype']} b{batch}", row, f"peer/ours {1 / row['ratio']:.2f}x")
    return rows


def part_cifar(args, peaks) -> list[dict[str, Any]]:
    """Eager and deployed inference interleaved in one loop; then training images/s."""
    dev = torch.device(args.device)
    rows = []
    for name in args.cifar_nets:
        torch.manual_seed(0)
        model = create_model(name).to(dev).eval()
        x = torch.randn(128, 3, 32, 32, device=dev)
        variants: dict[str, Any] = {"eager": model}
        compile_s = {}
        for dtype in args.dtypes:
            fast = deploy(model, dtype=None if dtype == torch.float32 else dtype)
            t0 = time.perf_counter()
            fast(x)
            compile_s[str(dtype).removeprefix("torch.")] = time.perf_counter() - t0
            variants[f"deploy_{str(dtype).removeprefix('torch.')}"] = fast

        def infer(m, x=x):
            def call():
                with torch.inference_mode():
                    return m(x)

            return call

        fns = [infer(m) for m in variants.values()]
        for fn in fns:
            fn()
        samples = time_interleaved(fns, dev, **timing_kwargs(args))
        eager_ms = summarize(samples[0])["latency_ms"]
        row: dict[str, Any] = {"name": name, "batch_size": 128, "input_size": 32, "compile_s": compile_s}
        for (label, _), s in zip(variants.items(), samples):
            stats = summarize(s)
            row[label] = {**stats, "images_per_s": 128 / (stats["latency_ms"] / 1e3)}
            if label != "eager":
                row[label]["speedup_vs_eager"] = eager_ms / stats["latency_ms"]
                row[label]["speedup_paired_median"] = statistics.median(a / b for a, b in zip(samples[0], s))
        train = bench_model(name, batch_size=128, device=args.device, mode="train", **args.timing)
        row["train"] = {
            k: train[k]
            for k in (
                "latency_ms",
                "latency_iqr_ms",
                "repeats",
                "images_per_s",
                "gflops_per_s",
                "peak_mem_mb",
            )
        }
        row["train"]["fraction_of_matmul_peak"] = with_peak(train, peaks)["fraction_of_matmul_peak"]
        rows.append(row)
        speedups = ", ".join(
            f"{k} {v['speedup_vs_eager']:.2f}x" for k, v in row.items() if k.startswith("deploy_")
        )
        print(
            f"  cifar {name:<18} eager {eager_ms:8.1f} ms/batch, {speedups}; "
            f"train {row['train']['images_per_s']:.0f} img/s",
            flush=True,
        )
    return rows


def part_agree(args, peaks) -> list[dict[str, Any]]:
    """Top-1 of float32 eager vs bf16 deployed on the CIFAR-10 test set, and their agreement."""
    from dataclasses import replace

    from resnets.checkpoint import load_model_file
    from resnets.data import load_data

    if not args.checkpoint:
        raise SystemExit(
            "error: --only agree needs --checkpoint RUN/model.safetensors (from `resnets train`)"
        )
    dev = torch.device(args.device)
    model, meta = load_model_file(args.checkpoint)
    data = load_data(meta.get("data", "cifar10"), args.data_dir)
    if "mean" in meta and "std" in meta:  # the training run's normalisation
        data = replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    model = model.to(dev).eval()
    fast = deploy(model, dtype=torch.bfloat16)
    fast32 = deploy(model)  # float32: its logits must match the original's to 1e-4
    n = agree = hit32 = hit16 = 0
    max_diff32 = max_logit = 0.0
    for xb, yb in data.eval_batches(500, 0, 1):
        xb, yb = xb.to(dev), yb.to(dev)
        with torch.inference_mode():
            logits = model(xb)
        p32 = logits.argmax(1)
        p16 = fast(xb).argmax(1)
        max_diff32 = max(max_diff32, (fast32(xb) - logits).abs().max().item())
        max_logit = max(max_logit, logits.abs().max().item())
        n += len(yb)
        agree += (p32 == p16).sum().item()
        hit32 += (p32 == yb).sum().item()
        hit16 += (p16 == yb).sum().item()
    row = {
        "checkpoint": str(args.checkpoint),
        "name": model.name,
        "data": meta.get("data", "cifar10"),
        "n": n,
        "backend": fast.backend,
        "top1_float32": hit32 / n,
        "top1_bfloat16_deploy": hit16 / n,
        "agreement": agree / n,
        "target": TARGETS["agree"],
        "met": agree / n >= TARGETS["agree"],
        "deploy_float32_backend": fast32.backend,
        "deploy_float32_max_abs_diff": max_diff32,
        "max_abs_logit": max_logit,
    }
    print(
        f"  agree {row['name']} on {row['data']}: top-1 fp32 {row['top1_float32']:.4f}, bf16 deploy "
        f"{row['top1_bfloat16_deploy']:.4f}, agreement {row['agreement']:.4f} over {n} images; fp32 deploy "
        f"max abs logit diff {max_diff32:.2e} (logits up to {max_logit:.1f})",
        flush=True,
    )
    return [row]


def report(label: str, row: dict[str, Any], what: str) -> None:
    print(
        f"  {label:<16} {row['name']:<18} {row['latency_ms']:9.1f} ms (IQR {row['latency_iqr_ms']:.1f}) "
        f"vs {row.get('peer', '-')} {row.get('peer_latency_ms', float('nan')):9.1f} ms: {what}; "
        f"{row['gflops_per_s']:.0f} GFLOP/s",
        flush=True,
    )


def targets(part: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row against the issue's target for its part."""
    out = []
    for r in rows:
        if part in ("eager", "train"):
            value, goal, ok = r["ratio"], TARGETS[part], r["ratio"] <= TARGETS[part]
            what = "ours/peer latency"
        elif part == "deploy":
            value = r["speedup_vs_peer_eager_float32"]
            goal = TARGETS[f"deploy_{r['dtype']}"] if f"deploy_{r['dtype']}" in TARGETS else None
            ok = None if goal is None else value >= goal
            what = "peer eager fp32 / ours deployed"
        else:
            continue
        out.append(
            {
                "part": part,
                "name": r["name"],
                "batch_size": r["batch_size"],
                "dtype": r["dtype"],
                "measure": what,
                "value": round(value, 4),
                "paired_median": round(
                    r["ratio_paired_median"] if part != "deploy" else 1 / r["ratio_paired_median"], 4
                ),
                "target": goal,
                "met": ok,
            }
        )
    return out


def timing_kwargs(args) -> dict[str, Any]:
    return {"min_repeats": args.timing["min_repeats"], "max_seconds": args.timing["max_seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller time budget per model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nets", nargs="+", default=NETS, help="ImageNet nets of the eager/train/deploy parts")
    p.add_argument("--cifar-nets", nargs="+", default=CIFAR_NETS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="eager and deploy batch sizes")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "bfloat16", "float16"],
        help="deploy/cifar dtypes [all native]",
    )
    p.add_argument("--checkpoint", help="agree part: a CIFAR-10 model.safetensors from `resnets train`")
    p.add_argument("--data-dir", default="data", help="agree part: where cifar10 lives [data]")
    p.add_argument(
        "--out", type=Path, default=None, help="results file [benchmarks/results/speed_<device>.json]"
    )
    p.add_argument(
        "--table", action="store_true", help="print the results file as a Markdown table, run nothing"
    )
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    out_path = args.out or RESULTS / f"speed_{dev.type}.json"
    if args.table:
        print(markdown_table(json.loads(out_path.read_text())))
        return 0
    parts = args.only or [p for p in PARTS if p != "agree"]
    args.timing = (
        {"min_repeats": 3, "max_seconds": 6.0} if args.quick else {"min_repeats": 7, "max_seconds": 40.0}
    )
    candidates = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type == "cuda" else [])
    args.dtypes = [
        d
        for d in candidates
        if low_precision_supported(d, dev)
        and (not args.dtypes or str(d).removeprefix("torch.") in args.dtypes)
    ]
    results = json.loads(out_path.read_text()) if out_path.exists() else {}

    print(f"machine: {machine_info(args.device)}", flush=True)
    peaks = matmul_peak(dev, args.dtypes, 2048 if args.quick else 4096, 3 if args.quick else 5)
    print(f"matmul peak GFLOP/s: { {k: round(v, 1) for k, v in peaks.items()} }", flush=True)
    runners = {
        "eager": part_eager,
        "train": part_train,
        "deploy": part_deploy,
        "cifar": part_cifar,
        "agree": part_agree,
    }
    for part in parts:
        print(f"[{part}]", flush=True)
        before, t0 = load_snapshot(), time.perf_counter()
        rows = runners[part](args, peaks)
        after = load_snapshot()
        results[part] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick,
            "machine": machine_info(args.device),
            "matmul_peak_gflops": peaks,
            # Another job on the machine shows here: a load average above our own 2 threads, busy processes.
            "load_before": before,
            "load_after": after,
            "seconds": round(time.perf_counter() - t0, 1),
            "targets": targets(part, rows),
            "rows": rows,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1) + "\n")  # after each part: a crash keeps the rest
    print_summary(results)
    print(f"wrote {out_path}")
    return 0


def markdown_table(results: dict[str, Any]) -> str:
    """The README summary: one line per network and setting, ratios as measured."""
    lines = [
        "| part | network | batch | dtype | ours | peer | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for part in ("eager", "train", "deploy"):
        rows = {(r["name"], r["batch_size"], r["dtype"]): r for r in results.get(part, {}).get("rows", [])}
        for t in results.get(part, {}).get("targets", []):
            r = rows[(t["name"], t["batch_size"], t["dtype"])]
            lines.append(
                f"| {part} | {t['name']} | {t['batch_size']} | {t['dtype']} | {r['latency_ms']:.1f} ms | "
                f"{r['peer']} {r['peer_latency_ms']:.1f} ms | {t['value']:.3f} ({t['measure']}) | "
                f"{t['target']} | {'yes' if t['met'] else 'no'} |"
            )
    cifar = results.get("cifar", {}).get("rows", [])
    if cifar:
        lines += [
            "",
            "| CIFAR net (32x32, batch 128) | eager ms | deploy fp32 | deploy bf16 | train img/s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in cifar:
            cells = [
                f"{d['latency_ms']:.0f} ms ({d['speedup_vs_eager']:.2f}x)" if d else "-"
                for d in (r.get("deploy_float32"), r.get("deploy_bfloat16"))
            ]
            lines.append(
                f"| {r['name']} | {r['eager']['latency_ms']:.0f} | {cells[0]} | {cells[1]} | "
                f"{r['train']['images_per_s']:.0f} |"
            )
    lines.append("")
    for part in PARTS:
        if part in results:
            load = results[part]["load_before"]["load_avg"][0], results[part]["load_after"]["load_avg"][0]
            lines.append(f"- {part}: {results[part]['date']}, load average {load[0]} -> {load[1]}")
    peaks = next((v["matmul_peak_gflops"] for v in results.values() if "matmul_peak_gflops" in v), None)
    if peaks:
        lines += ["", "matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())]
    return "\n".join(lines)


def print_summary(results: dict[str, Any]) -> None:
    rows = [t for part in PARTS if part in results for t in results[part].get("targets", [])]
    if not rows:
        return
    print("\ntarget check (value: per-run medians; paired: median of per-round ratios)")
    for t in rows:
        mark = {True: "ok", False: "MISSED", None: "-"}[t["met"]]
        print(
            f"  {t['part']:<7} {t['name']:<18} b{t['batch_size']:<3} {t['dtype']:<9} {t['measure']:<32} "
            f"{t['value']:6.3f} (paired {t['paired_median']:6.3f}) target {t['target']}: {mark}"
        )


if __name__ == "__main__":
    sys.exit(main())
