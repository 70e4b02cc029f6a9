"""iResNet's start / middle / end rules, max-pool shortcut and stem, as ARCHITECTURES.md describes."""

from __future__ import annotations

import torch
from torch import nn

from resnets import create_model


def test_stem_has_no_max_pool_and_every_stage_downsamples():
    model = create_model("iresnet50")
    assert model.stem.pool is None
    assert model.spec.strides == (2, 2, 2, 2)
    shapes = [
        f.shape[-1]
        for f in create_model("iresnet50", features_only=True, out_indices=(0, 1, 2, 3, 4))(
            torch.randn(1, 3, 64, 64)
        )
    ]
    assert shapes == [32, 16, 8, 4, 2]


def test_block_positions():
    model = create_model("iresnet50")
    for stage in model.stages:
        blocks = list(stage)
        start, rest = blocks[0], blocks[1:]
        assert start.bn0 is None and start.bn3 is not None and not start.end
        assert rest[0].bn0 is None, "the block after the start block has no leading BN"
        for b in rest[1:]:
            assert isinstance(b.bn0, nn.BatchNorm2d)
        for b in rest[:-1]:
            assert b.bn3 is None, "middle blocks end with a bare conv"
        assert rest[-1].end and rest[-1].bn3 is not None


def test_two_block_stage_end_block_drops_leading_bn():
    for stage in create_model("iresnet18").stages:
        start, end = list(stage)
        assert start.bn2 is not None and end.bn0 is None and end.bn2 is not None and end.end


def test_projection_shortcut_is_maxpool_conv_bn():
    sc = create_model("iresnet50").stages[1][0].shortcut
    assert isinstance(sc.pool, nn.MaxPool2d) and sc.pool.kernel_size == 3 and sc.pool.stride == 2
    assert sc.conv.stride == (1, 1) and sc.conv.kernel_size == (1, 1)
    assert isinstance(sc.bn, nn.BatchNorm2d)
    # iresnet18 stage 1 keeps 64 channels: the shortcut is the max-pool alone.
    sc18 = create_model("iresnet18").stages[0][0].shortcut
    assert sc18.conv is None and sc18.bn is None and isinstance(sc18.pool, nn.MaxPool2d)


def test_maxpool_shortcut_keeps_the_strongest_activation():
    sc = create_model("iresnet18").stages[0][0].shortcut
    x = torch.zeros(1, 64, 8, 8)
    x[0, 0, 1, 1] = 5.0  # an odd position that a 1x1 stride-2 conv would never read
    y = sc(x)
    assert y[0, 0, 0, 0] == 5.0 or y[0, 0, 1, 1] == 5.0


def test_no_relu_after_start_add_but_bn_relu_after_end_add():
    torch.manual_seed(0)
    model = create_model("iresnet50").eval()
    x = torch.randn(1, 64, 16, 16)
    start_out = model.stages[0][0](x)
    assert (start_out < 0).any(), "a start block must not apply ReLU after its add"
    end = model.stages[0][-1]
    assert (end(torch.randn(1, 256, 8, 8)) >= 0).all()


def test_official_quirk_changes_only_the_shortcut_of_block_one():
    torch.manual_seed(0)
    official = create_model("iresnet50").eval()
    paper = create_model("iresnet50", official_quirks=False).eval()
    paper.load_state_dict(official.state_dict())
    x = torch.randn(1, 256, 8, 8)
    b_off, b_pap = official.stages[0][1], paper.stages[0][1]
    diff = b_off(x) - b_pap(x)
    # The only difference is the shortcut: ReLU(x) versus x, i.e. ReLU(x) - x = -min(x, 0).
    assert torch.allclose(diff, torch.relu(x) - x, atol=1e-6)
    xin = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(official(xin), paper(xin), atol=1e-3)
