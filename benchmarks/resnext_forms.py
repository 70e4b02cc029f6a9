"""ResNeXt's three equivalent forms (Xie et al. 2017, Fig. 3) timed against each other.

The same weights (converted with `resnets.models.resnext.convert_form`) in form a (C paths,
summed), b (C paths, concatenated, one 1x1) and c (grouped conv): eager forward at each batch
size, the deployed model (`resnets.deploy`, BN folded and compiled; `--deploy-backend`) at each
batch size, and a training step (forward, backward, SGD), interleaved round by round
(`resnets.bench.time_rounds`); ratios are medians over form c's. The deployed forms are
checked against their eager outputs, and each one's first call (compile) is timed.

Usage:
  python benchmarks/resnext_forms.py                                   # resnext50_32x4d, 224 px
  python benchmarks/resnext_forms.py --name resnext29_8x64d --size 32 --rounds 3
  python benchmarks/resnext_forms.py --size 112 --deploy-backend none  # eager and training only
Writes benchmarks/results/resnext_forms_<name>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from resnets import create_model
from resnets.bench import _step_fn, machine_info, time_rounds
from resnets.models.resnext import FORMS, convert_form

RESULTS = Path(__file__).resolve().parent / "results"


def build_forms(name: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ref = create_model(name)
    models = {}
    for form in FORMS:
        m = create_model(name, resnext_form=form)
        m.load_state_dict(convert_form(ref.state_dict(), ref.spec, form))
        models[form] = m
    return models


def time_case(models: dict, x: torch.Tensor, mode: str, rounds: int) -> dict[str, dict[str, float]]:
    fns = []
    for m in models.values():
        m.train(mode == "train")
        fns.append(_step_fn(m, x, mode, torch.float32, autocast=False))
    for fn in fns:  # warm-up: allocator, oneDNN primitives
        fn()
    samples = time_rounds(fns, torch.device("cpu"), rounds)
    c = samples[list(models).index("c")]
    return {
        form: {
            "latency_ms": statistics.median(s) * 1e3,
            "over_c": statistics.median(s) / statistics.median(c),
            "over_c_paired": statistics.median(a / b for a, b in zip(s, c)),
            "rounds": len(s),
        }
        for form, s in zip(models, samples)
    }


def deploy_forms(models: dict, x: torch.Tensor, backend: str) -> tuple[dict, dict]:
    """Each form deployed and called once on x: (deployed modules, {form: first-call seconds and
    max abs difference to the eager logits over their scale})."""
    from resnets import deploy

    out, info = {}, {}
    for form, m in models.items():
        m.eval()
        with torch.no_grad():
            want = m(x)
        fast = deploy(m, backend=backend)
        t0 = time.perf_counter()
        got = fast(x)
        info[form] = {
            "first_call_s": round(time.perf_counter() - t0, 2),
            "max_abs_diff_over_scale": (got - want).abs().max().item() / max(1.0, want.abs().max().item()),
            "backend": fast.backend,
        }
        out[form] = fast
    return out, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="resnext50_32x4d")
    p.add_argument("--size", type=int, default=224, help="square input size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--train-batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--deploy-backend",
        default="inductor",
        help="backend of the deployed rows (inductor, openvino, onnxruntime, auto; none = skip)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    start = time.perf_counter()
    models = build_forms(args.name)
    cases = [("eval", b) for b in args.batch_sizes]
    if args.deploy_backend != "none":
        cases += [("deploy", b) for b in args.batch_sizes]
    cases += [("train", args.train_batch_size)]
    rows = []
    for mode, batch in cases:
        x = torch.randn(batch, 3, args.size, args.size)
        extra = {}
        if mode == "deploy":
            deployed, extra["deployed"] = deploy_forms(models, x, args.deploy_backend)
            result = time_case(deployed, x, "eval", args.rounds)
        else:
            result = time_case(models, x, mode, args.rounds)
        rows.append({"mode": mode, "batch_size": batch, "forms": result, **extra})
        line = "  ".join(f"{f} {r['latency_ms']:8.1f} ms ({r['over_c']:.2f}x c)" for f, r in result.items())
        print(f"{mode:<5} b{batch:<3} {line}", flush=True)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/resnext_forms.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.name,
        "input_size": args.size,
        "machine": machine_info("cpu"),
        "load_average": list(os.getloadavg()),
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    out = args.out or RESULTS / f"resnext_forms_{args.name}_{datetime.now(timezone.utc):%Y%m%d_%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
