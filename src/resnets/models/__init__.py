"""The one skeleton, its blocks and the named networks.

Importing this package imports every family module, which registers its blocks and networks; the
tuple `FAMILY_MODULES` below is the one place that lists the families (in the order tables
show them); a new family is one module plus its entry there.
"""

from . import iresnet, preact_resnet, res2net, resnet, resnext, wide_resnet
from .net import BLOCKS, FeatureExtractor, FeatureInfo, NetSpec, Pos, ResNet
from .zoo import ENTRIES, FAMILIES, Entry, Family, Paper

FAMILY_MODULES = (resnet, preact_resnet, wide_resnet, resnext, res2net, iresnet)
FAMILIES.update((m.FAMILY.name, m.FAMILY) for m in FAMILY_MODULES)


def block_family(block: str) -> str:
    """The family whose module defines a block (where its paper is)."""
    module = BLOCKS[block].__module__.rsplit(".", 1)[-1]
    return next(m.FAMILY.name for m in FAMILY_MODULES if m.__name__.endswith(f".{module}"))


__all__ = [
    "BLOCKS",
    "ENTRIES",
    "FAMILIES",
    "FAMILY_MODULES",
    "Entry",
    "Family",
    "FeatureExtractor",
    "FeatureInfo",
    "NetSpec",
    "Paper",
    "Pos",
    "ResNet",
    "block_family",
]
