"""norm_layer and act_layer: honoured by every block, stem, head and shortcut."""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import randomise_bn
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from resnets import create_model
from resnets.deploy import fold_batchnorm
from resnets.registry import FAMILIES

# Each family's example, narrower and with two blocks per stage (every block position, a fraction
# of the weights to build), and the variants that build other block classes or extra parts.
SMALL = dict(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512))
NETS = [(f.example, SMALL) for f in FAMILIES.values()] + [
    ("resnet20", dict(unit="relu_only_preact")),
    ("resnet20", dict(unit="bn_after_add")),
    ("resnet20", dict(unit="relu_before_add")),
    ("resnet20", dict(unit="full_preact")),
    ("resnext29_8x64d", dict(depths=(1, 1, 1), resnext_form="a")),
    ("res2net50_v1b_26w_4s", SMALL),  # deep stem, avg-down shortcuts
    ("resgroup50", SMALL),  # iResNet's improved building block (the iresnet family's other blocks)
    ("iresgroup50", SMALL),
    ("se_res2next29_6c24w6s", dict(depths=(1, 1, 1))),  # SE
]
IDS = [f"{n}-{'-'.join(str(v) for k, v in o.items() if k not in SMALL)}".rstrip("-") for n, o in NETS]


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(("name", "overrides"), NETS, ids=IDS)
def test_every_norm_and_activation_is_replaced(name, overrides):
    with torch.device("meta"):
        default = create_model(name, **overrides)
        model = create_model(name, norm_layer=lambda c: nn.GroupNorm(1, c), act_layer=nn.SiLU, **overrides)
    assert _count(model, nn.BatchNorm2d) == 0 and _count(model, nn.ReLU) == 0
    assert _count(model, nn.GroupNorm) == _count(default, nn.BatchNorm2d) > 0
    assert _count(model, nn.SiLU) == _count(default, nn.ReLU) > 0


@pytest.mark.parametrize(("name", "overrides"), [n for n in NETS if not n[0].startswith("se_")], ids=IDS[:-1])
def test_no_activation_is_hard_coded(name, overrides):
    # With identity norms and activations the net is linear, hence odd, unless a ReLU (or a BN) is
    # built or called outside norm_layer / act_layer. Max-pools are not odd: a CIFAR stem, and
    # projection instead of max-pool shortcuts in iResNet.
    extra = dict(stem="cifar", num_classes=0)
    if name.startswith(("iresnet", "iresgroup")):
        extra["shortcut"] = "B"
    torch.manual_seed(0)
    model = create_model(
        name, norm_layer=lambda c: nn.Identity(), act_layer=nn.Identity, **extra, **overrides
    )
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model.double().eval()
        assert torch.allclose(model(-x), -model(x), rtol=1e-6, atol=1e-9)
        assert model(x).abs().sum() > 0


def test_activation_without_inplace_option():
    model = create_model("resnet20", act_layer=nn.GELU)
    assert _count(model, nn.GELU) == _count(create_model("resnet20"), nn.ReLU)
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.parametrize("name", ["resnet50", "preact_resnet18", "iresnet18"])
def test_frozen_batchnorm_matches_eval_mode_and_deploy_folding_skips_it(name):
    torch.manual_seed(0)
    ref = create_model(name, **SMALL).double().eval()
    randomise_bn(ref)
    frozen = create_model(name, norm_layer=FrozenBatchNorm2d, **SMALL).double()
    frozen.load_state_dict(ref.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked itself
    frozen.train()  # frozen statistics in training mode too
    assert _count(frozen, nn.BatchNorm2d) == 0
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        assert torch.allclose(frozen(x), expected, rtol=1e-9, atol=1e-9)
        folded = copy.deepcopy(frozen).eval()
        assert fold_batchnorm(folded) == 0  # only BatchNorm2d folds; other norms stay as they are
        assert torch.equal(folded(x), frozen(x))
        assert fold_batchnorm(copy.deepcopy(ref)) > 0
