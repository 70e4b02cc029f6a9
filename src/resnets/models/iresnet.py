"""iResNet (Duta et al. 2020): position-aware start / middle / end blocks and max-pool projections.

Every stage is a start block, middle blocks and an end block:

- start: [conv-BN-ReLU ...] conv-BN, add projection shortcut, no ReLU after the add;
- middle: BN-ReLU-conv ... conv (pre-activation), add identity;
- end: as middle, then BN-ReLU after the add, so the main path is normalised once per stage.

The stem is conv-BN-ReLU without max-pool; all four stages have stride 2, and the shortcut of a
start block is 3x3/2 max-pool -> 1x1 conv -> BN (only the max-pool when the channels already
match, only 1x1 conv -> BN when only the channels change).

Choices the paper leaves open, taken from the official code (iduta/iresnet) so its weights load:

- The block right after the start block has no leading BN (ReLU only), also when it is the end
  block of a two-block stage.
- That block applies an *in-place* ReLU to its input, which its shortcut also holds, so its
  shortcut carries ReLU(x), not x as in the paper's figure. `official_quirks=True` (default)
  reproduces this; `official_quirks=False` gives the paper-figure variant (shortcut = x).
- Max-pool padding is 1 (padded with -inf, as nn.MaxPool2d).
- A stage must have at least two blocks (start and end).
- `zero_init_last` zeroes the start block's last BN and the middle / end blocks' last conv (the
  end block's last BN acts after the add, so zeroing it would cut the main path).

The paper's other networks, as the official code builds them (its `models/resstage.py`,
`resgroup.py`, `iresgroup.py`, `resgroupfix.py`, `iresgroupfix.py`; names as its `build_model.py`):

- `resstage18..200`: the start / middle / end blocks alone, in an otherwise unchanged ResNet (stem
  with max-pool, stride 1 in the first stage, 1x1 strided projection shortcuts). Parameters equal
  the ResNet of the same depth.
- `resgroup50/101/152`: ResNet with the improved building block: 1x1, grouped 3x3, 1x1, where the
  3x3 is the widest conv (256/512/1024/2048 per stage, twice the block output) and has 64 groups
  in the last stage and half as many in each earlier one (8/16/32/64: 32 channels per group in
  every stage). `groups` sets the last stage's number, as the official `groups` argument does.
- `iresgroup50/101/152`: that block inside iResNet (positions, max-pool shortcuts, no stem pool).
- `resgroupfix*` / `iresgroupfix*`: 64 groups in every stage. That is the ResNeXt rule (C = 64,
  d = 8, outputs 128/256/512/1024), so they are the `bottleneck` / `ibottleneck` blocks with
  `groups=64, base_width=8`.
- The official `resstage.py` and `iresgroup.py` exist in a version with a plain ReLU too. As for
  iResNet, the in-place one is the default and `official_quirks=False` gives the plain one; the
  post-activation ResGroup nets activate no shortcut's tensor, so they have no such choice.
- The official README prints accuracy for ResNet and iResNet only, so these registrations carry
  no published numbers; the tests check their parameters and keys against the official modules'
  structure.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import BN_RELU, Layers, conv1x1, conv3x3
from .net import Block, NetSpec, Pos, register_block
from .resnet import IMAGENET_WIDTHS_BASIC, IMAGENET_WIDTHS_BOTTLENECK, Bottleneck
from .zoo import Family, Paper, register

FAMILY = Family(
    "iresnet",
    cite="Duta et al. 2020, Improved Residual Networks for Image and Video Recognition, arXiv:2004.04989",
    color="#d62728",
    example="iresnet18",
)
IRESNET = FAMILY.cite


class _IBlock(Block):
    n_convs = 0  # set by subclasses
    # Only a start block has a shortcut of the spec's kind (the others add the identity), and every
    # block adds one: the plain "none" has no iResNet form.
    shortcuts = ("A", "B", "C", "avgdown", "maxpool")

    def _init_position(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers
    ) -> None:
        if pos.depth < 2:
            raise ValueError("iResNet stages need at least two blocks (a start and an end block)")
        self.start, self.end = pos.first, pos.last
        self.relu_only = pos.index == 1  # right after the start block: no bn0
        self.relu_shortcut = self.relu_only and spec.official_quirks
        last_ch = out_ch
        self.bn0 = None if self.start or self.relu_only else layers.norm(in_ch)
        last_bn = layers.norm(last_ch) if self.start or self.end else None
        setattr(self, f"bn{self.n_convs}", last_bn)
        # No ReLU after the add: an end block applies BN-ReLU itself, the others none.
        kind = spec.shortcut if self.start else "B"  # "B" on an unchanged shape is the identity
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers, act_after_add=False, kind=kind)
        # The block after the start block activates its input without BN; not in place, as the
        # input is also the shortcut's (official_quirks passes the activated one on instead).
        self.act_in = layers.act(inplace=False) if self.relu_only else None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_norm(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_in is not None:  # the block after the start block
            inp = self.act_in(x)
            if self.relu_shortcut:
                x = inp
        elif self.bn0 is not None:
            inp = self.act(self.bn0(x))  # in place: the BN output is fresh, no second buffer
        else:  # the start block
            inp = x
        out = self.branch(inp)
        if self.start:
            out = self.last_norm(out)
        out = self.residual(out, x)
        if self.end:
            out = self.act(self.last_norm(out))
        return out

    def fold_pairs(self) -> list[tuple[str, str]]:
        # bn0 precedes conv1, and an end block's last BN follows the add: neither folds. The last
        # conv's BN follows it directly only in a start block.
        inner = [(f"conv{i}", f"bn{i}") for i in range(1, self.n_convs)]
        return inner + ([(f"conv{self.n_convs}", f"bn{self.n_convs}")] if self.start else [])

    def zero_init_last(self) -> None:
        if self.start:
            nn.init.zeros_(getattr(self, f"bn{self.n_convs}").weight)
        else:
            nn.init.zeros_(getattr(self, f"conv{self.n_convs}").weight)


@register_block("ibasic")
class IBasicBlock(_IBlock):
    """[BN0, ReLU] 3x3 (stride), BN, ReLU, 3x3, [BN (start)]; add; [BN, ReLU (end)]."""

    uses = frozenset({"official_quirks"})

    n_convs = 2

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        d = pos.dilation
        self.conv1, self.bn1 = conv3x3(in_ch, out_ch, stride, dilation=d), layers.norm(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, dilation=d)
        self._init_position(in_ch, out_ch, stride, pos, spec, layers)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn1(self.conv1(x))))

    def last_norm(self, out: torch.Tensor) -> torch.Tensor:
        # None in middle blocks, which never call this; the test lets TorchScript see that.
        return self.bn2(out) if self.bn2 is not None else out


@register_block("ibottleneck")
class IBottleneck(_IBlock):
    """[BN0, ReLU] 1x1, BN, ReLU, 3x3 (stride, groups), BN, ReLU, 1x1, [BN (start)]; add; [BN, ReLU (end)]."""

    uses = frozenset({"groups", "base_width", "official_quirks"})

    n_convs = 3

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        width, groups = self.inner_width(out_ch, pos, spec)
        self.conv1, self.bn1 = conv1x1(in_ch, width), layers.norm(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride, groups, pos.dilation), layers.norm(width)
        self.conv3 = conv1x1(width, out_ch)
        self._init_position(in_ch, out_ch, stride, pos, spec, layers)

    inner_width = staticmethod(Bottleneck.inner_width)  # (width, groups) of the 3x3 conv: the ResNeXt rule

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        return self.conv3(out)

    def last_norm(self, out: torch.Tensor) -> torch.Tensor:
        # None in middle blocks, which never call this; the test lets TorchScript see that.
        return self.bn3(out) if self.bn3 is not None else out


class _GroupsPerStage:
    """The ResGroup blocks' 3x3 conv: twice the block output wide; `groups` groups in the last stage,
    half as many in each earlier one (at least 1), as the official code divides its `groups` by 8/4/2/1."""

    @staticmethod
    def inner_width(out_ch: int, pos: Pos, spec: NetSpec) -> tuple[int, int]:
        return 2 * out_ch, max(1, spec.groups // 2 ** (len(spec.depths) - 1 - pos.stage))

    @classmethod
    def check(cls, spec: NetSpec) -> None:
        super().check(spec)
        for s, out_ch in enumerate(spec.widths):
            width, groups = cls.inner_width(out_ch, Pos(s, 0, 1), spec)
            if width % groups:
                raise ValueError(
                    f"groups={spec.groups} leaves {groups} groups in stage {s + 1}, which do not divide "
                    f"its {width}-channel 3x3 conv"
                )


@register_block("resgroup")
class ResGroupBlock(_GroupsPerStage, Bottleneck):
    """1x1, BN, ReLU, 3x3 (stride, 2x out wide, groups per stage), BN, ReLU, 1x1, BN; add; ReLU."""

    uses = frozenset({"groups"})
    variant_field = ""  # not Bottleneck's resnext_form: its forms a and b follow the ResNeXt width rule


@register_block("iresgroup")
class IResGroupBlock(_GroupsPerStage, IBottleneck):
    """[BN0, ReLU] 1x1, BN, ReLU, 3x3 (stride, 2x out wide, groups per stage), BN, ReLU, 1x1, [BN (start)]; add; [BN, ReLU (end)]."""

    uses = frozenset({"groups", "official_quirks"})


_ERR = {50: 22.69, 101: 21.36, 152: 20.66, 200: 20.52}  # official README top-1 accuracy, as error

DEPTHS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    302: (4, 34, 58, 4),
    404: (4, 46, 80, 4),
    1001: (4, 155, 170, 4),
}
IRESNET_LAYOUT = dict(strides=(2, 2, 2, 2), stem="iresnet", shortcut="maxpool")
GROUP_WIDTHS = (128, 256, 512, 1024)  # block outputs of the ResGroup nets: half their 3x3 widths

for _depth, _depths in DEPTHS.items():
    _basic = _depth < 50
    register(
        f"iresnet{_depth}",
        FAMILY,
        NetSpec(
            "ibasic" if _basic else "ibottleneck",
            _depths,
            IMAGENET_WIDTHS_BASIC if _basic else IMAGENET_WIDTHS_BOTTLENECK,
            **IRESNET_LAYOUT,
        ),
        Paper(
            IRESNET,
            "iduta/iresnet README (top-1, 224 center crop)" if _depth in _ERR else "",
            top1_err=_ERR.get(_depth),
            note="the paper prints no parameter or MAC counts; parameters equal the ResNet of the same depth "
            "(checked by the tests)",
        ),
    )

_NO_NUMBERS = "; the official README prints no parameters, MACs or accuracy for it"

for _depth in (18, 34, 50, 101, 152, 200):
    _basic = _depth < 50
    register(
        f"resstage{_depth}",
        FAMILY,
        NetSpec(
            "ibasic" if _basic else "ibottleneck",
            DEPTHS[_depth],
            IMAGENET_WIDTHS_BASIC if _basic else IMAGENET_WIDTHS_BOTTLENECK,
        ),
        Paper(
            IRESNET,
            note="iResNet's stage structure (start / middle / end blocks) in ResNet's stem, strides and "
            f"projection shortcuts (official models/resstage.py); parameters equal resnet{_depth}"
            + _NO_NUMBERS,
        ),
    )

for _depth in (50, 101, 152):
    for _name, _spec, _what in [
        ("resgroup", NetSpec("resgroup", DEPTHS[_depth], GROUP_WIDTHS, groups=64), "ResNet"),
        (
            "iresgroup",
            NetSpec("iresgroup", DEPTHS[_depth], GROUP_WIDTHS, groups=64, **IRESNET_LAYOUT),
            "iResNet",
        ),
        (
            "resgroupfix",
            NetSpec("bottleneck", DEPTHS[_depth], GROUP_WIDTHS, groups=64, base_width=8),
            "ResNet, 64 groups in every stage",
        ),
        (
            "iresgroupfix",
            NetSpec("ibottleneck", DEPTHS[_depth], GROUP_WIDTHS, groups=64, base_width=8, **IRESNET_LAYOUT),
            "iResNet, 64 groups in every stage",
        ),
    ]:
        register(
            f"{_name}{_depth}",
            FAMILY,
            _spec,
            Paper(
                IRESNET,
                note=f"the improved building block (3x3 conv twice the block output wide, grouped) in {_what} "
                f"(official models/{_name}.py)" + _NO_NUMBERS,
            ),
        )
