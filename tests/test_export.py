"""ONNX, TorchScript and OpenVINO exports compute what the PyTorch model computes, at any batch and
image size, and carry the training run's preprocessing in their metadata."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from cli_checks import assert_one_error_line, run_cli, snapshot
from torch import nn

from resnets import create_model, save_weights
from resnets.checkpoint import save_model_file
from resnets.cli import main
from resnets.export import export, load_source
from resnets.preprocess import METADATA_KEYS, Preprocessing, preprocessing_for

ort = pytest.importorskip("onnxruntime")
# torch.jit.load announces its own deprecation; the file format is what C++ consumers read.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]


def trained_like(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Random weights with BN statistics measured on random data, as after training.

    With the fresh running statistics (mean 0, var 1) activations grow with depth and the logits
    reach the hundreds, where float32 rounding alone exceeds the 1e-4 tolerance. BN scales below
    1 (as trained nets mostly have) keep a random Res2Net-50's float32 error near 2e-5, against
    1e-4 with scales around 1 (measured against float64).
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = None  # cumulative average: one batch sets the statistics
            bn.weight.uniform_(0.2, 0.6, generator=g)
            bn.bias.normal_(0.0, 0.2, generator=g)
        model.train()(torch.randn(8, model.spec.in_chans, size, size, generator=g))
    return model.eval()


def onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


FAMILIES = [  # one model of each family, at a small input it accepts
    ("resnet18", 64),
    ("preact_resnet18", 64),
    ("wrn16_4", 32),
    ("resnext50_32x4d", 64),
    ("res2net50_26w_4s", 64),
    ("iresnet18", 64),
]


@pytest.mark.parametrize("name,size", FAMILIES)
def test_onnx_matches_pytorch_at_another_batch_size(tmp_path, name, size):
    model = trained_like(create_model(name), size)
    export(model, tmp_path / "m.onnx", "onnx", input_size=size)  # traced at batch 2
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_logits(tmp_path / "m.onnx", x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("name,size", [("res2net50_26w_4s", 64), ("iresnet18", 64)])
def test_torchscript_matches_pytorch_at_another_batch_size(tmp_path, name, size):
    # One block per stage: tracing a Res2Net-50 takes ~10 s here, and each stage's first block
    # (the one with the pooled split) is the part worth checking.
    depths = (1, 1, 1, 1) if name.startswith("res2net") else None
    model = trained_like(create_model(name, **({"depths": depths} if depths else {})), size)
    export(model, tmp_path / "m.pt", "torchscript", input_size=size)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-4


def test_cli_export_with_weights(tmp_path, capsys):
    model = trained_like(create_model("resnet20", num_classes=3), 32)
    save_weights(model, tmp_path / "w.safetensors")
    out = tmp_path / "m.onnx"
    assert (
        main(
            ["export", "resnet20", str(out), "--weights", str(tmp_path / "w.safetensors"), "--format", "onnx"]
        )
        == 0
    )
    assert "onnx" in capsys.readouterr().out
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert np.abs(onnx_logits(out, x) - model(x).numpy()).max() <= 1e-4


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    assert "unknown model" in error("export", "resnet19", str(tmp_path / "m.onnx"), "--format", "onnx")
    assert "does not exist" in error(
        "export", "resnet20", "m.onnx", "--format", "onnx", "--weights", "nope.pth"
    )
    assert "format" in error("export", "resnet20", "m.onnx", "--format", "tflite")


# --- from a training run's file, with its preprocessing ----------------------------------------------

DIGITS_INFO = {  # what `resnets train` stores beside the weights of its default run
    "data": "digits",
    "classes": [f"digit {i}" for i in range(10)],
    "mean": [0.2647],
    "std": [0.3657],
    "image_size": 32,
}


@pytest.fixture(autouse=True)
def _skip_without_openvino(request):
    """A test parametrized with fmt="openvino" needs the package (the `openvino` extra)."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("fmt") == "openvino":
        pytest.importorskip("openvino")


