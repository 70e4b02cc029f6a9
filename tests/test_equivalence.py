"""Our networks compute what the reference implementations compute, given their weights.

Each reference net gets seeded random weights and BatchNorm statistics, its state dict is renamed
by `resnets.convert` and loaded strictly into our net, and the eval-mode logits must agree. The
renamed dict must also convert back to exactly the reference's.

Both sides are built on the meta device and materialised once: the default initialisations of
~800M parameters would otherwise dominate the runtime on a small CPU.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from resnets import create_model
from resnets.convert import LAYOUTS, UnmappedKeysError, from_ours, guess_shortcuts, to_ours

TOL = 1e-4
SIZE = 64  # the smallest input every net here reduces to a 2x2 map


@pytest.fixture(autouse=True, scope="module")
def _no_onednn(one_thread):
    # oneDNN builds a kernel for every new conv shape, which at 64 px costs more than the
    # convolutions themselves (a Res2Net-50 forward: ~1 s with it, ~0.2 s without).
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Fill every tensor of `model` with seeded random values, BatchNorm statistics included.

    The running statistics are first measured on a random batch and then perturbed, so they are
    random yet in the range the activations take: with arbitrary statistics the logits of a
    152-layer post-activation net reach 1e6 and a 1e-4 tolerance would test nothing.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:  # conv / linear weight: He-normal on the fan-in
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5, generator=g)
            elif name.endswith("weight"):  # norm scale
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, 0.2, generator=g)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        model.train()(torch.randn(4, 3, SIZE, SIZE, generator=g))
        for bn in bns:
            bn.momentum = 0.1
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=g))
            bn.running_var.mul_(torch.empty_like(std).uniform_(0.7, 1.4, generator=g))
    return model.eval()


def materialize(build, seed: int) -> nn.Module:
    with torch.device("meta"):
        model = build()
    return randomize(model.to_empty(device="cpu"), seed)


def ours_from(state_dict: dict[str, torch.Tensor], name: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def check_pair(ref: nn.Module, name: str, layout: str, batch: int = 2, **overrides) -> float:
    ref_sd = ref.state_dict()
    ours = ours_from(to_ours(ref_sd, layout), name, **overrides)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    expected, got = logits(ref, x), logits(ours, x)
    # The comparison means something only if the logits are neither tiny nor huge.
    assert 0.1 < expected.std() < 100, f"reference logits badly scaled: std {expected.std():.3g}"
    diff = (expected - got).abs().max().item()
    assert diff <= TOL, f"{name} vs reference: max abs diff {diff:.3g}"

    back = from_ours(ours.state_dict(), layout, ours.spec)
    assert set(back) == set(ref_sd), f"round trip keys differ: {sorted(set(back) ^ set(ref_sd))[:6]}"
    for k, v in ref_sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), f"round trip changed {k}"
    return diff


TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision(name):
    ref = materialize(lambda: getattr(torchvision.models, name)(weights=None), seed=0)
    check_pair(ref, name, "torchvision", batch=1 if "101" in name or "152" in name else 2)


DEEP_AVGDOWN = dict(stem="deep", shortcut="avgdown")  # ResNet-D: timm's *d nets
TIMM = [  # (timm name, ours, overrides of ours, layout)
    ("resnet50", "resnet50", {}, "timm"),
    ("resnet50d", "resnet50", DEEP_AVGDOWN, "timm"),
    ("res2net50_26w_4s", "res2net50_26w_4s", {}, "res2net_official"),
    ("res2net50_48w_2s", "res2net50_48w_2s", {}, "res2net_official"),
    ("res2net50_14w_8s", "res2net50_14w_8s", {}, "res2net_official"),
    ("res2next50", "res2next50", {}, "res2net_official"),
    ("res2net50d", "res2net50_v1b_26w_4s", {}, "res2net_official"),
    ("res2net101d", "res2net101_v1b_26w_4s", {}, "res2net_official"),
    ("res2net50d", "res2net50_v1b_26w_4s", {}, "timm"),
    ("resnetv2_50", "preact_resnet50", {}, "timm_resnetv2"),
    ("resnetv2_18", "preact_resnet18", {}, "timm_resnetv2"),
    ("resnetv2_50d", "preact_resnet50", DEEP_AVGDOWN, "timm_resnetv2"),
]


@pytest.mark.parametrize("timm_name,name,overrides,layout", TIMM)
def test_timm(timm_name, name, overrides, layout):
    ref = materialize(lambda: timm.create_model(timm_name, pretrained=False), seed=0)
    check_pair(ref, name, layout, batch=1 if "101" in name else 2, **overrides)


def test_a_freshly_built_model_loads_converted_weights():
    """The tests above load with `assign=True` into meta models; the usual path must work too."""
    ref = materialize(lambda: torchvision.models.resnet18(weights=None), seed=3)
    ours = create_model("resnet18").eval()
    ours.load_state_dict(to_ours(ref.state_dict(), "torchvision"), strict=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert (logits(ref, x) - logits(ours, x)).abs().max() <= TOL


# --- official iResNet ---------------------------------------------------------------------------
# A re-implementation of the structure of iduta/iresnet `models/iresnet.py` (its attribute names
# give the checkpoint keys). Two versions of that file exist: one builds the blocks' ReLU with
# `inplace=True`, so the block after the start block turns its input, which its shortcut also
# holds, into ReLU(x); the other uses a plain ReLU. `inplace` picks the version.


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class OfficialBlock(nn.Module):
    """BasicBlock (expansion 1) or Bottleneck (expansion 4) with start_block / end_block / exclude_bn0."""

    def __init__(
        self,
        bottleneck,
        cin,
        planes,
        stride=1,
        downsample=None,
        start=False,
        end=False,
        no_bn0=False,
        inplace=True,
    ):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        cout = planes * self.expansion
        if not start and not no_bn0:
            self.bn0 = nn.BatchNorm2d(cin)
        if bottleneck:  # stride in the 3x3
            self.conv1, self.bn1 = _conv(cin, planes, 1), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
            self.conv3 = _conv(planes, cout, 1)
        else:
            self.conv1, self.bn1 = _conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
            self.conv2 = _conv(planes, planes, 3)
        self.n = 3 if bottleneck else 2
        if start or end:  # the last BN: on the branch in a start block, after the add in an end block
            setattr(self, f"bn{self.n}", nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=inplace)
        self.downsample = downsample
        self.start, self.end, self.no_bn0 = start, end, no_bn0

    def forward(self, x):
        identity = x
        if self.start:
            out = x
        elif self.no_bn0:
            out = self.relu(x)  # in place: `identity` is the same tensor
        else:
            out = self.relu(self.bn0(x))
        out = self.relu(self.bn1(self.conv1(out)))
        if self.n == 3:
            out = self.relu(self.bn2(self.conv2(out)))
        out = getattr(self, f"conv{self.n}")(out)
        if self.start:
            out = getattr(self, f"bn{self.n}")(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        if self.end:
            out = self.relu(getattr(self, f"bn{self.n}")(out))
        return out


class OfficialIResNet(nn.Module):
    def __init__(self, bottleneck, layers, num_classes=1000, inplace=True):
        super().__init__()
        self.bottleneck, self.inplace = bottleneck, inplace
        self.inplanes = 64
        self.conv1, self.bn1 = _conv(3, 64, 7, 2), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # No max-pool in the stem: every stage, the first included, has stride 2.
        self.layer1 = self._make_layer(64, layers[0], 2)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, planes, blocks, stride):
        cout = planes * (4 if self.bottleneck else 1)
        pool = nn.MaxPool2d(3, stride, padding=1)
        proj = [_conv(self.inplanes, cout, 1), nn.BatchNorm2d(cout)]
        if stride != 1 and self.inplanes != cout:
            downsample = nn.Sequential(pool, *proj)
        elif self.inplanes != cout:
            downsample = nn.Sequential(*proj)
        else:
            downsample = pool if stride != 1 else None
        kw = dict(inplace=self.inplace)
        layers = [OfficialBlock(self.bottleneck, self.inplanes, planes, stride, downsample, start=True, **kw)]
        self.inplanes = cout
        no_bn0 = True
        for _ in range(1, blocks - 1):
            layers.append(OfficialBlock(self.bottleneck, cout, planes, no_bn0=no_bn0, **kw))
            no_bn0 = False
        layers.append(OfficialBlock(self.bottleneck, cout, planes, end=True, no_bn0=no_bn0, **kw))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


IRESNET_DEPTHS = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}


def official_iresnet(depth: int, inplace: bool = True, seed: int = 0) -> nn.Module:
    bottleneck, layers = IRESNET_DEPTHS[depth]
    return materialize(lambda: OfficialIResNet(bottleneck, layers, inplace=inplace), seed)


@pytest.mark.parametrize("depth", [18, 50])
def test_official_iresnet(depth):
    check_pair(official_iresnet(depth), f"iresnet{depth}", "iresnet_official")


@pytest.mark.parametrize("depth", [18, 50])
def test_iresnet_quirk_matters_and_the_paper_variant_is_the_plain_relu_version(depth):
    ref = official_iresnet(depth, inplace=True)
    sd = to_ours(ref.state_dict(), "iresnet_official")
    paper = ours_from(sd, f"iresnet{depth}", official_quirks=False)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    expected = logits(ref, x)
    assert (expected - logits(paper, x)).abs().max() > 100 * TOL  # the in-place ReLU changes the net

    # Without the in-place ReLU the official code is the paper's figure: official_quirks=False.
    plain = official_iresnet(depth, inplace=False)
    plain.load_state_dict(ref.state_dict())
    assert (logits(plain, x) - logits(paper, x)).abs().max() <= TOL


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_iresnet_has_the_parameters_of_resnet(depth):
    with torch.device("meta"):
        shapes = {
            n: [p.shape for p in create_model(f"{n}{depth}").parameters()] for n in ("resnet", "iresnet")
        }
    counts = {n: sum(s.numel() for s in v) for n, v in shapes.items()}
    assert counts["iresnet"] == counts["resnet"]
    # The official code has the same count (the re-implementation above, the two nets we compare).
    if depth in IRESNET_DEPTHS:
        with torch.device("meta"):
            official = OfficialIResNet(*IRESNET_DEPTHS[depth])
        assert sum(p.numel() for p in official.parameters()) == counts["iresnet"]


# --- the converter itself -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "iresnet50", "res2net50_v1b_26w_4s", "preact_resnet50"])
def test_guessed_shortcuts_give_the_keys_the_spec_gives(name):
    with torch.device("meta"):
        model = create_model(name)
    sd = model.state_dict()
    preact = name.startswith("preact")
    for layout in LAYOUTS:
        if preact != (layout == "timm_resnetv2") and layout != "resnets":
            continue  # pre-activation nets have one reference layout, the others another
        assert list(from_ours(sd, layout)) == list(from_ours(sd, layout, model.spec)), layout
    assert guess_shortcuts(sd).shortcut == model.spec.shortcut


def test_mmpretrain_layout_puts_the_deep_stem_and_avg_down_where_mmpretrain_does():
    with torch.device("meta"):
        resnet_d = create_model("resnet50", stem="deep", shortcut="avgdown")
        res2net = create_model("res2net50_v1b_26w_4s")
    keys = from_ours(resnet_d.state_dict(), "mmpretrain", resnet_d.spec)
    assert "backbone.stem.2.bn.weight" in keys and "backbone.bn1.weight" not in keys
    # ResNetV1d: no pool in front of the stride-1 projection of layer1, one in the later stages.
    assert "backbone.layer1.0.downsample.0.weight" in keys
    assert "backbone.layer2.0.downsample.1.weight" in keys and "head.fc.weight" in keys
    # mmpretrain's Res2Net always puts the pool first.
    assert "backbone.layer1.0.downsample.1.weight" in from_ours(
        res2net.state_dict(), "mmpretrain", res2net.spec
    )
    for model in (resnet_d, res2net):
        sd = model.state_dict()
        assert to_ours(from_ours(sd, "mmpretrain", model.spec), "mmpretrain").keys() == sd.keys()


def test_unmapped_keys_raise_or_pass_through():
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "transformer.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}
    with pytest.raises(UnmappedKeysError, match="transformer.blocks.0.attn.qkv.weight"):
        to_ours(sd, "torchvision")
    assert set(to_ours(sd, "torchvision", strict=False)) == {
        "stem.conv.weight",
        "transformer.blocks.0.attn.qkv.weight",
    }
    with pytest.raises(ValueError, match="unknown layout"):
        to_ours(sd, "caffe")
