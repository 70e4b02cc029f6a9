"""How much of the input each stride-2 shortcut uses, checked against counts made by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnets.analysis import shortcut
from resnets.analysis.shortcut_coverage import coverage, make_inputs, reconstruction_error, shortcut_module


def test_strided_1x1_sees_exactly_a_quarter():
    torch.manual_seed(0)
    cov = coverage(shortcut_module("B", 4, 8), torch.randn(2, 4, 10, 10))
    assert cov == {"positions": 0.25, "elements": 0.25}


def test_avg_pool_shortcut_sees_everything():
    cov = coverage(shortcut_module("avgdown", 4, 8), torch.randn(2, 4, 10, 10))
    assert cov == {"positions": 1.0, "elements": 1.0}


def test_maxpool_shortcut_uses_the_argmax_of_each_window():
    # Counted independently of gradients: the elements some 3x3/2 window picks as its max.
    torch.manual_seed(0)
    x = torch.randn(3, 4, 12, 12)
    _, idx = F.max_pool2d(x, 3, 2, padding=1, return_indices=True)
    picked = torch.zeros(3 * 4, 144, dtype=torch.bool)
    picked.scatter_(1, idx.reshape(12, -1), True)
    cov = coverage(shortcut_module("maxpool", 4, 8), x)
    assert cov["elements"] == pytest.approx(float(picked.double().mean()))
    assert cov["positions"] == pytest.approx(float(picked.view(3, 4, 144).any(1).double().mean()))
    assert cov["positions"] > 0.25 > cov["elements"] > 0.1


def test_strided_1x1_recovers_the_sampled_quarter_and_nothing_else():
    # On i.i.d. inputs the sampled phase is recovered exactly (the 1x1 conv is invertible with
    # twice the channels) and the other three phases not at all: overall error 3/4.
    x_fit = make_inputs("gaussian", 64, 4, 8, seed=0)
    x_test = make_inputs("gaussian", 32, 4, 8, seed=1)
    torch.manual_seed(0)
    r = reconstruction_error(shortcut_module("B", 4, 8), x_fit, x_test)
    assert r["phases"][0] < 1e-8
    assert r["phases"][1:] == pytest.approx([1.0] * 3, abs=0.08)
    assert r["error"] == pytest.approx(0.75, abs=0.06)
    # The error does not depend on the 1x1 weights, only on the spatial operator.
    torch.manual_seed(1)
    again = reconstruction_error(shortcut_module("B", 4, 8), x_fit, x_test)
    assert again["error"] == pytest.approx(r["error"], abs=1e-6)


def test_smooth_inputs_are_easier_to_reconstruct():
    x_fit = make_inputs("smooth", 32, 4, 16, seed=0)
    x_test = make_inputs("smooth", 16, 4, 16, seed=1)
    assert x_test.std() == pytest.approx(1.0, abs=0.1)  # unit variance, like the i.i.d. inputs
    r = reconstruction_error(shortcut_module("B", 4, 8), x_fit, x_test)
    assert r["error"] < 0.2


def test_study_numbers(tmp_path):
    r = shortcut(
        ("B", "maxpool"), ("gaussian",), channels=4, size=8, num_fit=64, num_test=16, out_dir=tmp_path
    )
    assert r["kinds"]["B"]["gaussian"]["positions"] == 0.25
    assert r["kinds"]["maxpool"]["gaussian"]["positions"] > 0.4  # 4 channels pick different argmaxes
    assert (tmp_path / "shortcut.png").exists()
