"""End to end: a trained run, `resnets predict` on its held-out images saved as PNG files, and
the ONNX, TorchScript and OpenVINO files `resnets export` makes of it, each fed with nothing but
the preprocessing its own metadata records (read with that runtime's API, applied here with PIL
and numpy, as a user of the file would). Prints and writes the top-1 of each and the largest
logit difference between them.

    python benchmarks/export_predict_check.py                    # trains the default digits run first
    python benchmarks/export_predict_check.py --run runs/digits  # an existing digits run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import resnets
from resnets.bench import machine_info
from resnets.data.digits import load_digits_data
from resnets.export import export, load_source
from resnets.predict import predict


def prepare(path: Path, meta: dict[str, str]) -> np.ndarray:
    """One image as the file's metadata says: channels, shorter side to size / crop_pct, centre
    square, (pixels / 255 - mean) / std."""
    size, crop = int(meta["input_size"]), float(meta["crop_pct"])
    im = Image.open(path).convert("L" if meta["in_chans"] == "1" else "RGB")
    if (crop, im.size) != (1.0, (size, size)):
        scale = round(size / crop) / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BILINEAR)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / 255
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))
    return ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def onnx_runner(path: Path):
    import onnx
    import onnxruntime as ort

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return meta, lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]


def torchscript_runner(path: Path):
    extra = dict.fromkeys(resnets.preprocess.METADATA_KEYS, "")
    module = torch.jit.load(str(path), _extra_files=extra)
    meta = {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return meta, run


def openvino_runner(path: Path):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    meta = {k: model.get_rt_info([k]).astype(str) for k in resnets.preprocess.METADATA_KEYS}
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return meta, lambda x: compiled(x)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a digits training run (default: train one for --epochs)")
    ap.add_argument("--epochs", type=int, help="epochs of that run (default: the default recipe's)")
    ap.add_argument("--out", default="benchmarks/results/export_predict_check.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="export_check_"))
    run = Path(args.run) if args.run else work / "run"
    if not args.run:
        cmd = ["resnets", "train", "--out", str(run), "--quiet"]
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        subprocess.run(cmd, check=True)
    data = load_digits_data()
    images = work / "images"
    images.mkdir()
    labels = {}
    for i, (x, y) in enumerate(zip(data.test_x, data.test_y)):
        name = f"{i:03d}_label{int(y)}.png"
        Image.fromarray(x[0].numpy()).save(images / name)
        labels[name] = int(y)

    result: dict = {"machine": machine_info(), "run": str(run), "images": len(labels)}
    model, prep, _ = load_source(str(run), None)
    model.eval()
    with torch.no_grad():  # the tensors the run evaluated on, normalised as it did
        x = (data.test_x.float() / 255 - data.mean[0]) / data.std[0]
        result["pytorch_top1"] = float((model(x).argmax(1) == data.test_y).float().mean())
    preds = predict(str(run), [str(images)], top=1)
    result["predict_top1"] = float(np.mean([labels[Path(p["image"]).name] == int(p["top"][0]["class"]) for p in preds]))

    logits = {}
    runners = {"onnx": (onnx_runner, "m.onnx"), "torchscript": (torchscript_runner, "m.pt"), "openvino": (openvino_runner, "m.xml")}
    for fmt, (runner, name) in runners.items():
        t = time.perf_counter()
        export(model, work / name, fmt, preprocessing=prep)
        meta, run_file = runner(work / name)
        names = sorted(labels)
        batch = np.stack([prepare(images / n, meta) for n in names])
        logits[fmt] = run_file(batch)
        top1 = float(np.mean(logits[fmt].argmax(1) == np.array([labels[n] for n in names])))
        result[f"{fmt}_top1"] = top1
        result[f"{fmt}_export_s"] = round(time.perf_counter() - t, 2)
    fmts = list(logits)
    result["max_abs_logit_diff_between_files"] = max(
        float(np.abs(logits[a] - logits[b]).max()) for i, a in enumerate(fmts) for b in fmts[i + 1 :]
    )
    for k, v in result.items():
        if k != "machine":
            print(f"{k:36s} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
