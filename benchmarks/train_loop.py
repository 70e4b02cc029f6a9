"""What the input pipeline costs: resnet20 at batch 128 on the CIFAR-10 copy, in one process.

Four loops train the same network with the same optimizer, interleaved round by round so a
change in machine load hits all of them alike:

- bare: forward, backward and step on batches made before the clock starts (no data work at all);
- ours: `resnets.train.train()` itself (in-memory uint8 data, batched crop/flip, normalisation,
  progress bar, loss bookkeeping), timed by its own per-epoch images/s on a warm second epoch;
- torchvision ImageFolder + DataLoader with per-image transforms (RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize), with 0 and with 2 worker processes.

Each loop is timed in chunks of a few steps and summarised by the median chunk, which a burst of
load from other processes on a shared machine does not move much. Prints images/s and the
ratios to the bare loop; writes them with the machine and versions to benchmarks/results/. Usage: python benchmarks/train_loop.py [--data-dir data/cifar10-jpeg]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from resnets import create_model
from resnets.config import from_dict
from resnets.data import load_data
from resnets.train import train

BATCH = 128
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model.train(), opt


def _step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _chunked(model, opt, batches, chunk: int) -> list[float]:
    """images/s of each run of `chunk` steps, the first run (warm-up) left out."""
    rates, t0, seen = [], time.perf_counter(), 0
    for i, (x, y) in enumerate(batches, start=1):
        _step(model, opt, x, y)
        seen += len(y)
        if i % chunk == 0:
            rates.append(seen / (time.perf_counter() - t0))
            t0, seen = time.perf_counter(), 0
    return rates[1:]


def bare(data, chunks: int, chunk: int) -> list[float]:
    model, opt = _model_and_opt()
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    batches = []
    for _ in range((chunks + 1) * chunk):  # made before the clock starts
        idx = torch.randint(0, data.num_train, (BATCH,), generator=g)
        batches.append((((data.train_x[idx].float() / 255 - mean) / std).contiguous(), data.train_y[idx]))
    return _chunked(model, opt, batches, chunk)


def ours(data_dir: Path, chunks: int, chunk: int) -> list[float]:
    """train() with epochs of `chunk` steps: its per-epoch images/s times the training loop only
    (not the evaluation or the checkpoint that follow each epoch)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(
            {
                "model": "resnet20",
                "data": "cifar10",
                "data_dir": str(data_dir),
                "batch_size": BATCH,
                "epochs": chunks + 1,
                "warmup_epochs": 0.5,
                "lr": 0.05,
                "label_smoothing": 0.0,
                "flip": True,
                "train_subset": chunk * BATCH,
                "test_subset": BATCH,
                "out": out,
            }
        )
        # The progress bar is part of the loop being measured; its text goes nowhere.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
        with open(Path(out) / "metrics.csv") as f:
            return [float(r["images_per_s"]) for r in list(csv.DictReader(f))[1:]]


def torchvision_loader(data_dir: Path, chunks: int, chunk: int, workers: int) -> list[float]:
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    ds = datasets.ImageFolder(str(data_dir / "train"), transform=tf)
    n = (chunks + 1) * chunk * BATCH
    sampler = RandomSampler(ds, num_samples=n, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers, drop_last=True)
    model, opt = _model_and_opt()
    return _chunked(model, opt, loader, chunk)


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import numpy
    import torchvision

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # OpenMP threads spin-wait: on a shared machine these settings change CPU timings a lot.
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def summarise(rounds: list[dict[str, list[float]]]) -> dict[str, float]:
    """Ratios of median-chunk images/s, taken within each round (the loops of one round ran
    minutes apart under about the same load) and then the median over the rounds."""

    def ratio(a: str, b: str) -> float:
        per_round = [statistics.median(r[a]) / statistics.median(r[b]) for r in rounds]
        return round(statistics.median(per_round), 3)

    out = {f"{name}_vs_bare": ratio(name, "bare") for name in rounds[0] if name != "bare"}
    out["ours_vs_torchvision_0_workers"] = ratio("ours", "torchvision_0_workers")
    out["ours_vs_torchvision_2_workers"] = ratio("ours", "torchvision_2_workers")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data/cifar10-jpeg"), help="CIFAR-10 image tree")
    p.add_argument("--chunk", type=int, default=5, help="steps per timed chunk")
    p.add_argument("--chunks", type=int, default=6, help="timed chunks per loop and round (+1 warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not (args.data_dir / "train").is_dir():
        print(
            f"error: no CIFAR-10 image tree at {args.data_dir} (extract cifar10-jpeg.tar.gz there)",
            file=sys.stderr,
        )
        return 2
    data = load_data("cifar10", args.data_dir)  # decodes once into the cache, before any timing
    c, k = args.chunks, args.chunk
    loops = {
        "bare": lambda: bare(data, c, k),
        "ours": lambda: ours(args.data_dir, c, k),
        "torchvision_0_workers": lambda: torchvision_loader(args.data_dir, c, k, 0),
        "torchvision_2_workers": lambda: torchvision_loader(args.data_dir, c, k, 2),
    }
    rounds: list[dict[str, list[float]]] = []
    for r in range(args.rounds):
        rounds.append({})
        for name, loop in loops.items():
            rounds[-1][name] = [round(x, 1) for x in loop()]
            print(
                f"round {r + 1}: {name:22s} median {statistics.median(rounds[-1][name]):7.1f} images/s",
                flush=True,
            )
    ratios = summarise(rounds)
    result = {
        "benchmark": "train_loop",
        "model": "resnet20",
        "batch_size": BATCH,
        "steps_per_chunk": args.chunk,
        "timed_chunks_per_round": args.chunks,
        "rounds": args.rounds,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "images_per_s_per_chunk": rounds,
        "median_images_per_s_per_round": [{k: statistics.median(v) for k, v in r.items()} for r in rounds],
        "ratios": ratios,
    }
    for k, v in ratios.items():
        print(f"{k:32s} {v:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_loop_{datetime.now():%Y%m%d_%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
