"""Res2Net (Gao et al. 2019): a bottleneck whose 3x3 is split into s chained groups.

Choices the paper leaves open follow the official code (and timm), whose weights depend on them:
the first block of a stage does not chain its splits, strides each split's 3x3 and passes the
untouched split through a 3x3 average pool (padding counted, as nn.AvgPool2d's default) placed
*last* in the concatenation. Res2NeXt groups each split's 3x3 (width per split = floor(w*stage/64)*C).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import BN_RELU, Layers, conv1x1, conv3x3
from .net import Block, NetSpec, Pos, register_block
from .resnet import IMAGENET_WIDTHS_BOTTLENECK
from .zoo import Family, Paper, register

FAMILY = Family(
    "res2net",
    cite="Gao et al. 2019, Res2Net: A New Multi-scale Backbone Architecture, arXiv:1904.01169",
    color="#2ca02c",
    example="res2net50_26w_4s",
)
RES2NET = FAMILY.cite


@register_block("res2net")
class Res2NetBottleneck(Block):
    """1x1, BN, ReLU, split into s; y_i = ReLU(BN(3x3(x_i + y_{i-1}))); concat, 1x1, BN; [SE]; add; ReLU."""

    uses = frozenset({"groups", "base_width", "scale", "se_ratio"})

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        self.width = int(math.floor(out_ch // 4 * spec.base_width / 64)) * spec.groups
        self.scale = spec.scale
        self.is_first = pos.first
        n = max(1, spec.scale - 1)
        self.conv1, self.bn1 = (
            conv1x1(in_ch, self.width * spec.scale),
            layers.norm(self.width * spec.scale),
        )
        self.convs = nn.ModuleList(
            conv3x3(self.width, self.width, stride, spec.groups, pos.dilation) for _ in range(n)
        )
        self.bns = nn.ModuleList(layers.norm(self.width) for _ in range(n))
        self.pool = nn.AvgPool2d(3, stride, padding=1) if self.is_first and spec.scale > 1 else None
        self.conv3, self.bn3 = conv1x1(self.width * spec.scale, out_ch), layers.norm(out_ch)
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        splits = [(f"convs.{i}", f"bns.{i}") for i in range(len(self.convs))]
        return [("conv1", "bn1"), *splits, ("conv3", "bn3")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        splits = torch.split(out, self.width, 1)
        ys = []
        y = splits[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = splits[i] if i == 0 or self.is_first else y + splits[i]
            y = self.act(bn(conv(y)))
            ys.append(y)
        if self.scale > 1:
            ys.append(self.pool(splits[-1]) if self.pool is not None else splits[-1])
        return self.residual(self.bn3(self.conv3(torch.cat(ys, 1))), x)


_SRC = "arXiv:1904.01169 Tables 1-3; Res2Net-PretrainedModels README (MACs)"

for _name, _depths, _w, _s, _c, _params, _gmacs, _err, _extra in [
    ("res2net50_26w_4s", (3, 4, 6, 3), 26, 4, 1, 25.7, 4.2, (22.01, 6.15), {}),
    ("res2net50_48w_2s", (3, 4, 6, 3), 48, 2, 1, 25.29, 4.2, (22.68, 6.47), {}),
    ("res2net50_14w_8s", (3, 4, 6, 3), 14, 8, 1, 25.06, 4.2, (21.86, 6.14), {}),
    ("res2net50_26w_6s", (3, 4, 6, 3), 26, 6, 1, 37.05, 6.3, (21.42, 5.87), {}),
    ("res2net50_26w_8s", (3, 4, 6, 3), 26, 8, 1, 48.4, 8.3, (20.80, 5.63), {}),
    ("res2net101_26w_4s", (3, 4, 23, 3), 26, 4, 1, 45.21, 8.1, (20.81, 5.57), {}),
    ("res2next50", (3, 4, 6, 3), 4, 4, 8, 24.67, 4.2, (21.76, 6.09), {}),
    ("se_res2net50_26w_4s", (3, 4, 6, 3), 26, 4, 1, None, None, (21.56, 5.94), dict(se_ratio=1 / 16)),
    (
        "res2net50_v1b_26w_4s",
        (3, 4, 6, 3),
        26,
        4,
        1,
        25.72,
        4.5,
        (19.73, 4.96),
        dict(stem="deep", shortcut="avgdown"),
    ),
    (
        "res2net101_v1b_26w_4s",
        (3, 4, 23, 3),
        26,
        4,
        1,
        45.23,
        8.3,
        (18.77, 4.64),
        dict(stem="deep", shortcut="avgdown"),
    ),
]:
    _notes = []
    if "se_ratio" in _extra:
        _notes.append("SE (reduction 16) right before the add; the paper prints no counts for it")
    if "stem" in _extra:
        _notes.append(
            "v1b: deep 3-conv stem (32-32-64) and avg-pool shortcuts, = timm res2net50d/101d; error "
            "with CutMix and other tricks"
        )
    register(
        _name,
        FAMILY,
        NetSpec("res2net", _depths, IMAGENET_WIDTHS_BOTTLENECK, groups=_c, base_width=_w, scale=_s, **_extra),
        Paper(
            RES2NET,
            _SRC,
            params_m=_params,
            gmacs=_gmacs,
            top1_err=_err[0],
            top5_err=_err[1],
            note="; ".join(_notes),
        ),
    )

# CIFAR-100 Res2NeXt-29: ResNeXt-29's block replaced by the Res2Net block (c groups, w per group).
for _name, _c, _w, _s, _se, _params, _err in [
    ("res2next29_6c24w4s", 6, 24, 4, 0.0, 24.3, 16.98),
    ("res2next29_8c25w4s", 8, 25, 4, 0.0, 33.8, 16.93),
    ("res2next29_6c24w6s", 6, 24, 6, 0.0, 36.7, 16.79),
    ("se_res2next29_6c24w6s", 6, 24, 6, 1 / 16, 36.9, 16.56),
]:
    register(
        _name,
        FAMILY,
        NetSpec(
            "res2net",
            (3, 3, 3),
            (256, 512, 1024),
            strides=(1, 2, 2),
            stem="cifar",
            stem_width=64,
            groups=_c,
            base_width=_w,
            scale=_s,
            se_ratio=_se,
            num_classes=100,
        ),
        Paper(
            RES2NET,
            "arXiv:1904.01169 Table 4",
            params_m=_params,
            cifar100_err=_err,
            note="the paper's counts run 0.6-2.5% above ours; an independent re-implementation "
            "(dl19940602/res2net-pytorch) counts 23.71M / 32.96M / 36.15M, exactly ours; the official CIFAR "
            "code is not public",
            params_tol=0.03,
        ),
        input_size=32,
    )
