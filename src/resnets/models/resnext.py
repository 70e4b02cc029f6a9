"""ResNeXt (Xie et al. 2017): cardinality C and width d are NetSpec fields of the bottleneck.

The paper draws one block in three equivalent forms (Fig. 3): (a) C paths of 1x1 (d), 3x3 (d),
1x1 (out) whose outputs are summed; (b) the same paths without their last 1x1, concatenated and
followed by one 1x1; (c) one 1x1 to C*d channels, a 3x3 conv with C groups, one 1x1. With BN after
each conv (per channel, so per path) and after the aggregation (section 4, implementation
details), the three compute the same function with the same weights in another arrangement.
Form c is the `bottleneck` block (the default, `resnext_form="c"`); this module adds a and b and
`convert_form`, which rearranges a state dict from any form to any other.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from .layers import BN_RELU, Layers, conv1x1, conv3x3
from .net import Block, NetSpec, Pos
from .resnet import IMAGENET_WIDTHS_BOTTLENECK, Bottleneck, bottleneck_width
from .zoo import Family, Paper, register

FAMILY = Family(
    "resnext",
    cite="Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks, arXiv:1611.05431",
    color="#8c564b",
    example="resnext50_32x4d",
)
RESNEXT = FAMILY.cite


class _Path(nn.Module):
    """One path of forms a and b: 1x1, BN, ReLU, 3x3 (stride), BN, ReLU, [1x1 (form a)]."""

    def __init__(
        self,
        in_ch: int,
        d: int,
        out_ch: int,
        strides: tuple[int, int],
        dilation: int,
        last: bool,
        layers: Layers,
    ):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(in_ch, d, strides[0]), layers.norm(d)
        self.conv2, self.bn2 = conv3x3(d, d, strides[1], dilation=dilation), layers.norm(d)
        self.conv3 = conv1x1(d, out_ch) if last else None
        self.act = layers.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
        if self.conv3 is not None:
            out = self.conv3(out)
        return out


class ResNeXtPaths(Block):
    """Forms a and b of the ResNeXt block: C explicit paths; (a) sum of 1x1s, (b) concat, 1x1; BN; [SE]; add; ReLU."""

    uses = Bottleneck.uses

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, pos: Pos, spec: NetSpec, layers: Layers = BN_RELU
    ):
        super().__init__()
        d = bottleneck_width(out_ch, spec) // spec.groups
        strides = (stride, 1) if spec.stride_in_1x1 else (1, stride)
        self.form_a = spec.resnext_form == "a"
        self.paths = nn.ModuleList(
            _Path(in_ch, d, out_ch, strides, pos.dilation, self.form_a, layers) for _ in range(spec.groups)
        )
        self.conv3 = None if self.form_a else conv1x1(d * spec.groups, out_ch)
        self.bn3 = layers.norm(out_ch)
        self._init_tail(in_ch, out_ch, stride, pos, spec, layers)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def fold_pairs(self) -> list[tuple[str, str]]:
        inner = [(f"paths.{i}.conv{j}", f"paths.{i}.bn{j}") for i in range(len(self.paths)) for j in (1, 2)]
        # In form a, bn3 reads the sum of C convs: no single conv to fold it into.
        return inner if self.form_a else [*inner, ("conv3", "bn3")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = []
        for path in self.paths:
            ys.append(path(x))
        if self.conv3 is not None:
            out = self.conv3(torch.cat(ys, 1))
        else:
            out = torch.stack(ys, 0).sum(0)
        return self.residual(self.bn3(out), x)


Bottleneck.variants.update(a=ResNeXtPaths, b=ResNeXtPaths)

FORMS = ("a", "b", "c")
_BLOCK_KEY = re.compile(r"^(.*stages\.\d+\.\d+)\.((?:paths\.\d+\.)?(?:conv|bn)[123]\..+)$")


def _to_c(block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One block's tensors (keys relative to the block) in form c."""
    n = len({k.split(".")[1] for k in block if k.startswith("paths.")})
    if n == 0:
        return dict(block)
    out = {k: v for k, v in block.items() if not k.startswith("paths.")}
    for k in (k for k in block if k.startswith("paths.0.")):
        local = k[len("paths.0.") :]
        parts = [block[f"paths.{i}.{local}"] for i in range(n)]
        if local.endswith("num_batches_tracked"):
            out[local] = parts[0]
        else:  # the last 1x1 of form a reads one path's channels: concatenate its inputs
            out[local] = torch.cat(parts, 1 if local.startswith("conv3.") else 0)
    return out


def _from_c(block: dict[str, torch.Tensor], groups: int, form: str) -> dict[str, torch.Tensor]:
    """One block's form-c tensors rearranged into form a or b."""
    if form == "c":
        return dict(block)
    out = {}
    for k, v in block.items():
        name = k.split(".")[0]
        if name == "bn3" or (name == "conv3" and form == "b"):
            out[k] = v
        elif k.endswith("num_batches_tracked"):
            out.update({f"paths.{i}.{k}": v.clone() for i in range(groups)})
        else:
            dim = 1 if name == "conv3" else 0
            out.update({f"paths.{i}.{k}": t.clone() for i, t in enumerate(v.chunk(groups, dim))})
    return out


def convert_form(state_dict: dict[str, torch.Tensor], spec: NetSpec, to: str) -> dict[str, torch.Tensor]:
    """A bottleneck net's state dict, in any ResNeXt form, rearranged into form `to` (a, b or c).

    `spec` gives the cardinality. The converted weights compute the same function: a model built
    with `resnext_form=to` loads them strictly.
    """
    if spec.block != "bottleneck":
        raise ValueError(f"ResNeXt forms exist for the bottleneck block, not {spec.block!r}")
    if to not in FORMS:
        raise ValueError(f"unknown resnext_form {to!r} (expected a, b or c)")
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, v in state_dict.items():
        m = _BLOCK_KEY.match(k)
        if m:
            blocks[m[1]][m[2]] = v
        else:
            out[k] = v
    for prefix, block in blocks.items():
        out.update({f"{prefix}.{k}": v for k, v in _from_c(_to_c(block), spec.groups, to).items()})
    return out


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
