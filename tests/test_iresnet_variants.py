"""The iResNet paper's other networks are the official code's (iduta/iresnet): ResStage
(`models/resstage.py`), ResGroup (`resgroup.py`), iResGroup (`iresgroup.py`), ResGroupFix
(`resgroupfix.py`) and iResGroupFix (`iresgroupfix.py`). Same parameters and keys at every
registered depth; on the same weights, the same outputs.

The official modules cannot be imported here, so the classes below restate their structure: the
attribute names (hence the state-dict keys), the order of the layers and the in-place ReLU are
the official ones; only what does not reach the state dict or the eval-mode output (download
code, initialisation, dropout, norm_layer) is left out.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnets import create_model, list_models, load_weights
from resnets.convert import from_ours, to_ours
from resnets.models import iresnet
from resnets.weights import detect_layout

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
DEPTHS[200] = [3, 24, 36, 3]


# --- the official structure ---------------------------------------------------------------------


def conv3x3(in_planes, out_planes, stride=1, groups=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False, groups=groups)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """resstage.py: start_block / end_block / exclude_bn0 around 3x3, BN, ReLU, 3x3."""

    expansion = 1

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, start_block=False, end_block=False,
        exclude_bn0=False, inplace=True,
    ):  # fmt: skip
        super().__init__()
        if not start_block and not exclude_bn0:
            self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = conv3x3(planes, planes)
        if start_block or end_block:
            self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.start_block, self.end_block, self.exclude_bn0 = start_block, end_block, exclude_bn0

    def pre(self, x):
        if self.start_block:
            return x
        # In place when the ReLU is: `identity` in forward() is this same tensor.
        return self.relu(x) if self.exclude_bn0 else self.relu(self.bn0(x))

    def branch(self, out):
        return self.conv2(self.relu(self.bn1(self.conv1(out))))

    def forward(self, x):
        identity = x
        out = self.branch(self.pre(x))
        last_bn = getattr(self, f"bn{self.n_convs}", None)
        if self.start_block:
            out = last_bn(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        if self.end_block:
            out = self.relu(last_bn(out))
        return out

    n_convs = 2


class Bottleneck(BasicBlock):
    """resstage.py's Bottleneck: 1x1 (planes), 3x3 (planes, stride), 1x1 (4 * planes)."""

    expansion = 4
    n_convs = 3

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, start_block=False, end_block=False,
        exclude_bn0=False, inplace=True, groups=1,
    ):  # fmt: skip
        nn.Module.__init__(self)
        out = int(planes * self.expansion)
        if not start_block and not exclude_bn0:
            self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1, self.bn1 = conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out)
        if start_block or end_block:
            self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=inplace)
        self.downsample = downsample
        self.start_block, self.end_block, self.exclude_bn0 = start_block, end_block, exclude_bn0

    def branch(self, out):
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out)


class iResGroupBlock(Bottleneck):  # noqa: N801 - `ResGroupBlock` of iresgroup.py / iresgroupfix.py
    """The same positions; the 3x3 is `planes` wide and grouped, the output planes // 2."""

    expansion = 0.5


