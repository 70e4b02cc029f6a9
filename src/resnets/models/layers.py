"""Small building pieces shared by every family: convs, shortcuts, squeeze-excitation, drop-path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Layers:
    """The normalisation and activation a network builds everywhere (blocks, stem, head, shortcuts).

    `norm_layer` is a class or callable taking the channel count (nn.BatchNorm2d,
    torchvision.ops.FrozenBatchNorm2d, `lambda c: nn.GroupNorm(32, c)`); `act_layer` a class or
    callable taking no argument or `inplace` (nn.ReLU, nn.SiLU, nn.GELU).
    """

    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d
    act_layer: Callable[..., nn.Module] = nn.ReLU

    def norm(self, ch: int) -> nn.Module:
        return self.norm_layer(ch)

    def act(self, inplace: bool = True) -> nn.Module:
        """In place where the caller says the input is not needed again (saves a buffer)."""
        try:
            return self.act_layer(inplace=inplace)
        except TypeError:  # an activation without the option (nn.GELU, a plain callable)
            return self.act_layer()


BN_RELU = Layers()


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False
    )


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A (He et al. 2015): subsample by the stride and zero-pad the new channels. No parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # The new channels go after the old ones; their order is irrelevant to what the net can learn.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class Projection(nn.Module):
    """A projection shortcut: optional pool, 1x1 conv (stride when there is no pool), optional BN."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        pool: str = "",
        norm: bool = True,
        layers: Layers = BN_RELU,
    ):
        super().__init__()
        if pool == "avg" and stride > 1:
            # ResNet-D / Res2Net-v1b: average the 2x2 window so no activation is skipped.
            self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        elif pool == "max" and stride > 1:
            # iResNet: a 3x3 max-pool picks the strongest activation instead of the top-left one.
            self.pool = nn.MaxPool2d(3, stride, padding=1)
        else:
            self.pool = None
        conv_stride = stride if self.pool is None and pool == "" else 1
        self.conv = conv1x1(in_ch, out_ch, conv_stride) if in_ch != out_ch or self.pool is None else None
        self.bn = layers.norm(out_ch) if norm and self.conv is not None else None

    def fold_pairs(self) -> list[tuple[str, str]]:
        """(conv, BN) attribute pairs where the BN reads exactly the conv's output: `deploy` folds them."""
        return [("conv", "bn")] if self.conv is not None and self.bn is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        if self.conv is not None:
            x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return x


def make_shortcut(
    kind: str, in_ch: int, out_ch: int, stride: int, norm: bool = True, layers: Layers = BN_RELU
) -> nn.Module | None:
    """The shortcut of a block. None means no shortcut at all (plain nets).

    kind: "A" zero-pad, "B" projection where the shape changes, "C" projection everywhere,
    "avgdown" avg-pool + 1x1 + BN, "maxpool" iResNet's max-pool + 1x1 + BN, "none" plain.
    `norm=False` drops the BN after the projection (pre-activation nets); `layers.norm` builds it.
    """
    if kind == "none":
        return None
    same = in_ch == out_ch and stride == 1
    if same and kind != "C":
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_ch, out_ch, stride)
    if kind in ("B", "C"):
        return Projection(in_ch, out_ch, stride, norm=norm, layers=layers)
    if kind == "avgdown":
        return Projection(in_ch, out_ch, stride, pool="avg", norm=norm, layers=layers)
    if kind == "maxpool":
        return Projection(in_ch, out_ch, stride, pool="max", norm=norm, layers=layers)
    raise ValueError(f"unknown shortcut kind {kind!r} (expected A, B, C, avgdown, maxpool or none)")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid gate."""

    def __init__(self, ch: int, ratio: float, act: nn.Module | None = None):
        super().__init__()
        hidden = max(1, int(round(ch * ratio)))
        self.fc1 = nn.Conv2d(ch, hidden, 1)
        self.act = nn.ReLU(inplace=True) if act is None else act
        self.fc2 = nn.Conv2d(hidden, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample while training."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
