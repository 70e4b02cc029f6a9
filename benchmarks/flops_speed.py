"""Work against speed: GMACs per image against measured time, the 50-layer net of every family.

The papers compare networks by their multiply-adds; on a CPU the same GMACs can cost quite
different time (grouped convs, Res2Net's chain of narrow convs, the ops beside the convs). For
resnet50, preact_resnet50, wide_resnet50_2 (for scale: 2.8x the MACs), resnext50_32x4d,
res2net50_26w_4s, iresnet50 and iresgroup50:

1. Training. One optimizer step of `resnets.train.TrainStep` (forward, cross-entropy, backward,
   SGD with Nesterov momentum and the library's weight-decay groups; fp32, channels-last as
   `resnets train` runs, eager) on a fixed random batch, default 16
   images of 224x224. All nets run interleaved in one process (`resnets.bench.time_rounds`,
   one timed step of each net per round, the order alternating), each timed step after `settle`
   untimed steps of the same net, so that it meets the allocator and caches as step n+1 of a
   run does, not right after another net's step. The spread is the IQR over rounds. The MACs of
   a forward pass and the FLOPs of a training step are counted on the meta device at this size.
2. Inference, read from `benchmarks/engines.py`'s results (default
   benchmarks/results/engines_cpu.json): eager (`ours_eager`) and deployed (`auto`: the engine
   `resnets.deploy` picks) at batch 1 and 16, median and IQR over that file's rounds, as time
   per image. Those rounds interleave the engines of one net, not the nets: a gap between two
   nets there also holds any drift of the machine between their runs.
3. Findings, per panel: every pair of nets whose IQRs do not overlap (the gap exceeds the
   run-to-run noise) with the ratio of their medians, and each net's achieved GMAC/s relative
   to the reference net (resnet50): below 1 means its MACs cost more time than resnet50's. For
   training, whose nets are interleaved, the ratio is also taken round by round (paired).

One figure: x = GMACs per image, y = time per image (ms), error bars = IQR, a dashed line
through the origin at the reference net's time per GMAC; one panel per batch size and mode,
one for training, and one of the relative GMAC/s of every net in every panel.

Usage:
  python benchmarks/flops_speed.py --out benchmarks/results/flops_speed_cpu.json
  python benchmarks/flops_speed.py --smoke --out /tmp/fs.json --figure /tmp/fs.png
Writes the JSON (date, command, machine, versions, the engines file's own provenance) and the
figure (default docs/figures/flops_vs_speed.png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from resnets import create_model
from resnets.bench import count_work, machine_info, quartiles, time_rounds
from resnets.train import TrainStep, param_groups

NETS = [
    "resnet50",
    "preact_resnet50",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "res2net50_26w_4s",
    "iresnet50",
    "iresgroup50",
]
REFERENCE = "resnet50"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "figures" / "flops_vs_speed.png"
ENGINES_JSON = RESULTS / "engines_cpu.json"
# Inference series taken from the engines file: what the panels call them, and the engine key there.
MODES = {"eager": "ours_eager", "deployed": "auto"}
TRAIN = "train"
# A small learning rate: a fixed random batch and large steps would drive the weights towards
# non-finite values, and TrainStep skips the update of a non-finite step (less work timed).
LR = 1e-3
SMOKE = dict(size=32, batch=2, rounds=2, settle=0)


# --- training ---------------------------------------------------------------------------------


def train_step(name: str, batch: int, size: int):
    """A callable running one training step of `name` on a fixed batch, and the model."""
    torch.manual_seed(0)
    fmt = torch.channels_last
    model = create_model(name).to(memory_format=fmt).train()
    opt = torch.optim.SGD(param_groups(model, 5e-4, False), lr=LR, momentum=0.9, nesterov=True)
    step = TrainStep(model, opt, memory_format=fmt, name=name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return (lambda: step([(x, y)], lr=LR)), model


def measure_training(nets: list[str], batch: int, size: int, rounds: int, settle: int) -> dict[str, Any]:
    """Per net: counted work at `size`, and images/s of a training step over `rounds` interleaved rounds."""
    fns, models, rows = [], [], {}
    for name in nets:
        fn, model = train_step(name, batch, size)
        x1 = torch.zeros(1, 3, size, size)
        flops_train, _ = count_work(model, x1, train=True)
        macs = count_work(model, x1, train=False)[0] // 2
        rows[name] = {
            "name": name,
            "params": sum(p.numel() for p in model.parameters()),
            "gmacs_per_image": macs / 1e9,
            "train_step_gflop_per_image": flops_train / 1e9,
        }
        for _ in range(2):  # oneDNN picks and caches its kernels on the first calls of a shape
            fn()
        fns.append(fn)
        models.append(model)
        print(f"  {name}: {macs / 1e9:.3f} GMACs per image at {size}x{size}, warmed up", flush=True)
    samples = time_rounds(fns, torch.device("cpu"), rounds, settle=settle)
    for row, model in zip(rows.values(), models):
        # TrainStep skips the update of a non-finite step: the timing would then leave out the SGD step.
        row["weights_finite_after"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for name, s in zip(nets, samples):
        ips = [batch / t for t in s]
        ms = [t * 1e3 / batch for t in s]
        q1, med, q3 = quartiles(ips)
        m1, mmed, m3 = quartiles(ms)
        rows[name]["train"] = {
            "images_per_s": med,
            "images_per_s_iqr": [q1, q3],
            "ms_per_image": mmed,
            "ms_per_image_iqr": [m1, m3],
            "step_s_per_round": [round(t, 4) for t in s],
            "rounds": len(s),
            "train_gflops_per_s": rows[name]["train_step_gflop_per_image"] * batch / statistics.median(s),
        }
    return rows


# --- inference, from the engines file ---------------------------------------------------------


def series_key(batch: int, mode: str) -> str:
    return f"batch{batch}_{mode}"


def inference_points(engines: dict[str, Any], nets: list[str], batches: list[int]) -> dict[str, dict]:
    """{series: {net: point}} with time per image from the engines file's medians and IQRs."""
    out: dict[str, dict] = {series_key(b, m): {} for b in batches for m in MODES}
    for row in engines["rows"]:
        if row["name"] not in nets or row["batch"] not in batches:
            continue
        for mode, engine in MODES.items():
            rec = row["engines"].get(engine)
            if rec is None or "ms" not in rec:
                continue
            b = row["batch"]
            out[series_key(b, mode)][row["name"]] = {
                "gmacs_per_image": row["gmacs_per_image"],
                "ms_per_image": rec["ms"] / b,
                "ms_per_image_iqr": [v / b for v in rec["ms_iqr"]],
                "rounds": rec["rounds"],
                "input_size": row["input_size"],
                **({"backend": rec["backend"]} if rec.get("backend") else {}),
            }
    return out