class ResGroupBlock(nn.Module):
    """resgroup.py / resgroupfix.py: 1x1, BN, ReLU, grouped 3x3 (stride), BN, ReLU, 1x1 (planes // 2), BN; add; ReLU."""

    expansion = 0.5

    def __init__(self, inplanes, planes, stride=1, downsample=None, inplace=True, groups=1):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride, groups), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, planes // 2), nn.BatchNorm2d(planes // 2)
        self.relu = nn.ReLU(inplace=inplace)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResStage(nn.Module):
    """The official networks' stem, layer1..4 and fc; the subclasses set what differs."""

    planes = (64, 128, 256, 512)
    stem_pool = True  # ResNet's stem; without it layer1 strides too
    maxpool_shortcut = False  # iResNet's max-pool -> 1x1 -> BN instead of a strided 1x1 -> BN
    positional = True  # start / middle / end blocks

    def __init__(self, block, layers, groups=None, inplace=True, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if self.stem_pool else None
        for i, (planes, n) in enumerate(zip(self.planes, layers)):
            stride = 1 if i == 0 and self.stem_pool else 2
            kw = dict(inplace=inplace) | ({} if groups is None else dict(groups=groups[i]))
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride, kw))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _downsample(self, out, stride):
        if not self.maxpool_shortcut:
            if stride != 1 or self.inplanes != out:
                return nn.Sequential(conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
            return None
        proj = [conv1x1(self.inplanes, out), nn.BatchNorm2d(out)]
        if stride != 1 and self.inplanes != out:
            return nn.Sequential(nn.MaxPool2d(3, stride=stride, padding=1), *proj)
        if self.inplanes != out:
            return nn.Sequential(*proj)
        return nn.MaxPool2d(3, stride=stride, padding=1) if stride != 1 else None

    def _make_layer(self, block, planes, blocks, stride, kw):
        out = int(planes * block.expansion)
        downsample = self._downsample(out, stride)
        if not self.positional:
            layers = [block(self.inplanes, planes, stride, downsample, **kw)]
            layers += [block(out, planes, **kw) for _ in range(1, blocks)]
        else:
            layers = [block(self.inplanes, planes, stride, downsample, start_block=True, **kw)]
            exclude_bn0 = True
            for _ in range(1, blocks - 1):
                layers.append(block(out, planes, exclude_bn0=exclude_bn0, **kw))
                exclude_bn0 = False
            layers.append(block(out, planes, end_block=True, exclude_bn0=exclude_bn0, **kw))
        self.inplanes = out
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResGroup(ResStage):
    planes = (256, 512, 1024, 2048)
    positional = False


class ResGroupFix(ResGroup):
    pass


class iResGroup(ResStage):  # noqa: N801 - the official class name
    planes = (256, 512, 1024, 2048)
    stem_pool = False
    maxpool_shortcut = True


class iResGroupFix(iResGroup):  # noqa: N801
    pass


GROUPS = 64  # the official default (`--groups` unset)
# Our name -> official class, block and groups per stage (the official code divides by 8/4/2/1).
OFFICIAL = {
    "resstage": (ResStage, None, None),
    "resgroup": (ResGroup, ResGroupBlock, tuple(max(1, GROUPS // d) for d in (8, 4, 2, 1))),
    "resgroupfix": (ResGroupFix, ResGroupBlock, (GROUPS,) * 4),
    "iresgroup": (iResGroup, iResGroupBlock, tuple(max(1, GROUPS // d) for d in (8, 4, 2, 1))),
    "iresgroupfix": (iResGroupFix, iResGroupBlock, (GROUPS,) * 4),
}
NAMES = [n for n in list_models() if n.rstrip("0123456789") in OFFICIAL]


def official(name: str, inplace: bool = True) -> nn.Module:
    family, depth = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :])
    cls, block, groups = OFFICIAL[family]
    if block is None:
        block = BasicBlock if depth < 50 else Bottleneck
    return cls(block, DEPTHS[depth], groups, inplace=inplace)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights; BN statistics measured on a random batch, then perturbed, so that
    eval-mode outputs are well scaled and no BN is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5, generator=g)
            else:
                p.uniform_(0.5, 1.5, generator=g) if name.endswith("weight") else p.normal_(
                    0, 0.2, generator=g
                )
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.momentum = None  # one batch sets the statistics
        model.train()(torch.randn(4, 3, SIZE, SIZE, generator=g))
        for bn in bns:
            bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn(bn.num_features, generator=g))
            bn.running_var.mul_(torch.empty(bn.num_features).uniform_(0.7, 1.4, generator=g))
    return model.eval()


# --- tests ----------------------------------------------------------------------------------------


def test_every_official_network_is_registered():
    expected = {f"resstage{d}" for d in DEPTHS} | {
        f"{f}{d}" for f in OFFICIAL if f != "resstage" for d in (50, 101, 152)
    }
    assert set(NAMES) == expected


@pytest.mark.parametrize("name", NAMES)
def test_parameters_and_keys_are_the_official_ones(name):
    with torch.device("meta"):
        ref, ours = official(name), create_model(name)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    layout = detect_layout(ref_sd)
    converted = to_ours(ref_sd, layout)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in our_sd.items()}
    assert set(from_ours(our_sd, layout, ours.spec)) == set(ref_sd)  # and back


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152, 200])
def test_resstage_has_the_parameters_of_resnet(depth):
    with torch.device("meta"):
        counts = [
            sum(p.numel() for p in create_model(f"{n}{depth}").parameters()) for n in ("resnet", "resstage")
        ]
    assert counts[0] == counts[1]


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("resstage18", "torchvision"),  # two-block stages: no bn0, a torchvision ResNet-18's keys
        ("resstage50", "iresnet_official"),
        ("resgroup50", "torchvision"),  # post-activation: torchvision's ResNet keys
        ("resgroupfix50", "torchvision"),
        ("iresgroup50", "iresnet_official"),
        ("iresgroupfix50", "iresnet_official"),
    ],
)
def test_official_weights_give_the_official_outputs(name, layout):
    ref = randomised(official(name))
    ours = create_model(name).eval()
    assert load_weights(ours, ref.state_dict()).layout == layout  # detected from the keys
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x.clone()), ours(x)
    assert 0.1 < expected.std() < 100, f"reference logits badly scaled: std {expected.std():.3g}"
    assert (expected - got).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("name", ["resstage50", "iresgroup50"])
