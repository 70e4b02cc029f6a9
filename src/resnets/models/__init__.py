"""The one skeleton and its blocks. `resnets.registry` imports the family modules, which register
their blocks and named networks."""

from .net import BLOCKS, FeatureExtractor, FeatureInfo, NetSpec, Pos, ResNet

FAMILY_MODULES = ("resnet", "preact_resnet", "wide_resnet", "resnext", "res2net", "iresnet")

__all__ = ["BLOCKS", "FAMILY_MODULES", "FeatureExtractor", "FeatureInfo", "NetSpec", "Pos", "ResNet"]