# --- findings ---------------------------------------------------------------------------------


def noise_gaps(points: dict[str, tuple[float, float, float]]) -> list[dict[str, Any]]:
    """Every pair of nets, (q1, median, q3) of time each, faster first, slowest ratio first.

    A gap exceeds the noise when the two IQRs do not overlap: the faster net's q3 lies below the
    slower one's q1 (intervals that touch count as overlapping).
    """
    pairs = []
    for a, b in itertools.combinations(points, 2):
        if points[b][1] < points[a][1]:
            a, b = b, a
        fast, slow = points[a], points[b]
        pairs.append(
            {
                "faster": a,
                "slower": b,
                "ratio": slow[1] / fast[1],
                "exceeds_noise": fast[2] < slow[0],
            }
        )
    return sorted(pairs, key=lambda p: -p["ratio"])


def gmacs_per_s_vs(points: dict[str, dict], ref: str) -> dict[str, float]:
    """Each net's achieved GMAC/s (GMACs per image / time per image) over the reference net's."""
    if ref not in points:
        return {}

    def rate(p: dict) -> float:
        return p["gmacs_per_image"] / p["ms_per_image"]

    return {n: rate(p) / rate(points[ref]) for n, p in points.items()}


def paired_vs(rows: dict[str, Any], ref: str) -> dict[str, dict]:
    """Training only (nets interleaved): GMAC/s over the reference's, round by round, median and IQR."""
    if ref not in rows:
        return {}
    r_steps, r_gmacs = rows[ref]["train"]["step_s_per_round"], rows[ref]["gmacs_per_image"]
    out = {}
    for name, row in rows.items():
        ratios = [
            (row["gmacs_per_image"] / t) / (r_gmacs / rt)
            for t, rt in zip(row["train"]["step_s_per_round"], r_steps)
        ]
        q1, med, q3 = quartiles(ratios)
        out[name] = {"median": med, "iqr": [q1, q3]}
    return out


