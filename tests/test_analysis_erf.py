"""Effective receptive fields: the arithmetic of conv stacks and of Res2Net's chained splits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnets import NetSpec, ResNet, create_model, list_models
from resnets.analysis import StudyError, receptive_field
from resnets.analysis.common import calibrate_bn, support_box
from resnets.analysis.erf import erf_map, split_erfs, stage_erfs

list_models()  # imports every family module, which registers the blocks NetSpec names


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_stack_of_3x3_convs_has_support_2n_plus_1(n):
    torch.manual_seed(n)
    stack = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(n)])
    m = erf_map(stack, torch.randn(3, 2, 31, 31))  # 31 > 2n + 1: no padding reaches the centre
    assert support_box(m) == (2 * n + 1, 2 * n + 1)
    # The support is centred on the centre unit (15, 15).
    nz = m.nonzero()
    assert nz.min(0).values.tolist() == [15 - n] * 2 and nz.max(0).values.tolist() == [15 + n] * 2


def test_strided_conv_adds_kernel_times_jump():
    # 3x3 stride 2 then 3x3 stride 1: 3 + 2 * (3 - 1) = 7.
    stack = nn.Sequential(nn.Conv2d(1, 1, 3, 2, 1), nn.Conv2d(1, 1, 3, 1, 1))
    assert support_box(erf_map(stack, torch.randn(2, 1, 32, 32))) == (7, 7)


def test_resnet20_first_stage_sees_15x15():
    # Stem 3x3 plus three blocks of two 3x3 convs: 7 convs at stride 1 -> 15x15, BN and ReLU
    # (calibrated, eval mode) do not widen it.
    torch.manual_seed(0)
    model = create_model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    calibrate_bn(model, x)
    first = stage_erfs(model, x)[0]
    assert support_box(first) == (15, 15)


def test_res2net_split_i_passes_through_i_3x3_convs():
    # In a non-first block y_1 = K(x_1), y_2 = K(x_2 + y_1), y_3 = K(x_3 + y_2), y_4 = x_4: with
    # respect to the block's input the supports are 3, 5, 7 and 1 (the 1x1 convs add nothing).
    torch.manual_seed(0)
    spec = NetSpec("res2net", (2,), (64,), strides=(1,), stem="cifar", stem_width=16, base_width=26, scale=4)
    model = ResNet(spec, name="tiny_res2net")
    x = torch.randn(8, 3, 24, 24)
    calibrate_bn(model, x)
    maps = split_erfs(model, x, 0, 1)
    assert [support_box(m) for m in maps["block_input"]] == [(3, 3), (5, 5), (7, 7), (1, 1)]
    # In the first block the splits are not chained: every conv split sees 3x3 only, and the
    # fourth split goes through the 3x3 average pool.
    first = split_erfs(model, x, 0, 0)["block_input"]
    assert [support_box(m) for m in first] == [(3, 3)] * 4


def test_split_block_must_be_res2net():
    model = create_model("resnet20")
    with pytest.raises(StudyError, match="not a Res2Net block"):
        split_erfs(model, torch.randn(1, 3, 32, 32), 0, 1)


def test_study_reports_radius_and_support(tmp_path):
    r = receptive_field(["resnet20"], num_inputs=2, out_dir=tmp_path)
    stages = r["models"]["resnet20"]["stages"]
    assert [s["support"] for s in stages][0] == [15, 15]
    radii = [s["radius"] for s in stages]
    assert 0 < radii[0] < 7.5 and radii == sorted(radii)  # inside the support, growing with depth
    assert (tmp_path / "receptive_field.png").exists() and (tmp_path / "receptive_field.json").exists()
