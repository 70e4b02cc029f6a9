"""The one skeleton every family shares: stem -> stages of blocks -> head.

A family is data: a `NetSpec` names the block and the papers' hyper-parameters; the block
classes (in the family modules) follow the contract of `Block`.
"""

# No `from __future__ import annotations` here: torch.fx copies the annotations of forward() into
# the code it generates, and TorchScript cannot read them as strings.
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import BN_RELU, DropPath, Layers, SqueezeExcite, conv3x3, make_shortcut

BLOCKS: "dict[str, type[Block]]" = {}

# NetSpec fields the skeleton or every block honours; a block lists any other field it reads in
# `Block.uses`, and a spec that sets a field its block does not use is refused.
COMMON_FIELDS = frozenset(
    {
        "block",
        "depths",
        "widths",
        "strides",
        "stem",
        "stem_width",
        "shortcut",
        "drop_path",
        "num_classes",
        "in_chans",
        "zero_init_last",
        "output_stride",
        "global_pool",
    }
)
SHORTCUTS = ("A", "B", "C", "avgdown", "maxpool", "none")  # see layers.make_shortcut
GLOBAL_POOLS = ("avg", "max", "avgmax", "")

# Normalisation of the data a network expects, as timm's `pretrained_cfg` states it. ImageNet:
# the torchvision / timm constants; CIFAR: per-channel mean and std of the 50,000 training images.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def register_block(name: str):
    def deco(cls):
        BLOCKS[name] = cls
        cls.block_name = name
        return cls

    return deco