def digits_run(folder) -> tuple[nn.Module, object]:
    """A run folder as `resnets train` leaves it for its default recipe: a 1-channel resnet20."""
    model = trained_like(create_model("resnet20", in_chans=1), 32)
    folder.mkdir(exist_ok=True)
    save_model_file(folder / "model.safetensors", model, DIGITS_INFO)
    return model, folder


def read_metadata(path, fmt: str) -> dict[str, str]:
    """The metadata of an exported file, read as its format's own readers read it."""
    if fmt == "onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    if fmt == "torchscript":
        files = dict.fromkeys(METADATA_KEYS, "")
        torch.jit.load(str(path), _extra_files=files)
        return {k: v.decode() for k, v in files.items()}
    import openvino as ov

    model = ov.Core().read_model(str(path))
    return {k: model.get_rt_info(k).astype(str) for k in METADATA_KEYS if model.has_rt_info(k)}


EXPECTED_METADATA = {
    "model": "resnet20",
    "data": "digits",
    "num_classes": "10",
    "in_chans": "1",
    "input_size": "32",
    "mean": "[0.2647]",
    "std": "[0.3657]",
    "classes": json.dumps(DIGITS_INFO["classes"]),
    "crop_pct": "1.0",
    "interpolation": "bilinear",
}


def run_exported(path, fmt: str, x: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        return onnx_logits(path, x)
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(x).numpy()
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x.numpy())[0]