def panel(label: str, points: dict[str, dict], ref: str) -> dict[str, Any]:
    """One panel's points and findings: relative GMAC/s, and which pairs' gaps exceed the noise."""
    spans = {
        n: (p["ms_per_image_iqr"][0], p["ms_per_image"], p["ms_per_image_iqr"][1]) for n, p in points.items()
    }
    gaps = noise_gaps(spans)
    return {
        "label": label,
        "points": points,
        "gmacs_per_s_vs_reference": gmacs_per_s_vs(points, ref),
        "gaps_exceeding_noise": [p for p in gaps if p["exceeds_noise"]],
        "gaps_within_noise": [p for p in gaps if not p["exceeds_noise"]],
    }


# --- figure -----------------------------------------------------------------------------------


def _spread_labels(fracs: list[float], gap: float, top: float = 0.97) -> list[float]:
    """Label heights (axes fractions) at least `gap` apart, each as near its point as that allows."""
    order = sorted(range(len(fracs)), key=lambda i: fracs[i])
    out = list(fracs)
    for lo, hi in zip(order, order[1:]):  # push up from the lowest
        out[hi] = max(out[hi], out[lo] + gap)
    if order and out[order[-1]] > top:  # then down from the top, where the stack left the axes
        out[order[-1]] = top
        for lo, hi in zip(reversed(order[:-1]), reversed(order[1:])):
            out[lo] = min(out[lo], out[hi] - gap)
    return out


def _label_points(ax, pts: dict[str, dict], xmax: float, ymax: float, colours: dict[str, Any]) -> None:
    """Name every point: to its right where the next 30% of the axis holds no other point and the
    name fits, else to the left; each side's names stacked so that they do not overlap."""
    xs = {n: q["gmacs_per_image"] for n, q in pts.items()}
    sides: dict[bool, list[str]] = {True: [], False: []}
    for n, x in xs.items():
        free = not any(x < xo <= x + 0.3 * xmax for m, xo in xs.items() if m != n)
        sides[free and x + 0.3 * xmax <= xmax].append(n)
    for right, names in sides.items():
        fracs = _spread_labels([pts[n]["ms_per_image"] / ymax for n in names], 0.055)
        for n, f in zip(names, fracs):
            x = xs[n]
            ax.annotate(
                n,
                (x, pts[n]["ms_per_image"]),
                xytext=(x + (0.03 if right else -0.03) * xmax, f),
                textcoords=ax.get_xaxis_transform(),
                ha="left" if right else "right",
                va="center",
                fontsize=7,
                color=colours[n],
                arrowprops=dict(arrowstyle="-", color=colours[n], lw=0.4, alpha=0.6),
            )


