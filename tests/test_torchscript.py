"""torch.jit.script on every network: each block class and variant by default, every registered
model with `pytest -m slow`; also backbones and torchvision's fx feature extractor."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from resnets import create_model, list_models
from resnets.registry import FAMILIES

# Every block class, block variant and optional part (stems, shortcuts, SE, pooling).
VARIANTS = [(f.example, {}) for f in FAMILIES.values()] + [
    ("resnet20", {}),
    ("plain20", {}),
    ("resnet50_v1", {}),
    ("res2net50_v1b_26w_4s", {}),
    ("se_res2next29_6c24w6s", dict(depths=(1, 1, 1))),
    ("preact_resnet110", dict(shortcut="A", depths=(2, 2, 2))),
    ("wrn16_4", dict(dropout=0.3)),
    ("iresnet18", dict(official_quirks=False)),
    ("resgroup50", dict(depths=(1, 1, 1, 1))),  # 3x3 groups per stage
    ("iresgroup50", dict(depths=(4, 2, 2, 2))),  # the same in iResNet's start / middle / end blocks
    ("resnet18", dict(global_pool="avgmax", se_ratio=0.25, drop_path=0.1)),
    *[
        ("resnet20", dict(unit=u))
        for u in ("bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
    ],
    *[("resnext29_8x64d", dict(depths=(1, 1, 1), resnext_form=f)) for f in ("a", "b")],
]
IDS = [n + "".join(f"-{k}={v}" for k, v in o.items() if k != "depths") for n, o in VARIANTS]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
DEEPEST = {"resnet1202", "preact_resnet1001", "iresnet302", "iresnet404", "iresnet1001"}


def _scripted_matches(model, size=32):
    torch.manual_seed(0)
    model.eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected, got = model(x), scripted(x)
    if isinstance(expected, list):
        assert len(got) == len(expected) and all(
            torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected)
        )
    else:
        assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_script_every_block_and_variant(name, overrides):
    _scripted_matches(create_model(name, **overrides))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n not in DEEPEST])
def test_script_every_model(name):
    _scripted_matches(create_model(name))


def test_script_a_backbone():
    _scripted_matches(
        create_model("resnet50", features_only=True, out_indices=(0, 2, 4), output_stride=16), 64
    )


def test_script_an_fx_feature_extractor():
    model = create_model("res2net50_26w_4s").eval()
    fx = create_feature_extractor(
        model, return_nodes={"stages.1": "c3", "stages.3": "c5", "head.fc": "logits"}
    )
    scripted = torch.jit.script(fx)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = scripted(x), fx(x)
        assert set(out) == {"c3", "c5", "logits"}
        assert all(torch.allclose(out[k], ref[k], atol=1e-5) for k in ref)
        assert torch.allclose(out["logits"], model(x), atol=1e-5)
        assert out["c5"].shape == (1, 2048, 2, 2)
