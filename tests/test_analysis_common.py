"""Shared pieces of the studies: palette, radius and support measures, BN calibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resnets import create_model, get_entry, list_models
from resnets.analysis.common import (
    PALETTE,
    build_model,
    calibrate_bn,
    colours_for,
    family_of,
    radius_holding,
    support_box,
)


def test_every_family_has_a_colour():
    families = {get_entry(n).family for n in list_models()}
    assert families <= set(PALETTE)
    assert len(set(PALETTE.values())) == len(PALETTE)  # no two families share a colour


def test_plain_nets_are_their_own_family():
    assert family_of(create_model("plain20")) == "plain"
    assert family_of(create_model("resnet20")) == "resnet"
    assert family_of(build_model("iresnet110_cifar")) == "iresnet"


def test_deeper_members_of_a_family_get_darker():
    c = colours_for(["resnet20", "resnet56", "plain20"], ["resnet", "resnet", "plain"])
    assert sum(c["resnet56"]) < sum(c["resnet20"])  # darker = smaller RGB sum
    assert c["resnet56"] == pytest.approx(
        tuple(int(PALETTE["resnet"][i : i + 2], 16) / 255 for i in (1, 3, 5))
    )


def test_radius_of_a_point_and_of_a_uniform_disc():
    point = torch.zeros(21, 21)
    point[10, 10] = 1
    assert radius_holding(point, 0.9) == 0.0
    # A uniform disc of radius R holds share s inside radius R * sqrt(s).
    ys, xs = torch.meshgrid(torch.arange(201.0), torch.arange(201.0), indexing="ij")
    disc = (((ys - 100) ** 2 + (xs - 100) ** 2) <= 80**2).float()
    assert radius_holding(disc, 0.9) == pytest.approx(80 * math.sqrt(0.9), abs=0.5)


def test_support_box_counts_every_nonzero_entry():
    m = torch.zeros(10, 12)
    m[2, 3] = 1e-9  # tiny but nonzero: inside the support
    m[6, 9] = 5.0
    assert support_box(m) == (5, 7)
    assert support_box(m, rel_eps=1e-3) == (1, 1)


def test_calibrate_bn_uses_the_inputs_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(40, 3, 5, 5) * 3 + 2
    calibrate_bn(model, x, batch_size=8)  # five batches, averaged with equal weight
    assert not model.training
    with torch.no_grad():
        feats = model[0](x)
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    with torch.no_grad():
        out = model(x)
    assert out.mean((0, 2, 3)).abs().max() < 1e-3
    assert model[1].momentum == 0.1  # restored