def plot(result: dict[str, Any], path: Path) -> None:
    """The figure: one scatter panel per series, and the relative GMAC/s of all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, nets, ref = result["panels"], result["nets"], result["reference"]
    batches = result["settings"]["inference_batches"]
    style = {n: (plt.get_cmap("tab10")(i % 10), "osD^vPX*"[i % 8]) for i, n in enumerate(nets)}
    nrows = max(2, len(batches))
    fig, axes = plt.subplots(nrows, 3, figsize=(15, 4.6 * nrows), squeeze=False)
    places = {series_key(b, m): (r, c) for r, b in enumerate(batches) for c, m in enumerate(MODES)}
    places[TRAIN] = (0, 2)
    for key, (r, c) in places.items():
        ax = axes[r][c]
        p = panels.get(key, {"label": key, "points": {}})
        pts = p["points"]
        ax.set_title(p["label"], fontsize=10)
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("ms per image (median, IQR)")
        ax.grid(True, alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        for n, q in pts.items():
            lo, hi = q["ms_per_image_iqr"]
            colour, marker = style[n]
            ax.errorbar(
                q["gmacs_per_image"],
                q["ms_per_image"],
                yerr=[[q["ms_per_image"] - lo], [hi - q["ms_per_image"]]],
                fmt=marker,
                color=colour,
                capsize=3,
                markersize=6,
                label=n,
                zorder=3,
            )
        xmax = max(q["gmacs_per_image"] for q in pts.values()) * 1.18
        ymax = max(q["ms_per_image_iqr"][1] for q in pts.values()) * 1.12
        ax.set_xlim(0, xmax)
        ax.set_ylim(0, ymax)
        if ref in pts:
            slope = pts[ref]["ms_per_image"] / pts[ref]["gmacs_per_image"]
            ax.plot([0, xmax], [0, slope * xmax], "--", color="grey", lw=0.8, zorder=1)
        _label_points(ax, pts, xmax, ymax, {n: st[0] for n, st in style.items()})
    # Relative GMAC/s: one group of bars per net, one bar per panel; training's with the IQR of
    # its round-by-round ratios.
    ax = axes[1][2]
    keys = [k for k in places if panels.get(k, {}).get("gmacs_per_s_vs_reference")]
    width = 0.8 / max(1, len(keys))
    top = 1.0
    for j, key in enumerate(keys):
        rel = panels[key]["gmacs_per_s_vs_reference"]
        shown = [n for n in nets if n in rel]
        xs = [nets.index(n) + (j - (len(keys) - 1) / 2) * width for n in shown]
        paired = panels[key].get("gmacs_per_s_vs_reference_paired")
        yerr = None
        if paired:
            yerr = [
                [max(0.0, rel[n] - paired[n]["iqr"][0]) for n in shown],
                [max(0.0, paired[n]["iqr"][1] - rel[n]) for n in shown],
            ]
        ax.bar(xs, [rel[n] for n in shown], width, yerr=yerr, capsize=2, label=panels[key]["label"])
        top = max([top] + [rel[n] for n in shown] + ([paired[n]["iqr"][1] for n in shown] if paired else []))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylim(0, top * 1.35)
    ax.set_xticks(range(len(nets)))
    ax.set_xticklabels(nets, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"GMAC/s relative to {ref}")
    ax.set_title(f"GMAC/s over {ref}'s (above 1: cheaper MACs)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if keys:
        ax.legend(fontsize=7, ncol=2, loc="upper center")
    for r in range(nrows):
        for c in range(3):
            if (r, c) not in places.values() and (r, c) != (1, 2):
                axes[r][c].axis("off")
    m, s = result["machine"], result["settings"]
    fig.suptitle(
        f"GMACs against time per image, {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}\n"
        f"training: batch {s['batch']}, {s['size']}x{s['size']}, fp32 channels-last eager, "
        f"{s['rounds']} interleaved rounds; inference: {result['engines_json']['path']}; "
        f"dashed: {ref}'s ms per GMAC",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=NETS)
    p.add_argument("--batch", type=int, default=16, help="training batch [16]")
    p.add_argument("--size", type=int, default=224, help="training input size [224]")
    p.add_argument("--rounds", type=int, default=7, help="interleaved training rounds [7]")
    p.add_argument("--settle", type=int, default=1, help="untimed steps before each timed one [1]")
    p.add_argument("--inference-batches", nargs="+", type=int, default=[1, 16])
    p.add_argument(
        "--reference",
        default=REFERENCE,
        help="the net others' GMAC/s are divided by (the first net if not measured) [resnet50]",
    )
    p.add_argument("--engines-json", type=Path, default=ENGINES_JSON)
    p.add_argument("--out", type=Path, default=RESULTS / "flops_speed_cpu.json")
    p.add_argument("--figure", type=Path, default=FIGURE)
    p.add_argument("--smoke", action="store_true", help=f"tiny settings that only check it runs: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.batch < 2:
        raise SystemExit("error: --batch must be at least 2 (batch norm in training mode)")
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    if not args.engines_json.is_file():
        raise SystemExit(
            f"error: no engines results at {args.engines_json} (benchmarks/engines.py writes them)"
        )
    engines = json.loads(args.engines_json.read_text())
    engines_path = args.engines_json.resolve()
    ref = args.reference if args.reference in args.nets else args.nets[0]

    result: dict[str, Any] = {
        "benchmark": "flops_speed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/flops_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info("cpu"),
        "settings": {
            "batch": args.batch,
            "size": args.size,
            "rounds": args.rounds,
            "settle": args.settle,
            "inference_batches": args.inference_batches,
            "train_step": "resnets.train.TrainStep, fp32, channels-last, eager, SGD nesterov "
            f"momentum 0.9, lr {LR}, weight decay 5e-4 on conv/linear weights",
        },
        "reference": ref,
        "nets": args.nets,
        "engines_json": {
            "path": os.path.relpath(engines_path, ROOT)
            if engines_path.is_relative_to(ROOT)
            else str(engines_path),
            "date": engines.get("date"),
            "command": engines.get("command"),
            "machine": engines.get("machine"),
        },
    }
    # The engines file may come from another machine than this run's training steps.
    result["engines_json"]["same_cpu"] = (engines.get("machine") or {}).get("cpu") == result["machine"]["cpu"]
    print(f"training steps: batch {args.batch}, {args.size}x{args.size}, {args.rounds} rounds", flush=True)
    rows = measure_training(args.nets, args.batch, args.size, args.rounds, args.settle)
    result["rows"] = list(rows.values())
    for n in (n for n, r in rows.items() if not r["weights_finite_after"]):
        print(f"warning: {n}'s weights went non-finite; its skipped updates are missing from its time")
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)

    train_points = {
        n: {
            "gmacs_per_image": r["gmacs_per_image"],
            "ms_per_image": r["train"]["ms_per_image"],
            "ms_per_image_iqr": r["train"]["ms_per_image_iqr"],
            "rounds": r["train"]["rounds"],
            "input_size": args.size,
        }
        for n, r in rows.items()
    }
    panels = {}
    for key, pts in inference_points(engines, args.nets, args.inference_batches).items():
        batch, mode = key.removeprefix("batch").split("_")
        panels[key] = panel(f"inference, batch {batch}, {mode}", pts, ref)
    panels[TRAIN] = panel(f"training step, batch {args.batch}", train_points, ref)
    panels[TRAIN]["gmacs_per_s_vs_reference_paired"] = paired_vs(rows, ref)
    result["panels"] = panels
    missing = {k: [n for n in args.nets if n not in p["points"]] for k, p in panels.items()}
    if any(missing.values()):
        result["not_in_engines_json"] = {k: v for k, v in missing.items() if v}

    for n, r in rows.items():
        t = r["train"]
        print(
            f"{n}: {r['gmacs_per_image']:.3f} GMACs, train {t['images_per_s']:.2f} img/s "
            f"(IQR {t['images_per_s_iqr'][0]:.2f}-{t['images_per_s_iqr'][1]:.2f})",
            flush=True,
        )
    for pnl in panels.values():
        rel = ", ".join(f"{n} {v:.2f}" for n, v in pnl["gmacs_per_s_vs_reference"].items())
        gaps = "; ".join(f"{g['slower']}/{g['faster']} {g['ratio']:.2f}" for g in pnl["gaps_exceeding_noise"])
        print(f"{pnl['label']}: GMAC/s vs {ref}: {rel}", flush=True)
        print(f"  gaps beyond the IQRs: {gaps or 'none'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.figure)
    print(f"wrote {args.out} and {args.figure}")
    return result


if __name__ == "__main__":
    main()