def test_the_plain_relu_version_is_official_quirks_false(name):
    """resstage.py and iresgroup.py also exist with a plain ReLU, which leaves block 1's shortcut x."""
    ref = randomised(official(name, inplace=False))
    quirky = create_model(name).eval()
    plain = create_model(name, official_quirks=False).eval()
    for model in (quirky, plain):
        load_weights(model, ref.state_dict())
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x.clone())
        assert (expected - plain(x)).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
        assert (expected - quirky(x)).abs().max() > 1e-2 * expected.abs().max()


def test_groups_per_stage():
    """ResGroup: 8/16/32/64 groups of 32 channels; the fix variants: 64 groups everywhere."""
    with torch.device("meta"):
        for name, groups in [
            ("resgroup50", (8, 16, 32, 64)),
            ("iresgroup50", (8, 16, 32, 64)),
            ("resgroupfix50", (64,) * 4),
            ("iresgroupfix50", (64,) * 4),
        ]:
            model = create_model(name)
            convs = [stage[0].conv2 for stage in model.stages]
            assert tuple(c.groups for c in convs) == groups, name
            assert [c.out_channels for c in convs] == [256, 512, 1024, 2048]
            assert [stage[0].conv3.out_channels for stage in model.stages] == [128, 256, 512, 1024]
        # `groups` is the last stage's number, as the official `groups` argument.
        assert [s[0].conv2.groups for s in create_model("iresgroup50", groups=16).stages] == [2, 4, 8, 16]


def test_block_classes():
    assert type(create_model("resgroup50").stages[0][0]) is iresnet.ResGroupBlock
    assert type(create_model("iresgroup50").stages[0][0]) is iresnet.IResGroupBlock
    with pytest.raises(ValueError, match="does not use base_width"):
        create_model("iresgroup50", base_width=8)
    with pytest.raises(ValueError, match="does not use resnext_form"):
        create_model("resgroup50", resnext_form="a")
    with pytest.raises(ValueError, match="groups=48 leaves 6 groups in stage 1, which do not divide its 256"):
        create_model("iresgroup50", groups=48)
