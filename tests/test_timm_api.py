"""timm's model API on every network: data config, global pooling, classifier reset, gradient
checkpointing, BN freezing, each checked with timm's own helpers where timm has one."""

from __future__ import annotations

import pytest
import torch
from model_checks import DEEPER_COPIES
from timm.data import resolve_data_config
from timm.layers import freeze_batch_norm_2d
from timm.utils import freeze

from resnets import create_model, get_entry, list_models

DEEPEST = {"resnet1202", "preact_resnet1001", "iresnet302", "iresnet404", "iresnet1001"}  # slow to build


def _sweep():
    slow = DEEPEST | DEEPER_COPIES
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in list_models()]


@pytest.mark.parametrize("name", _sweep())
def test_data_config_matches_the_network(name):
    entry = get_entry(name)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = create_model(name)
        cfg = resolve_data_config(model=model)
        size = entry.input_size
        assert cfg["input_size"] == (3, size, size)
        assert cfg["crop_pct"] == (1.0 if size == 32 else 0.875)
        cifar100 = entry.spec.num_classes == 100
        expected_mean = {224: 0.485, 32: 0.5071 if cifar100 else 0.4914}[size]
        assert cfg["mean"][0] == expected_mean and len(cfg["std"]) == 3
        pc = model.pretrained_cfg
        assert model.default_cfg is pc and pc["num_classes"] == entry.spec.num_classes
        feats = model.forward_features(torch.empty(1, *pc["input_size"]))
        assert tuple(feats.shape[-2:]) == pc["pool_size"]
        assert model.get_submodule(pc["first_conv"]).in_channels == 3
        assert model.get_submodule(pc["classifier"]) is model.get_classifier()


def test_cifar_net_in_chans_and_output_stride_change_the_config():
    m = create_model("resnet56", in_chans=1)
    assert resolve_data_config(model=m)["input_size"] == (1, 32, 32)
    assert len(m.pretrained_cfg["mean"]) == 1
    assert create_model("resnet50", output_stride=16).pretrained_cfg["pool_size"] == (14, 14)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_global_pool(pool):
    torch.manual_seed(0)
    model = create_model("resnet20", global_pool=pool).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x)
        pooled = {
            "avg": f.mean((2, 3)),
            "max": f.amax((2, 3)),
            "avgmax": (f.mean((2, 3)) + f.amax((2, 3))) / 2,
        }
        assert torch.allclose(model.forward_head(f, pre_logits=True), pooled[pool])
        assert torch.allclose(model(x), model.head.fc(pooled[pool]), atol=1e-6)


def test_no_pooling_needs_no_classifier():
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        create_model("resnet20", global_pool="")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        create_model("resnet20", global_pool="mean")
    m = create_model("resnet20", num_classes=0, global_pool="")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 64, 8, 8)


def test_reset_classifier_with_pooling():
    torch.manual_seed(0)
    model = create_model("preact_resnet18").eval()
    model.reset_classifier(5, "max")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = torch.relu(model.head.norm(feats)).amax((2, 3))
        assert torch.allclose(model(x), model.head.fc(pre), atol=1e-6)
    assert (
        model.num_classes == 5
        and model.pretrained_cfg["num_classes"] == 5
        and model.spec.global_pool == "max"
    )
    model.reset_classifier(0, "")
    assert model(x).shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(10, "")


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet110", "iresnet18", "res2net50_26w_4s"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.1, depths=(2,) * len(get_entry(name).spec.depths))
    x = torch.randn(2, 3, 32, 32)
    calls = []
    model.stages[0][0].register_forward_pre_hook(lambda *_: calls.append(1))
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the same drop-path masks in both runs
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        assert len(calls) == (2 if enable else 1)  # checkpointed: run again in the backward pass
    (out0, g0), (out1, g1) = grads
    assert torch.equal(out0, out1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    assert any(g.abs().sum() > 0 for g in g1)


def test_timm_bn_freezing():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    frozen = freeze_batch_norm_2d(create_model("resnet20"))
    frozen.load_state_dict(model.state_dict())
    frozen.train()  # frozen BN uses its running statistics even in training mode
    names = {type(m).__name__ for m in frozen.modules()}
    assert "FrozenBatchNorm2d" in names and "BatchNorm2d" not in names
    with torch.no_grad():
        assert torch.allclose(frozen(x), expected, atol=1e-5)
    freeze(model)  # timm.utils: no parameter trains, BN frozen too
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
