"""ResNet v1 (He et al. 2015): basic and bottleneck blocks, ImageNet and CIFAR nets, plain baselines."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .layers import BN_RELU, Layers, conv1x1, conv3x3
from .net import Block, NetSpec, Pos, register_block
from .zoo import Family, Paper, register

FAMILY = Family(
    "resnet",
    cite="He et al. 2015, Deep Residual Learning for Image Recognition, arXiv:1512.03385",
    color="#1f77b4",
    example="resnet18",
)
RESNET_V1 = FAMILY.cite


@register_block("basic")
class BasicBlock(Block):
    """3x3 (stride), BN, ReLU, 3x3, BN; [SE]; add; ReLU. With shortcut "none" it is a plain block."""

    uses = frozenset({"se_ratio", "unit"})
    # The other residual units of He et al. 2016, Fig. 4, by `NetSpec.unit`; preact_resnet.py adds them.
    variant_field = "unit"
    variants: ClassVar[dict[str, type[Block]]] = {}

    @classmethod
    def check(cls, spec: NetSpec) -> None:
        super().check(spec)
        if spec.unit == "original":
            return
        if spec.se_ratio:
            raise ValueError(f"unit {spec.unit!r} has no SE; se_ratio needs unit='original'")
        if spec.shortcut == "none":
            raise ValueError(f"unit {spec.unit!r} is a residual unit; shortcut='none' has no unit to vary")

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        d = pos.dilation
        self.conv1, self.bn1 = conv3x3(in_ch, out_ch, stride, dilation=d), layers.norm(out_ch)
        self.conv2, self.bn2 = conv3x3(out_ch, out_ch, dilation=d), layers.norm(out_ch)
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.residual(self.bn2(self.conv2(out)), x)


def bottleneck_width(out_ch: int, spec: NetSpec) -> int:
    """Inner width of a bottleneck: (out/4) * d/64 * C, the torchvision / ResNeXt rule."""
    return int(out_ch // 4 * (spec.base_width / 64)) * spec.groups


@register_block("bottleneck")
class Bottleneck(Block):
    """1x1, BN, ReLU, 3x3 (stride, groups), BN, ReLU, 1x1, BN; [SE]; add; ReLU."""

    uses = frozenset({"groups", "base_width", "stride_in_1x1", "se_ratio", "resnext_form"})
    # ResNeXt's forms a and b (Xie et al. 2017, Fig. 3) by `NetSpec.resnext_form`; resnext.py adds
    # them. This class is form c, the grouped conv.
    variant_field = "resnext_form"
    variants: ClassVar[dict[str, type[Block]]] = {}

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        width, groups = self.inner_width(out_ch, pos, spec)
        # The original ResNet-50/101/152 stride in the first 1x1; torchvision and later papers in the 3x3.
        s1, s3 = (stride, 1) if spec.stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = conv1x1(in_ch, width, s1), layers.norm(width)
        self.conv2, self.bn2 = conv3x3(width, width, s3, groups, pos.dilation), layers.norm(width)
        self.conv3, self.bn3 = conv1x1(width, out_ch), layers.norm(out_ch)
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers)

    @staticmethod
    def inner_width(out_ch: int, pos: Pos, spec: NetSpec) -> tuple[int, int]:
        """(width, groups) of the 3x3 conv: the ResNeXt rule, the same in every stage."""
        return bottleneck_width(out_ch, spec), spec.groups

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        return self.residual(self.bn3(self.conv3(out)), x)


# --- ImageNet ---------------------------------------------------------------------------------

IMAGENET_WIDTHS_BASIC = (64, 128, 256, 512)
IMAGENET_WIDTHS_BOTTLENECK = (256, 512, 1024, 2048)
TV = "torchvision weights meta (IMAGENET1K_V1)"
V15_NOTE = (
    "v1.5 (stride in the 3x3, as torchvision/timm): {g} GMACs vs the paper's {p} for its stride-in-1x1 "
    "original, which is {name}_v1; errors are the paper's (10-crop) for the original"
)

for _name, _depths, _block, _pp, _tv in [
    ("resnet18", (2, 2, 2, 2), "basic", dict(gmacs=1.8, top1_err=27.88), dict(params_m=11.689512)),
    (
        "resnet34",
        (3, 4, 6, 3),
        "basic",
        dict(gmacs=3.6, top1_err=24.52, top5_err=7.46),
        dict(params_m=21.797672),
    ),
]:
    register(
        _name,
        FAMILY,
        NetSpec(_block, _depths, IMAGENET_WIDTHS_BASIC),
        Paper(
            RESNET_V1,
            f"arXiv:1512.03385 Tables 1-2 (GMACs, 10-crop error); params: {TV}",
            **_pp,
            **_tv,
            note="option B shortcuts (projection where the shape changes), as torchvision"
            + (
                "; the paper's ResNet-18 used option A"
                if _name == "resnet18"
                else "; error is the paper's 34-B"
            ),
        ),
    )

for _name, _depths, _tv_params, _tv_gmacs, _paper_gmacs, _err in [
    ("resnet50", (3, 4, 6, 3), 25.557032, 4.089, 3.8, (22.85, 6.71)),
    ("resnet101", (3, 4, 23, 3), 44.54916, 7.801, 7.6, (21.75, 6.05)),
    ("resnet152", (3, 8, 36, 3), 60.192808, 11.514, 11.3, (21.43, 5.71)),
]:
    register(
        _name,
        FAMILY,
        NetSpec("bottleneck", _depths, IMAGENET_WIDTHS_BOTTLENECK),
        Paper(
            RESNET_V1,
            f"params, GMACs: {TV}; errors: arXiv:1512.03385 Table 3",
            params_m=_tv_params,
            gmacs=_tv_gmacs,
            top1_err=_err[0],
            top5_err=_err[1],
            note=V15_NOTE.format(g=_tv_gmacs, p=_paper_gmacs, name=_name),
        ),
    )
    register(
        f"{_name}_v1",
        FAMILY,
        NetSpec("bottleneck", _depths, IMAGENET_WIDTHS_BOTTLENECK, stride_in_1x1=True),
        Paper(
            RESNET_V1,
            "arXiv:1512.03385 Tables 1, 3 (GMACs, 10-crop error); params: WRN Table 8 / fb.resnet.torch",
            params_m={"resnet50": 25.6, "resnet101": 44.5, "resnet152": 60.2}[_name],
            gmacs=_paper_gmacs,
            top1_err=_err[0],
            top5_err=_err[1],
            note="paper-exact: stride-2 in the first 1x1 of each downsampling bottleneck",
        ),
    )

register(
    "resnet200",
    FAMILY,
    NetSpec("bottleneck", (3, 24, 36, 3), IMAGENET_WIDTHS_BOTTLENECK),
    Paper(
        RESNET_V1,
        "depths [3,24,36,3] from arXiv:1603.05027 / fb.resnet.torch; error: arXiv:1611.05431 Table 4",
        top1_err=21.7,
        top5_err=5.8,
        note="no params or MACs printed for the post-activation ResNet-200 (ResNeXt Table 4: '~15 GFLOPs "
        "class'); v1.5 stride placement",
    ),
)

for _name, _depths, _gmacs, _err in [
    ("plain18", (2, 2, 2, 2), 1.8, 27.94),
    ("plain34", (3, 4, 6, 3), 3.6, 28.54),
]:
    register(
        _name,
        FAMILY,
        NetSpec("basic", _depths, IMAGENET_WIDTHS_BASIC, shortcut="none"),
        Paper(
            RESNET_V1,
            "arXiv:1512.03385 Tables 1-2",
            gmacs=_gmacs,
            top1_err=_err,
            note="plain baseline: the same layers with every shortcut removed",
        ),
    )

# --- CIFAR (6n+2 layers, option A) ------------------------------------------------------------

CIFAR = dict(widths=(16, 32, 64), strides=(1, 2, 2), stem="cifar", stem_width=16, num_classes=10)

for _n, _params, _err in [
    (3, 0.27, 8.75),
    (5, 0.46, 7.51),
    (7, 0.66, 7.17),
    (9, 0.85, 6.97),
    (18, 1.7, 6.43),
    (200, 19.4, 7.93),
]:
    _depth = 6 * _n + 2
    register(
        f"resnet{_depth}",
        FAMILY,
        NetSpec("basic", (_n,) * 3, shortcut="A", **CIFAR),
        Paper(RESNET_V1, "arXiv:1512.03385 Table 6", params_m=_params, cifar10_err=_err),
        input_size=32,
    )
    if _depth <= 110:
        register(
            f"plain{_depth}",
            FAMILY,
            NetSpec("basic", (_n,) * 3, shortcut="none", **CIFAR),
            Paper(
                RESNET_V1,
                "arXiv:1512.03385 Fig. 6 (training curves only)",
                note=f"plain baseline of resnet{_depth}: same parameters (option A shortcuts have none)",
            ),
            input_size=32,
        )
