"""Pre-activation ResNet v2 (He et al. 2016): BN and ReLU before each conv, nothing after the add."""

from __future__ import annotations

import torch
from torch import nn

from .layers import BN_RELU, Layers, Projection, conv1x1, conv3x3
from .net import Block, NetSpec, Pos, register_block
from .resnet import IMAGENET_WIDTHS_BASIC, IMAGENET_WIDTHS_BOTTLENECK, BasicBlock, bottleneck_width
from .zoo import Family, Paper, register

FAMILY = Family(
    "preact_resnet",
    cite="He et al. 2016, Identity Mappings in Deep Residual Networks, arXiv:1603.05027",
    color="#ff7f0e",
    example="preact_resnet18",
)
RESNET_V2 = FAMILY.cite


class _PreAct(Block):
    """Shared forward: a projection shortcut reads the same BN-ReLU output as the branch; an
    identity or zero-pad (option A) shortcut reads the block input, so that path stays clean."""

    preact = True

    def _init_shortcut(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers
    ) -> None:
        # v2 projections are a bare 1x1 conv: a BN there would sit on the clean identity path.
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers, norm=False, act_after_add=False)
        self.project = isinstance(self.shortcut, Projection)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place, as timm's BN-act: the BN output is fresh, and ReLU's backward needs only its result.
        pre = self.act(self.bn1(x))
        return self.residual(self.branch(pre), pre if self.project else x)


@register_block("preact_basic")
class PreActBasicBlock(_PreAct):
    """BN, ReLU, 3x3 (stride), BN, ReLU, [dropout], 3x3; add."""

    uses = frozenset({"dropout"})

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        d = pos.dilation
        self.bn1, self.conv1 = layers.norm(in_ch), conv3x3(in_ch, out_ch, stride, dilation=d)
        self.bn2, self.conv2 = layers.norm(out_ch), conv3x3(out_ch, out_ch, dilation=d)
        # Wide ResNet: dropout between the two convs (p = 0.3 on CIFAR).
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else None
        self._init_shortcut(in_ch, out_ch, stride, pos, spec, layers)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        # bn1 normalises the block input (shared with the shortcut), so only conv1 -> bn2 folds.
        return [("conv1", "bn2")]

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn2(self.conv1(pre)))
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv2(out)


@register_block("preact_bottleneck")
class PreActBottleneck(_PreAct):
    """BN, ReLU, 1x1, BN, ReLU, 3x3 (stride, groups), BN, ReLU, 1x1; add."""

    uses = frozenset({"groups", "base_width"})

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        width = bottleneck_width(out_ch, spec)
        self.bn1, self.conv1 = layers.norm(in_ch), conv1x1(in_ch, width)
        self.bn2, self.conv2 = layers.norm(width), conv3x3(width, width, stride, spec.groups, pos.dilation)
        self.bn3, self.conv3 = layers.norm(width), conv1x1(width, out_ch)
        self._init_shortcut(in_ch, out_ch, stride, pos, spec, layers)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        # bn1 normalises the block input (shared with the shortcut); each later BN follows a conv.
        return [("conv1", "bn2"), ("conv2", "bn3")]

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn2(self.conv1(pre)))
        out = self.act(self.bn3(self.conv2(out)))
        return self.conv3(out)


