"""Wide ResNet (Zagoruyko & Komodakis 2016): registrations only; the blocks are v1 and v2 blocks.

WRN-d-k on CIFAR is the pre-activation basic block at 16k/32k/64k channels with N = (d-4)/6 blocks
per stage; WRN-50-2 is the post-activation ResNet-50 with every inner bottleneck width doubled.
"""

from __future__ import annotations

from .net import NetSpec
from .resnet import IMAGENET_WIDTHS_BOTTLENECK
from .zoo import Family, Paper, register

FAMILY = Family(
    "wide_resnet",
    cite="Zagoruyko & Komodakis 2016, Wide Residual Networks, arXiv:1605.07146",
    color="#9467bd",
    example="wide_resnet50_2",
)
WRN = FAMILY.cite


# (depth, k): (params_m, cifar10_err, cifar100_err, source table) as printed; None where not printed.
_CIFAR_WRN = {
    (16, 4): (None, 5.02, 24.03, "Table 6"),
    (16, 8): (11.0, 4.27, 20.43, "Tables 4-5 (error: mean/std preprocessing)"),
    (16, 10): (17.1, 4.56, 21.59, "Table 4 (ZCA)"),
    (22, 8): (17.2, 4.38, 21.22, "Table 4 (ZCA)"),
    (22, 10): (26.8, 4.44, 20.75, "Table 4 (ZCA)"),
    (28, 10): (36.5, 4.00, 19.25, "Tables 4-5 (error: mean/std preprocessing; 3.89 / 18.85 with dropout)"),
    (28, 12): (52.5, 4.33, 20.43, "Table 4 (ZCA)"),
    (40, 1): (0.6, 6.85, 30.89, "Table 4 (ZCA)"),
    (40, 2): (2.2, 5.33, 26.04, "Table 4 (ZCA)"),
    (40, 4): (8.9, 4.53, 21.18, "Tables 4-5 (error: mean/std preprocessing)"),
    (40, 8): (35.7, 4.66, None, "Table 4 (ZCA)"),
    (40, 10): (56.0, 3.8, 18.3, "Table 9 and section 3 (error: with dropout)"),
    (52, 1): (None, 6.43, 29.89, "Table 6"),
}

for (_d, _k), (_params, _e10, _e100, _table) in _CIFAR_WRN.items():
    _n = (_d - 4) // 6
    register(
        f"wrn{_d}_{_k}",
        FAMILY,
        NetSpec(
            "preact_basic",
            (_n,) * 3,
            (16 * _k, 32 * _k, 64 * _k),
            strides=(1, 2, 2),
            stem="cifar",
            stem_width=16,
            num_classes=10,
        ),
        Paper(
            WRN,
            f"arXiv:1605.07146 {_table}",
            params_m=_params,
            cifar10_err=_e10,
            cifar100_err=_e100,
            note="dropout off by default; create_model(..., dropout=0.3) for the paper's dropout variant",
        ),
        input_size=32,
    )

for _name, _depths, _params, _gmacs, _err, _source in [
    (
        "wide_resnet50_2",
        (3, 4, 6, 3),
        68.9,
        11.398,
        (21.9, 6.03),
        "arXiv:1605.07146 Table 8 (params, error); GMACs: torchvision weights meta",
    ),
    (
        "wide_resnet101_2",
        (3, 4, 23, 3),
        126.886696,
        22.753,
        (21.152, 5.716),
        "torchvision weights meta (IMAGENET1K_V1, single crop); the paper prints no WRN-101-2 row",
    ),
]:
    register(
        _name,
        FAMILY,
        NetSpec("bottleneck", _depths, IMAGENET_WIDTHS_BOTTLENECK, base_width=128),
        Paper(WRN, _source, params_m=_params, gmacs=_gmacs, top1_err=_err[0], top5_err=_err[1]),
    )
