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
    match = _CIFAR_NAME.fullmatch(name)
    if (
        match is None
        or not (match["cifar"] or match["family"] != "iresnet")
        or not is_cifar_depth(int(match["depth"]))
    ):
        return None
    return depth_spec(_FAMILY_OF_PREFIX[match["family"]], int(match["depth"]))
