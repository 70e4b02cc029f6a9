"""ResNeXt (Xie et al. 2017): registrations only; cardinality C and width d are NetSpec fields."""

from __future__ import annotations

from .net import NetSpec
from .resnet import IMAGENET_WIDTHS_BOTTLENECK
from .zoo import Family, Paper, register

FAMILY = Family(
    "resnext",
    cite="Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks, arXiv:1611.05431",
    color="#8c564b",
    example="resnext50_32x4d",
)
RESNEXT = FAMILY.cite


for _name, _depths, _c, _d, _paper in [
    (
        "resnext50_32x4d",
        (3, 4, 6, 3),
        32,
        4,
        dict(params_m=25.0, gmacs=4.2, top1_err=22.2, source="arXiv:1611.05431 Tables 1, 3"),
    ),
    (
        "resnext101_32x4d",
        (3, 4, 23, 3),
        32,
        4,
        dict(
            params_m=44.2,
            gmacs=7.8,
            top1_err=21.2,
            top5_err=5.6,
            source="arXiv:1611.05431 Tables 3-4 (GMACs approximate, '~7.8')",
        ),
    ),
    (
        "resnext101_32x8d",
        (3, 4, 23, 3),
        32,
        8,
        dict(
            params_m=88.791336,
            gmacs=16.414,
            top1_err=20.688,
            top5_err=5.474,
            source="torchvision weights meta (IMAGENET1K_V1, single crop); not in the paper",
        ),
    ),
    (
        "resnext101_64x4d",
        (3, 4, 23, 3),
        64,
        4,
        dict(
            params_m=83.5,
            gmacs=15.6,
            top1_err=20.4,
            top5_err=5.3,
            source="arXiv:1611.05431 Tables 4-5; GMACs: facebookresearch/ResNeXt README (~15.6)",
        ),
    ),
]:
    register(
        _name,
        FAMILY,
        NetSpec("bottleneck", _depths, IMAGENET_WIDTHS_BOTTLENECK, groups=_c, base_width=_d),
        Paper(RESNEXT, **_paper),
    )

for _name, _c, _params, _e10, _e100 in [
    ("resnext29_8x64d", 8, 34.4, 3.65, 17.77),
    ("resnext29_16x64d", 16, 68.1, 3.58, 17.31),
]:
    register(
        _name,
        FAMILY,
        NetSpec(
            "bottleneck",
            (3, 3, 3),
            (256, 512, 1024),
            strides=(1, 2, 2),
            stem="cifar",
            stem_width=64,
            groups=_c,
            base_width=64,
            num_classes=10,
        ),
        Paper(RESNEXT, "arXiv:1611.05431 Table 7", params_m=_params, cifar10_err=_e10, cifar100_err=_e100),
        input_size=32,
    )
