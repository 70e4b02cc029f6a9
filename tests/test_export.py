"""ONNX and TorchScript exports compute what the PyTorch model computes, at any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resnets import create_model, save_weights
from resnets.cli import main
from resnets.export import export

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
        model.train()(torch.randn(8, 3, size, size, generator=g))
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