class UnitBasicBlock(Block):
    """The basic block with BN and ReLU moved (He et al. 2016, Fig. 4 b-d); `spec.unit` says where.

    - bn_after_add (Fig. 4b): 3x3, BN, ReLU, 3x3; add; BN, ReLU.
    - relu_before_add (Fig. 4c): 3x3, BN, ReLU, 3x3, BN, ReLU; add.
    - relu_only_preact (Fig. 4d): ReLU, 3x3, BN, ReLU, 3x3, BN; add (the shortcut reads the
      block input, not its ReLU).
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        d = pos.dilation
        self.conv1, self.bn1 = conv3x3(in_ch, out_ch, stride, dilation=d), layers.norm(out_ch)
        self.conv2, self.bn2 = conv3x3(out_ch, out_ch, dilation=d), layers.norm(out_ch)
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers, act_after_add=False)
        self.bn_after_add = spec.unit == "bn_after_add"
        self.relu_before_add = spec.unit == "relu_before_add"
        self.relu_first = spec.unit == "relu_only_preact"
        self.add_in_place = not self.relu_before_add
        # The block input is also the shortcut's: its ReLU must not act in place.
        self.act_in = layers.act(inplace=False) if self.relu_first else None

    @classmethod
    def ends(cls, spec: NetSpec) -> tuple[bool, bool, bool]:
        # The stem keeps conv-BN-ReLU in every variant. The ReLU-only pre-activation net ends with
        # a sum, so it gets the pre-activation nets' extra activation after the last unit
        # (section 4.1), here ReLU alone, as its units have no BN before a conv.
        return True, False, spec.unit == "relu_only_preact"

    def zero_init_last(self) -> None:
        # After the add, bn2 carries the shortcut too: zero the conv before it instead.
        nn.init.zeros_(self.conv2.weight if self.bn_after_add else self.bn2.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1")] + ([] if self.bn_after_add else [("conv2", "bn2")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act_in(x) if self.act_in is not None else x)
        out = self.conv2(self.act(self.bn1(out)))
        if not self.bn_after_add:
            out = self.bn2(out)
        if self.relu_before_add:
            out = self.act(out)
        out = self.residual(out, x)
        if self.bn_after_add:
            out = self.act(self.bn2(out))
        return out


# He et al. 2016, Table 2 (CIFAR-10 test error, %, ResNet-110 / ResNet-164) for each unit of Fig. 4;
# `create_model("resnet110", unit=...)` builds the basic-block ones. full_preact is the
# pre-activation basic block above (on resnet110 with its option A shortcuts).
UNIT_ERRORS = {
    "original": (6.61, 5.93),
    "bn_after_add": (8.17, 6.50),
    "relu_before_add": (7.84, 6.14),
    "relu_only_preact": (6.71, 5.91),
    "full_preact": (6.37, 5.46),
}
BasicBlock.variants.update(
    bn_after_add=UnitBasicBlock,
    relu_before_add=UnitBasicBlock,
    relu_only_preact=UnitBasicBlock,
    full_preact=PreActBasicBlock,
)


NO_COUNTS = "the paper prints no parameter or MAC counts for the ImageNet pre-act nets below 200 layers"

for _name, _depths, _block, _widths in [
    ("preact_resnet18", (2, 2, 2, 2), "preact_basic", IMAGENET_WIDTHS_BASIC),
    ("preact_resnet34", (3, 4, 6, 3), "preact_basic", IMAGENET_WIDTHS_BASIC),
    ("preact_resnet50", (3, 4, 6, 3), "preact_bottleneck", IMAGENET_WIDTHS_BOTTLENECK),
    ("preact_resnet101", (3, 4, 23, 3), "preact_bottleneck", IMAGENET_WIDTHS_BOTTLENECK),
    ("preact_resnet152", (3, 8, 36, 3), "preact_bottleneck", IMAGENET_WIDTHS_BOTTLENECK),
]:
    register(
        _name,
        FAMILY,
        NetSpec(_block, _depths, _widths),
        Paper(
            RESNET_V2,
            "arXiv:1603.05027 Table 5" if _name == "preact_resnet152" else "",
            top1_err=21.1 if _name == "preact_resnet152" else None,
            top5_err=5.5 if _name == "preact_resnet152" else None,
            note=NO_COUNTS
            + ("; error at 320 px test size" if _name == "preact_resnet152" else "")
            + ("; = timm resnetv2_50" if _name == "preact_resnet50" else ""),
        ),
    )

register(
    "preact_resnet200",
    FAMILY,
    NetSpec("preact_bottleneck", (3, 24, 36, 3), IMAGENET_WIDTHS_BOTTLENECK),
    Paper(
        RESNET_V2,
        "arXiv:1603.05027 Table 5 (error, 320 px test); params: WRN Table 8 / fb.resnet.torch",
        params_m=64.7,
        top1_err=20.7,
        top5_err=5.3,
        note="error measured at 320x320 test size",
    ),
)

_CIFAR = dict(strides=(1, 2, 2), stem="cifar", stem_width=16, num_classes=10)

register(
    "preact_resnet110",
    FAMILY,
    NetSpec("preact_basic", (18, 18, 18), (16, 32, 64), **_CIFAR),
    Paper(
        RESNET_V2,
        "arXiv:1603.05027 Tables 2-3",
        params_m=1.7,
        cifar10_err=6.37,
        note="1x1 projection (no BN) where the shape changes; the paper does not say which shortcut its "
        "basic-block CIFAR net used",
    ),
    input_size=32,
)
for _name, _n, _params, _err10, _err100, _note in [
    ("preact_resnet164", 18, 1.7, 5.46, 24.33, ""),
    (
        "preact_resnet1001",
        111,
        10.2,
        4.92,
        22.71,
        "the paper's 10.2M excludes BatchNorm parameters (10.18M counted without, 10.33M with); "
        "4.62 error with batch 64",
    ),
]:
    register(
        _name,
        FAMILY,
        NetSpec("preact_bottleneck", (_n,) * 3, (64, 128, 256), **_CIFAR),
        Paper(
            RESNET_V2,
            "arXiv:1603.05027 Tables 2-4",
            params_m=_params,
            cifar10_err=_err10,
            cifar100_err=_err100,
            note=_note,
        ),
        input_size=32,
    )
