"""CIFAR nets of any depth 6n+2 that the registry does not list, by name.

The registry holds the papers' networks; the studies also need the same designs at other depths
(a signal sweep to 218 layers, a pre-activation ResNet-56, a CIFAR-sized iResNet), and a user
needs to train what a study measured. `sweep_spec(name)` is the spec of such a name, or None:

- "resnet{d}", "preact_resnet{d}": the spec of resnet110 / preact_resnet110 with (n, n, n) blocks,
  d = 6n + 2 (resnet20 ... resnet1202 of the registry are exactly this v1 spec at their depths);
  a "_cifar" suffix names the CIFAR net where the plain name is a registered ImageNet net
  (resnet50, resnet152, resnet200, preact_resnet50, preact_resnet200 are all 6n+2).
- "iresnet{d}_cifar" (always with the suffix: iresnet{d} are the registry's ImageNet nets): a
  CIFAR-sized iResNet, which the iResNet paper does not define (its experiments are ImageNet and
  video). It is resnet110's stem (3x3 conv-BN-ReLU), widths and strides with iResNet blocks and
  max-pool shortcuts, so that it differs from resnet{d} and preact_resnet{d} in the block only.
- "resnet{d}_bottleneck_cifar" and "res2net{d}_{w}w_{s}s_cifar", d = 9n + 2: preact_resnet164's
  stem, widths (64, 128, 256) and projection shortcuts with (n, n, n) original (v1) bottleneck
  blocks, or Res2Net blocks of width w and scale s (Gao et al. 2019, Fig. 2) in their place: a
  ResNet and a Res2Net that differ in the block only, at nearly the same cost
  (resnet56_bottleneck_cifar 0.59M parameters, res2net56_26w_4s_cifar 0.60M), to train alike.

A registered name always means the registry's model; this module is only asked about the others.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .net import NetSpec
from .zoo import ENTRIES

# Specs that are not registered because no paper defines them.
EXTRA_SPECS: dict[str, NetSpec] = {
    "iresnet110_cifar": NetSpec(
        "ibasic",
        (18, 18, 18),
        (16, 32, 64),
        strides=(1, 2, 2),
        stem="cifar",
        stem_width=16,
        shortcut="maxpool",
        num_classes=10,
    ),
}

# The 110-layer net whose spec each family's depths are drawn from, and the family's names.
CIFAR_FAMILIES: dict[str, str] = {"v1": "resnet110", "v2": "preact_resnet110", "iresnet": "iresnet110_cifar"}
CIFAR_NAMES: dict[str, str] = {"v1": "resnet{d}", "v2": "preact_resnet{d}", "iresnet": "iresnet{d}_cifar"}
_CIFAR_NAME = re.compile(r"(?P<family>resnet|preact_resnet|iresnet)(?P<depth>\d+)(?P<cifar>_cifar)?")
_FAMILY_OF_PREFIX = {name.partition("{d}")[0]: family for family, name in CIFAR_NAMES.items()}
_BOTTLENECK_NAME = re.compile(
    r"(?:resnet(?P<depth>\d+)_bottleneck|res2net(?P<r2depth>\d+)_(?P<w>\d+)w_(?P<s>\d+)s)_cifar"
)


def is_cifar_depth(depth: object) -> bool:
    """Whether `depth` is 6n+2 with n >= 1 (8, 14, 20, 26, ...)."""
    return isinstance(depth, int) and not isinstance(depth, bool) and depth >= 8 and (depth - 2) % 6 == 0


def depth_spec(family: str, depth: int) -> NetSpec:
    """The CIFAR net of `family` ("v1", "v2" or "iresnet") with `depth` = 6n+2 layers (checked by
    the caller): the family's 110-layer spec with (n, n, n) blocks."""
    base = CIFAR_FAMILIES[family]
    spec = EXTRA_SPECS[base] if base in EXTRA_SPECS else ENTRIES[base].spec
    return replace(spec, depths=((depth - 2) // 6,) * len(spec.depths))


def sweep_spec(name: str) -> NetSpec | None:
    """The spec of an unregistered CIFAR name ("resnet218", "preact_resnet56", "iresnet20_cifar"),
    or None where `name` is registered or not such a name."""
    if name in ENTRIES:
        return None
    if name in EXTRA_SPECS:
        return EXTRA_SPECS[name]
    bottleneck = _BOTTLENECK_NAME.fullmatch(name)
    if bottleneck:
        return _bottleneck_spec(bottleneck)
    match = _CIFAR_NAME.fullmatch(name)
    if (
        match is None
        or not (match["cifar"] or match["family"] != "iresnet")
        or not is_cifar_depth(int(match["depth"]))
    ):
        return None
    return depth_spec(_FAMILY_OF_PREFIX[match["family"]], int(match["depth"]))


def _bottleneck_spec(match: re.Match) -> NetSpec | None:
    """The bottleneck or Res2Net CIFAR net a `_BOTTLENECK_NAME` match names, or None where its depth
    is not 9n + 2 or its width or scale is out of range."""
    depth = int(match["depth"] or match["r2depth"])
    if depth < 11 or (depth - 2) % 9:
        return None
    spec = replace(ENTRIES["preact_resnet164"].spec, block="bottleneck", depths=((depth - 2) // 9,) * 3)
    if match["depth"]:
        return spec
    width, scale = int(match["w"]), int(match["s"])
    if width < 1 or scale < 2:
        return None
    return replace(spec, block="res2net", base_width=width, scale=scale)
