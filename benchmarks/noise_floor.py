"""How far apart two copies of the same model time on this machine: the floor under every ratio.

Ours, the peer, and a deep copy of each run interleaved (`resnets.bench.time_rounds`). The
peer copy / peer ratio is what identical code and weights give here (memory placement, drift);
an ours / peer ratio inside that spread is not a difference between the implementations.

Usage:
  python benchmarks/noise_floor.py res2net50_26w_4s --batch-size 16
  python benchmarks/noise_floor.py wide_resnet50_2 --batch-size 16 --mode train --rounds 6
Results append to benchmarks/results/noise_floor_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from resnets import create_model
from resnets.bench import _step_fn, build_peer, machine_info, peer_of, share_weights, time_rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mode", choices=["eval", "train"], default="eval")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "noise_floor_cpu.json"
    )
    args = p.parse_args(argv)

    torch.manual_seed(0)
    peer_spec = peer_of(args.name)
    if peer_spec is None:
        raise SystemExit(f"error: {args.name} has no torchvision / timm peer")
    ours = create_model(args.name)
    peer = build_peer(peer_spec)
    share_weights(ours, peer, peer_spec.layout)
    models = {"ours": ours, "peer": peer, "ours_copy": copy.deepcopy(ours), "peer_copy": copy.deepcopy(peer)}
    x = torch.randn(args.batch_size, 3, 224, 224)
    fns = []
    for m in models.values():
        m.train(args.mode == "train")
        fns.append(_step_fn(m, x, args.mode, torch.float32, autocast=False))
    for fn in fns:
        fn()
        fn()
    samples = time_rounds(fns, torch.device("cpu"), args.rounds)
    peer_med = statistics.median(samples[1])
    rows = {}
    for (label, _), s in zip(models.items(), samples):
        rows[label] = {
            "latency_ms": statistics.median(s) * 1e3,
            "over_peer": statistics.median(s) / peer_med,
            "over_peer_paired": statistics.median(a / b for a, b in zip(s, samples[1])),
            "rounds": len(s),
        }
        print(
            f"  {label:<10} {rows[label]['latency_ms']:9.1f} ms  /peer {rows[label]['over_peer']:.3f} "
            f"(paired {rows[label]['over_peer_paired']:.3f})",
            flush=True,
        )
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["noise_floor.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info("cpu"),
        "name": args.name,
        "peer": f"{peer_spec.library}.{peer_spec.name}",
        "batch_size": args.batch_size,
        "mode": args.mode,
        "rows": rows,
    }
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([*old, result], indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
