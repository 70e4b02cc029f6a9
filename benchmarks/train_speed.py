"""Training speed: what each setting buys, and the whole `resnets train` loop against a bare loop.

For each network (CIFAR-10, 32x32, batch 128), in one process:

1. Settings. Bare step loops (forward, backward, SGD step on batches made in advance) in five
   settings: fp32 NCHW eager (the reference), channels-last, bf16 autocast, both, and both with
   torch.compile. They run interleaved, chunk by chunk, so a change of machine load hits all of
   them alike; each is summarised by its median chunk. The compiled loop's first step is timed on
   its own (the compile, with an empty inductor cache), and the run length at which compiling pays off is
   (first compiled step - compiled step) / (eager step - compiled step) steps.
2. The whole loop. `resnets.train.train()` with the settings `auto` chooses on this machine for
   a full CIFAR-10 run of the network (`resnets.runtime.choose_speed`; data, augmentation,
   bookkeeping and progress bar included), timed by its own per-epoch images/s over short epochs
   (the first, which compiles, left out), between two chunks of the bare fp32 NCHW eager loop;
   the ratio is taken within each round, then the median over rounds.
3. Work. FLOPs of a training step (counted on the meta device) per second of each setting,
   against the fp32 and bf16 matrix-multiply peaks measured in the same process.

Usage: python benchmarks/train_speed.py [--data-dir data/cifar10-jpeg] [--models resnet20 ...]
Writes benchmarks/results/train_speed_<date>.json with the machine and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from resnets import create_model
from resnets.bench import count_work, machine_info, time_interleaved
from resnets.config import from_dict
from resnets.data import load_data
from resnets.runtime import choose_speed
from resnets.train import train

BATCH = 128
SETTINGS = {  # name: (channels_last, bf16, compile)
    "fp32_nchw_eager": (False, False, False),
    "channels_last": (True, False, False),
    "bf16": (False, True, False),
    "channels_last_bf16": (True, True, False),
    "channels_last_bf16_compile": (True, True, True),
}


class Loop:
    """A bare training loop in one setting, stepping through batches made in advance."""

    def __init__(self, name: str, batches, setting):
        cl, self.bf16, comp = setting
        torch.manual_seed(0)
        self.fmt = torch.channels_last if cl else torch.contiguous_format
        self.model = create_model(name, num_classes=10).to(memory_format=self.fmt).train()
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        self.net = torch.compile(self.model) if comp else self.model
        self.batches = [(x.contiguous(memory_format=self.fmt), y) for x, y in batches]
        self.i = 0

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def make_batches(data, n: int):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    out = []
    for _ in range(n):
        idx = torch.randint(0, data.num_train, (BATCH,), generator=g)
        out.append((((data.train_x[idx].float() / 255 - mean) / std).contiguous(), data.train_y[idx]))
    return out


def chunk_rate(loop: Loop, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.step()
    return steps * BATCH / (time.perf_counter() - t0)


def part_settings(name: str, data, chunks: int, chunk: int) -> dict:
    batches = make_batches(data, 8)
    loops, first_step_s = {}, {}
    for key, setting in SETTINGS.items():
        loops[key] = Loop(name, batches, setting)
        t0 = time.perf_counter()
        loops[key].step()  # compiles the compiled one
        first_step_s[key] = time.perf_counter() - t0
        loops[key].step()
    rates = {k: [] for k in loops}
    for _ in range(chunks):
        for key, loop in loops.items():
            rates[key].append(chunk_rate(loop, chunk))
    med = {k: statistics.median(v) for k, v in rates.items()}
    step_s = {k: BATCH / v for k, v in med.items()}
    compiled, eager = "channels_last_bf16_compile", "channels_last_bf16"
    overhead = first_step_s[compiled] - step_s[compiled]
    saving = step_s[eager] - step_s[compiled]
    flops, _ = count_work(loops["fp32_nchw_eager"].model, batches[0][0], train=True)
    return {
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "images_per_s_per_chunk": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "vs_fp32_nchw_eager": {k: round(v / med["fp32_nchw_eager"], 3) for k, v in med.items()},
        "first_step_s": {k: round(v, 2) for k, v in first_step_s.items()},
        "compile_s": round(overhead, 1),
        "compile_saves_s_per_step": round(saving, 4),
        "compile_pays_off_after_steps": round(overhead / saving) if saving > 0 else None,
        "train_step_gflop": round(flops / 1e9, 2),
        "gflops_per_s": {k: round(flops / s / 1e9, 1) for k, s in step_s.items()},
    }


def ours_epochs(name: str, data_dir: Path, epochs: int, steps: int, speed) -> tuple[list[float], float]:
    """Per-epoch images/s of train() in the given speed settings (the first epoch left out), and
    the time of its first step."""
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(
            {
                "model": name,
                "data": "cifar10",
                "data_dir": str(data_dir),
                "batch_size": BATCH,
                "epochs": epochs + 1,
                "lr": 0.05,
                "label_smoothing": 0.0,
                "train_subset": steps * BATCH,
                "test_subset": BATCH,
                "amp": speed.amp,
                "channels_last": "on" if speed.channels_last else "off",
                "compile": "on" if speed.compile else "off",
                "threads": speed.threads,
                "out": out,
            }
        )
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            summary = train(cfg)
        with open(Path(out) / "metrics.csv") as f:
            return [float(r["images_per_s"]) for r in list(csv.DictReader(f))[1:]], summary["first_step_s"]


def part_loop(name: str, data, data_dir: Path, rounds: int, epochs: int, steps: int) -> dict:
    full_run_steps = 100 * (data.num_train // BATCH)  # a 100-epoch CIFAR-10 run, as in configs/
    speed = choose_speed(from_dict({"model": name}), torch.device("cpu"), full_run_steps)
    bare = Loop(name, make_batches(data, 8), SETTINGS["fp32_nchw_eager"])
    bare.step()
    per_round = []
    first = None
    for _ in range(rounds):
        before = statistics.median(chunk_rate(bare, steps // 2) for _ in range(3))
        ours, first = ours_epochs(name, data_dir, epochs, steps, speed)
        after = statistics.median(chunk_rate(bare, steps // 2) for _ in range(3))
        per_round.append(
            {"bare_before": round(before, 1), "ours_epochs": ours, "bare_after": round(after, 1)}
        )
    ratios = [
        statistics.median(r["ours_epochs"]) / ((r["bare_before"] + r["bare_after"]) / 2) for r in per_round
    ]
    return {
        "auto_settings": speed.as_dict(),
        "rounds": per_round,
        "ours_first_step_s": first,
        "ours_vs_bare_fp32_nchw_eager": round(statistics.median(ratios), 3),
        "per_round_ratio": [round(r, 3) for r in ratios],
    }


def matmul_peaks(n: int = 2048) -> dict[str, float]:
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        samples = time_interleaved(
            [lambda a=a, b=b: torch.mm(a, b)], torch.device("cpu"), min_repeats=5, max_seconds=10
        )[0]
        peaks[str(dtype).removeprefix("torch.")] = round(2 * n**3 / min(samples) / 1e9, 1)
    return peaks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data/cifar10-jpeg"), help="CIFAR-10 image tree")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "preact_resnet164"])
    p.add_argument("--chunks", type=int, default=5, help="timed chunks per setting")
    p.add_argument("--chunk", type=int, default=6, help="steps per chunk")
    p.add_argument("--rounds", type=int, default=2, help="whole-loop rounds")
    p.add_argument(
        "--epochs", type=int, default=3, help="timed epochs of train() per round (+1 that compiles)"
    )
    p.add_argument("--steps", type=int, default=16, help="steps per epoch of train()")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not (args.data_dir / "train").is_dir():
        print(
            f"error: no CIFAR-10 image tree at {args.data_dir} (extract cifar10-jpeg.tar.gz there)",
            file=sys.stderr,
        )
        return 2
    data = load_data("cifar10", args.data_dir)  # decoded once into the cache, before any timing
    # A fresh inductor cache: the first compile is timed as a user's first run meets it (a warm
    # on-disk cache from an earlier run compiles the same graphs in a few seconds).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_")
    peaks = matmul_peaks()
    print(f"matmul peak GFLOP/s: {peaks}", flush=True)
    result = {
        "benchmark": "train_speed",
        "batch_size": BATCH,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "matmul_peak_gflops_per_s": peaks,
        "models": {},
    }
    for name in args.models:
        settings = part_settings(name, data, args.chunks, args.chunk)
        for k in SETTINGS:
            dtype = "bfloat16" if SETTINGS[k][1] else "float32"
            settings.setdefault("fraction_of_matmul_peak", {})[k] = round(
                settings["gflops_per_s"][k] / peaks[dtype], 3
            )
        print(f"{name}: settings vs fp32 NCHW eager {settings['vs_fp32_nchw_eager']}", flush=True)
        print(
            f"{name}: compile {settings['compile_s']} s, saves {settings['compile_saves_s_per_step'] * 1e3:.1f} ms/step, "
            f"pays off after {settings['compile_pays_off_after_steps']} steps",
            flush=True,
        )
        loop = part_loop(name, data, args.data_dir, args.rounds, args.epochs, args.steps)
        print(
            f"{name}: resnets train (auto) vs bare fp32 NCHW eager {loop['ours_vs_bare_fp32_nchw_eager']}",
            flush=True,
        )
        result["models"][name] = {"settings": settings, "whole_loop": loop}
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_speed_{datetime.now():%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
