"""Resident memory of a long training run, per epoch: it must not grow after the first epoch.

    python benchmarks/memory_growth.py                      # resnet20 on the digits, 40 epochs
    python benchmarks/memory_growth.py --data cifar10 --data-dir data/cifar10-jpeg --train-subset 5000 --epochs 20

Trains in this process with `resnets.train.train` and reads the resident set size (RSS) after
each epoch, once its checkpoint, metrics and evaluation are done. Prints the table and the
growth (largest RSS of the last quarter of the run minus the largest of the first quarter,
epoch 1 left out), and writes them to benchmarks/results/memory_growth_<time>.json with the machine and versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from resnets.config import from_dict
from resnets.train import train

# Less than one allocator block; a leak of 1 MiB per epoch over a 40-epoch run exceeds it.
MAX_GROWTH_MB = 16.0


def rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best portable number
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, sum(ys) / n
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--test-subset", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = p.parse_args()

    rows: list[dict] = []
    start = rss_mb()

    def record(row: dict) -> None:
        gc.collect()
        rows.append({"epoch": row["epoch"], "rss_mb": round(rss_mb(), 2), "test_top1": row["test_top1"]})
        print(f"epoch {row['epoch']:3d}  rss {rows[-1]['rss_mb']:8.1f} MiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(
            {
                "model": args.model,
                "data": args.data,
                "data_dir": args.data_dir,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "train_subset": args.train_subset,
                "test_subset": args.test_subset,
                "warmup_epochs": min(3.0, args.epochs / 4),
                "quiet": True,
                "out": str(Path(tmp) / "run"),
            }
        )
        t0 = time.perf_counter()
        train(cfg, callback=record)
        wall = time.perf_counter() - t0

    rss = [r["rss_mb"] for r in rows]
    # RSS after an epoch toggles between a few levels (glibc keeps or returns blocks of 10-30 MiB
    # from one epoch to the next), so single values and medians move with how often a block
    # is held. A leak raises the envelope: compare the largest RSS of the last quarter of the run
    # with the largest of the first quarter (epoch 1 left out).
    quarter = max(len(rss) // 4, 1)
    early, late = rss[1 : 1 + quarter] or rss[:1], rss[-quarter:]
    growth = max(late) - max(early)
    result = {
        "benchmark": "memory_growth",
        "config": vars(args),
        "rss_before_mb": round(start, 2),
        "per_epoch": rows,
        "growth_of_largest_last_vs_first_quarter_mb": round(growth, 2),
        "largest_above_epoch_1_mb": round(max(rss) - rss[0], 2),
        "slope_second_half_mb_per_epoch": round(slope(rss[len(rss) // 2 :]), 4),
        "limit_growth_mb": MAX_GROWTH_MB,
        "wall_s": round(wall, 1),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    }
    result["ok"] = growth <= MAX_GROWTH_MB
    print(
        f"\nRSS after epoch 1: {rss[0]:.1f} MiB; largest in the first quarter {max(early):.1f}, in the last "
        f"quarter {max(late):.1f} MiB: growth {growth:+.1f} MiB (limit {MAX_GROWTH_MB}); least-squares "
        f"slope over the second half {result['slope_second_half_mb_per_epoch']:+.3f} MiB/epoch -> "
        f"{'no growth' if result['ok'] else 'GROWS'}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_growth_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