@dataclass(frozen=True)
class NetSpec:
    """The hyper-parameters of one network, as the papers name them."""

    block: str  # a key of BLOCKS: basic, bottleneck, preact_basic, preact_bottleneck, res2net, ibasic, ibottleneck
    depths: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...]  # output channels per stage
    strides: tuple[int, ...] = (1, 2, 2, 2)
    stem: str = (
        "imagenet"  # imagenet (7x7/2 + max-pool), cifar (3x3), deep (3 x 3x3 + max-pool), iresnet (7x7/2)
    )
    stem_width: int = 64  # stem output channels (the deep stem's first two convs use half)
    shortcut: str = "B"  # A, B, C, avgdown, maxpool or none (plain nets); see layers.make_shortcut
    groups: int = 1  # ResNeXt cardinality C
    base_width: int = 64  # ResNeXt d / Res2Net w, per 64 channels of stage width
    scale: int = 1  # Res2Net s
    stride_in_1x1: bool = False  # original ResNet-50/101/152: stride-2 in the first 1x1 of a bottleneck
    se_ratio: float = 0.0  # squeeze-excitation hidden/channels ratio (1/16 in SE nets); 0 = off
    dropout: float = 0.0  # dropout between the two convs of a wide block (WRN)
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate at the last block
    official_quirks: bool = True  # iResNet: reproduce the official code's in-place ReLU on block 1's shortcut
    # Basic block: where BN and ReLU sit (He et al. 2016, Fig. 4); see preact_resnet.py.
    unit: str = "original"
    # Bottleneck: one of ResNeXt's equivalent forms (Xie et al. 2017, Fig. 3); see resnext.py.
    resnext_form: str = "c"
    num_classes: int = 1000
    in_chans: int = 3
    zero_init_last: bool = False  # zero the last BN (or conv) of each residual branch
    output_stride: int = 32  # 8 or 16 replace the later strides by dilation (segmentation backbones)
    global_pool: str = "avg"  # the head's pooling: avg, max, avgmax (their mean) or "" (none: feature maps)

    def __post_init__(self):
        if not (len(self.depths) == len(self.widths) == len(self.strides)):
            raise ValueError("depths, widths and strides must have one entry per stage")
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; known: {', '.join(sorted(BLOCKS))}")
        for name in ("num_classes", "in_chans", "groups", "base_width", "scale", "stem_width"):
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if name == "num_classes" else 1)
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(
                f"global_pool must be one of {', '.join(map(repr, GLOBAL_POOLS))}, got {self.global_pool!r}"
            )
        if self.global_pool == "" and self.num_classes > 0:
            raise ValueError(
                "global_pool='' (no pooling) needs num_classes=0: a classifier needs pooled features"
            )
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride!r}")
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        BLOCKS[self.block].check(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Pos:
    """Where a block sits: Res2Net needs "first of stage", iResNet start / middle / end."""

    stage: int
    index: int  # within the stage
    depth: int  # blocks in the stage
    block_id: int = 0  # within the whole net
    num_blocks: int = 1
    dilation: int = 1  # of the block's 3x3 convs (output_stride < 32)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.depth - 1

    def drop_path_rate(self, rate: float) -> float:
        return rate * self.block_id / max(self.num_blocks - 1, 1)


class Block(nn.Module):
    """The contract every block follows.

    - It is built as `Block(in_ch, out_ch, stride, pos, spec, layers)` and maps `in_ch` channels
      to `out_ch` at `1/stride` of the resolution, building every norm and activation with
      `layers` (`layers.Layers`: BN and ReLU unless the caller chose others).
    - Class attributes say what it is: `preact` (the stem and head leave normalisation to the
      blocks), `uses` (the NetSpec fields beyond `COMMON_FIELDS` it reads; `NetSpec` refuses any
      other field set away from its default) and `shortcuts` (the shortcut kinds it supports).
    - `zero_init_last()` makes the block start as its shortcut; `fold_pairs()` lists the
      (conv, BN) attribute pairs where the BN reads exactly the conv's output, for `deploy`.
    - The shared tail, built by `_init_tail` and run by `residual(out, x)`: [SE], drop-path, add
      the shortcut of `x`, [ReLU]. A block with shortcut "none" is a plain block: no add.
    """

    block_name: ClassVar[str] = ""
    preact: ClassVar[bool] = False
    uses: ClassVar[frozenset[str]] = frozenset()
    shortcuts: ClassVar[tuple[str, ...]] = SHORTCUTS
    # A NetSpec field (in `uses`) whose values other than its default select another class; the
    # module that defines a variant adds it to the subclass's own `variants` dict.
    variant_field: ClassVar[str] = ""
    variants: "ClassVar[dict[str, type[Block]]]" = {}

    @classmethod
    def check(cls, spec: NetSpec) -> None:
        """Refuse a spec that asks for something this block would silently not build."""
        if spec.shortcut not in cls.shortcuts:
            raise ValueError(
                f"block {cls.block_name!r} does not support shortcut={spec.shortcut!r} "
                f"(supported: {', '.join(cls.shortcuts)})"
            )
        for f in fields(spec):
            value = getattr(spec, f.name)
            if f.name == cls.variant_field and value != f.default and value not in cls.variants:
                known = ", ".join([f.default, *cls.variants])
                raise ValueError(f"unknown {f.name} {value!r} (expected {known})")
            if f.name not in COMMON_FIELDS and f.name not in cls.uses and value != f.default:
                used = ", ".join(sorted(cls.uses)) or "none"
                raise ValueError(
                    f"block {cls.block_name!r} does not use {f.name}={value!r}, so it would build the "
                    f"same network without it (fields it uses beyond the common ones: {used})"
                )

    @classmethod
    def variant(cls, spec: NetSpec) -> "type[Block]":
        """The class that builds this spec's blocks: this one, or the variant `variant_field` selects."""
        return cls.variants.get(getattr(spec, cls.variant_field), cls) if cls.variant_field else cls

    @classmethod
    def ends(cls, spec: NetSpec) -> tuple[bool, bool, bool]:
        """(stem BN-ReLU, head BN, head ReLU): a pre-activation net normalises in its blocks and
        adds BN-ReLU after the last one."""
        return not cls.preact, cls.preact, cls.preact

    def _init_tail(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        pos: Pos,
        spec: NetSpec,
        layers: Layers = BN_RELU,
        *,
        norm: bool = True,
        act_after_add: bool = True,
        kind: str | None = None,
    ) -> None:
        """SE (where the block uses `se_ratio`), activation, shortcut (`kind`, default the spec's), drop-path."""
        ratio = spec.se_ratio if "se_ratio" in self.uses else 0.0
        self.se = SqueezeExcite(out_ch, ratio, layers.act()) if ratio else None
        self.act = layers.act()
        self.shortcut = make_shortcut(
            spec.shortcut if kind is None else kind, in_ch, out_ch, stride, norm=norm, layers=layers
        )
        self.drop_path = DropPath(pos.drop_path_rate(spec.drop_path))
        self.act_after_add = act_after_add
        self.add_in_place = True  # False where the branch ends in a ReLU, whose backward needs its output

    def residual(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The shared tail: [SE], drop-path, add the shortcut of `x`, [ReLU]."""
        if self.se is not None:
            out = self.se(out)
        if self.shortcut is not None:
            # In place, as torchvision/timm: `out` is this block's fresh tensor that no backward
            # needs; an out-of-place add would allocate one more activation-sized buffer per block.
            out = self.drop_path(out)
            if self.add_in_place:
                out += self.shortcut(x)
            else:
                out = out + self.shortcut(x)
        if self.act_after_add:
            out = self.act(out)
        return out

    def zero_init_last(self) -> None:
        raise NotImplementedError

    def fold_pairs(self) -> list[tuple[str, str]]:
        raise NotImplementedError


class Stem(nn.Module):
    def __init__(self, spec: NetSpec, norm: bool = True, layers: Layers = BN_RELU):
        super().__init__()
        w, c = spec.stem_width, spec.in_chans
        self.out_channels = w
        self.pool = None
        if spec.stem == "deep":
            # Res2Net-v1b / ResNet-D: three 3x3 convs instead of the 7x7 (w/2, w/2, w).
            self.conv1, self.bn1 = conv3x3(c, w // 2, 2), layers.norm(w // 2)
            self.conv2, self.bn2 = conv3x3(w // 2, w // 2), layers.norm(w // 2)
            self.conv3 = conv3x3(w // 2, w)
        elif spec.stem in ("imagenet", "iresnet"):
            self.conv = nn.Conv2d(c, w, 7, stride=2, padding=3, bias=False)
        elif spec.stem == "cifar":
            self.conv = conv3x3(c, w)
        else:
            raise ValueError(f"unknown stem {spec.stem!r} (expected imagenet, cifar, deep or iresnet)")
        # A pre-activation net's first block normalises the stem output itself (norm=False).
        self.bn = layers.norm(w) if norm else None
        self.act = layers.act()
        if spec.stem in ("imagenet", "deep"):
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stride = (4 if self.pool is not None else 2) if spec.stem != "cifar" else 1

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(conv, BN) attribute pairs where the BN reads exactly the conv's output: `deploy` folds them."""
        deep = hasattr(self, "conv1")
        pairs = [("conv1", "bn1"), ("conv2", "bn2")] if deep else []
        if self.bn is not None:  # None in pre-activation nets: the first block normalises
            pairs.append(("conv3" if deep else "conv", "bn"))
        return pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv1"):
            x = self.act(self.bn1(self.conv1(x)))
            x = self.act(self.bn2(self.conv2(x)))
            x = self.conv3(x)
        else:
            x = self.conv(x)
        if self.bn is not None:
            x = self.act(self.bn(x))
        if self.pool is not None:
            x = self.pool(x)
        return x


class Head(nn.Module):
    """[BN] [ReLU] (pre-activation nets), global pooling, fully connected."""

    def __init__(
        self,
        in_ch: int,
        num_classes: int,
        norm: bool = False,
        act: bool = False,
        global_pool: str = "avg",
        layers: Layers = BN_RELU,
    ):
        super().__init__()
        self.in_features = in_ch
        self.norm = layers.norm(in_ch) if norm else None
        self.act = layers.act() if act else None
        self.global_pool = global_pool
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x.mean((2, 3))
        if self.global_pool == "max":
            return x.amax((2, 3))
        if self.global_pool == "avgmax":
            return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
        return x

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        x = self.pool(x)
        return x if pre_logits else self.fc(x)


class ResNet(nn.Module):
    """Stem -> stages -> head, built from a NetSpec. Every family of the package is this class.

    `norm_layer` (a class or callable taking the channel count) and `act_layer` (a class or
    callable) replace BatchNorm2d and ReLU in every block (squeeze-excitation included), the
    stem, the head and the shortcuts. They are not part of the spec: a saved model records
    neither, and rebuilding it gives BN and ReLU.
    """

    def __init__(
        self,
        spec: NetSpec,
        name: str | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.name = name
        layers = Layers(norm_layer or nn.BatchNorm2d, act_layer or nn.ReLU)
        block_cls = BLOCKS[spec.block].variant(spec)
        stem_norm, head_norm, head_act = block_cls.ends(spec)
        self.stem = Stem(spec, stem_norm, layers)
        in_ch = self.stem.out_channels
        total = sum(spec.depths)
        stages, block_id, reduction, dilation = [], 0, self.stem.stride, 1
        self.feature_info = FeatureInfo([{"num_chs": in_ch, "reduction": reduction, "module": "stem"}])
        for s, (depth, width, stride) in enumerate(zip(spec.depths, spec.widths, spec.strides)):
            prev_dilation = dilation
            if reduction * stride > spec.output_stride:
                # Keep the resolution and grow the dilation instead (torchvision's rule: the first
                # block of the stage keeps the previous dilation).
                dilation, stride = dilation * stride, 1
            blocks = []
            for i in range(depth):
                pos = Pos(s, i, depth, block_id, total, prev_dilation if i == 0 else dilation)
                blocks.append(block_cls(in_ch, width, stride if i == 0 else 1, pos, spec, layers))
                in_ch, block_id = width, block_id + 1
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": width, "reduction": reduction, "module": f"stages.{s}"})
        self.stages = nn.ModuleList(stages)
        self.num_features = in_ch
        self.head = Head(in_ch, spec.num_classes, head_norm, head_act, spec.global_pool, layers)
        self.grad_checkpointing = False
        self.pretrained_cfg = self._data_config()
        self.default_cfg = self.pretrained_cfg  # timm's older name for the same dict
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # torchvision's default Linear init; the papers do not specify one.
                nn.init.kaiming_uniform_(m.weight, a=5**0.5)
                bound = 1 / m.in_features**0.5
                nn.init.uniform_(m.bias, -bound, bound)
        if self.spec.zero_init_last:
            # Goyal et al. 2017: each residual block starts as the identity.
            for m in self.modules():
                if hasattr(m, "zero_init_last") and callable(m.zero_init_last):
                    m.zero_init_last()

    __jit_unused_properties__ = ["num_classes"]  # TorchScript compiles properties; this one reads the spec

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (fine-tuning on a new label set) and optionally the pooling."""
        pool = self.spec.global_pool if global_pool is None else global_pool
        self.spec = replace(self.spec, num_classes=num_classes, global_pool=pool)  # validates both
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.global_pool = pool
        self.pretrained_cfg["num_classes"] = num_classes

    def _data_config(self) -> dict:
        """What timm's `resolve_data_config(model=...)` reads: the input the network was designed for."""
        spec = self.spec
        cifar = spec.stem == "cifar"
        size = 32 if cifar else 224
        if not cifar:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (
                (CIFAR100_MEAN, CIFAR100_STD) if spec.num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
            )
        if spec.in_chans != 3:  # one value per channel, the average of the RGB ones
            mean, std = ((sum(v) / 3,) * spec.in_chans for v in (mean, std))
        final = -(-size // self.feature_info[-1]["reduction"])
        return {
            "architecture": self.name or "",
            "num_classes": spec.num_classes,
            "input_size": (spec.in_chans, size, size),
            "pool_size": (final, final),
            # CIFAR nets are tested on the whole 32x32 image; ImageNet nets on a 224 crop of 256.
            "crop_pct": 1.0 if cifar else 0.875,
            "crop_mode": "center",
            "interpolation": "bilinear",
            "mean": mean,
            "std": std,
            "first_conv": "stem.conv1" if spec.stem == "deep" else "stem.conv",
            "classifier": "head.fc",
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them.

        The gradients are the same; BN running statistics are updated twice per step (the
        recomputation runs BN in training mode again), as with timm's checkpointing.
        """
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class FeatureInfo(list):
    """One dict per returned feature map: `num_chs`, `reduction` (stride w.r.t. the input), `module`."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]


class FeatureExtractor(nn.Module):
    """A backbone: returns the feature maps of the chosen parts (0 = stem, i = stage i), no head.

    It holds the network's own stem and stages, so its state dict keys are the classifier's minus
    `head.*`, and a classifier checkpoint loads with `strict=False`.
    """

    def __init__(self, net: ResNet, out_indices: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__()
        n = len(net.stages)
        indices = tuple(i if i >= 0 else n + 1 + i for i in out_indices)
        if not indices or any(not 0 <= i <= n for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"out_indices must be distinct values in 0..{n} (0 = stem), got {out_indices}")
        self.spec, self.name = net.spec, net.name
        self.out_indices = tuple(sorted(indices))
        self.stem = net.stem
        # Stages after the last requested one are never run, so they are not kept.
        self.stages = nn.ModuleList(list(net.stages)[: max(self.out_indices)])
        self.feature_info = FeatureInfo(net.feature_info[i] for i in self.out_indices)
        self.pretrained_cfg = self.default_cfg = net.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = [x] if 0 in self.out_indices else []
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if i in self.out_indices:
                feats.append(x)
        return feats