@pytest.mark.parametrize("fmt,name", [("onnx", "m.onnx"), ("torchscript", "m.pt"), ("openvino", "m.xml")])
def test_a_one_channel_run_exports_with_its_preprocessing(tmp_path, capsys, fmt, name):
    model, run = digits_run(tmp_path / "run")
    out = tmp_path / name
    assert main(["export", str(run), str(out)]) == 0  # the format from the extension
    printed, err = capsys.readouterr()
    diff = float(re.search(r"max abs difference from PyTorch (\S+)", printed).group(1))
    assert diff <= 1e-4 and err == ""  # no random-weights warning for a run
    meta = read_metadata(out, fmt)
    assert meta == EXPECTED_METADATA
    assert Preprocessing.from_metadata(meta) == preprocessing_for(model, DIGITS_INFO)
    # Another batch and another image size than the 2 x 32 x 32 example it was traced at.
    x = torch.randn(5, 1, 40, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(run_exported(out, fmt, x) - expected).max() <= 1e-4


def test_onnx_made_at_224_runs_at_96_and_at_a_non_square_size(tmp_path, capsys):
    model = trained_like(create_model("resnet18", num_classes=7), 96)
    save_weights(model, tmp_path / "w.safetensors")
    out = tmp_path / "r18.onnx"
    assert main(["export", str(tmp_path / "w.safetensors"), str(out)]) == 0
    assert "input batch x 3 x height x width" in capsys.readouterr().out
    meta = read_metadata(out, "onnx")  # no training run: the ImageNet defaults of the model
    assert meta["input_size"] == "224" and meta["crop_pct"] == "0.875" and meta["data"] == ""
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(meta["classes"]) == [str(i) for i in range(7)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for shape in [(1, 3, 96, 96), (2, 3, 128, 160)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (shape[0], 7) and np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("fmt,name", [("onnx", "s.onnx"), ("openvino", "s.xml")])
def test_static_fixes_batch_and_size(tmp_path, capsys, fmt, name):
    model, run = digits_run(tmp_path / "run")
    out = tmp_path / name
    assert main(["export", str(run), str(out), "--static", "--batch-size", "4", "--input-size", "40"]) == 0
    assert "input 4 x 1 x 40 x 40" in capsys.readouterr().out
    assert read_metadata(out, fmt)["input_size"] == "40"  # the size it was made for
    x = torch.randn(4, 1, 40, 40)
    with torch.no_grad():
        assert np.abs(run_exported(out, fmt, x) - model(x).numpy()).max() <= 1e-4
    with pytest.raises(Exception):  # noqa: B017 - each runtime has its own shape error
        run_exported(out, fmt, torch.randn(3, 1, 40, 40))


def test_a_folder_run_records_its_crop(tmp_path):
    # A CIFAR-stem net trained on an image folder: its own data config says "the whole 32 px
    # image", the run's test images were resized to size / 0.875 and centre-cropped.
    model = trained_like(create_model("resnet20", num_classes=3), 32)
    info = {"data": "folder:/data/flowers", "classes": ["a", "b", "c"], "image_size": 48}
    info |= {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.3]}
    save_model_file(tmp_path / "model.safetensors", model, info)
    assert preprocessing_for(model).crop_pct == 1.0
    loaded, prep, kind = load_source(str(tmp_path))
    assert kind == "run" and (prep.crop_pct, prep.input_size, prep.data) == (
        0.875,
        48,
        "folder:/data/flowers",
    )
    r = export(loaded, tmp_path / "m.pt", "torchscript", input_size=40, preprocessing=prep)
    assert r["metadata"]["crop_pct"] == "0.875" and r["metadata"]["input_size"] == "40"
    assert r["metadata"]["classes"] == '["a", "b", "c"]' and r["example"] == [2, 3, 40, 40]
    assert read_metadata(tmp_path / "m.pt", "torchscript") == r["metadata"]


def test_a_bare_name_warns_that_its_weights_are_random(tmp_path, capsys):
    assert main(["export", "resnet20", str(tmp_path / "m.onnx")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: resnet20 has random weights") and err.count("\n") == 1


def test_an_export_that_differs_from_pytorch_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    import resnets.export as ex

    real = ex.WRITERS["onnx"]

    def off_by_a_little(*args):  # the runtime computes something else than the model
        files, run, runtime = real(*args)
        return files, (lambda x: run(x) + 1e-2), runtime

    monkeypatch.setitem(ex.WRITERS, "onnx", off_by_a_little)
    (tmp_path / "m.onnx").write_bytes(b"old")
    code, err = run_cli(["export", "resnet20", str(tmp_path / "m.onnx"), "--weights", str(tiny(tmp_path))])
    assert_one_error_line(code, err, "the onnx export does not compute what the model does")
    assert "max abs difference 0.01" in err and "nothing was written" in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "w.safetensors"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def tiny(folder) -> object:
    save_weights(trained_like(create_model("resnet20", num_classes=3), 32), folder / "w.safetensors")
    return folder / "w.safetensors"


def test_export_mistakes_are_one_line_and_change_nothing(tmp_path, monkeypatch):
    import importlib.util

    _, run = digits_run(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("not a model\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for argv, needle in [
        (["export", "nowhere/model.safetensors", "m.onnx"], "nowhere/model.safetensors does not exist"),
        (["export", "notes.txt", "m.onnx"], "not a resnets run file"),
        (["export", "run", "m.onnx", "--format", "tflite"], "invalid choice: 'tflite'"),
        (["export", "run", "m.tflite"], "cannot tell the format from m.tflite"),
        (["export", "run", "m.onnx", "--format", "openvino"], "openvino files are named *.xml"),
        (["export", "run", "m.xml", "--format", "torchscript"], "torchscript files are named *.pt"),
        (["export", "run", "nowhere/m.onnx"], "does not exist"),
        (["export", "run", "run/m.pt", "--static"], "--static is for onnx and openvino"),
        (["export", "run", "m.onnx", "--batch-size", "2"], "--batch-size fixes the batch of a --static"),
        (["export", "run", "m.onnx", "--weights", "notes.txt"], "--weights goes with a model name"),
        (["export", "run", "m.onnx", "--input-size", "0"], "must be positive"),
    ]:
        code, err = run_cli(argv)
        assert_one_error_line(code, err, needle)
        assert snapshot(tmp_path) == before, argv
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real_find_spec(name, *a)
    )
    code, err = run_cli(["export", "run", "m.xml"])
    assert_one_error_line(code, err, "pip install 'resnets[openvino]'")
    assert snapshot(tmp_path) == before
