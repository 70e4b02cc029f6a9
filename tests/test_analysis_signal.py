"""The signal study records every block's output, in order, and shows iResNet's per-stage reset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from resnets import NetSpec, ResNet, list_models
from resnets.analysis import signal
from resnets.analysis.signal_propagation import block_statistics

TINY = dict(widths=(8, 16), strides=(1, 2), stem="cifar", stem_width=8, num_classes=10)

list_models()  # imports every family module, which registers the blocks NetSpec names


@pytest.mark.parametrize("block,shortcut", [("basic", "A"), ("preact_basic", "B")])
def test_identity_blocks_leave_the_statistics_unchanged(block, shortcut):
    # zero_init_last makes every residual branch output 0: an identity block (v1: ReLU of a
    # non-negative input) returns its input, so its statistics equal the previous entry's.
    torch.manual_seed(0)
    model = ResNet(NetSpec(block, (3, 3), shortcut=shortcut, zero_init_last=True, **TINY)).train()
    st = block_statistics(model, torch.randn(8, 3, 16, 16))
    assert len(st["std"]) == 1 + 6 and st["stage"] == [-1, 0, 0, 0, 1, 1, 1]
    for k in (1, 2, 3, 5, 6):  # every block except the first of stage 2, which downsamples
        assert st["std"][k] == st["std"][k - 1] and st["mean"][k] == st["mean"][k - 1]
    assert st["std"][4] != st["std"][3]


def test_iresnet_end_blocks_renormalise_the_main_path():
    # The end block applies BN (batch statistics) and ReLU after the add: for a roughly Gaussian
    # sum, ReLU(N(0, 1)) has mean 1/sqrt(2 pi) and std sqrt(1/2 - 1/(2 pi)).
    torch.manual_seed(0)
    model = ResNet(NetSpec("ibasic", (4, 4), shortcut="maxpool", **TINY)).train()
    st = block_statistics(model, torch.randn(64, 3, 16, 16))
    for end in (4, 8):
        assert st["mean"][end] == pytest.approx(1 / math.sqrt(2 * math.pi), abs=0.05)
        assert st["std"][end] == pytest.approx(math.sqrt(0.5 - 1 / (2 * math.pi)), abs=0.05)
    # Inside a stage the un-normalised sum grows past that.
    assert st["std"][3] > 1.5 * st["std"][4]


def test_study_writes_numbers_and_figure(tmp_path):
    r = signal(["resnet20"], batch_size=4, out_dir=tmp_path)
    saved = json.loads((tmp_path / "signal.json").read_text())
    assert len(saved["models"]["resnet20"]["init"]["std"]) == 1 + 9
    assert saved["models"]["resnet20"]["init"]["std"] == pytest.approx(r["models"]["resnet20"]["init"]["std"])
    assert (tmp_path / "signal.png").stat().st_size > 10_000
