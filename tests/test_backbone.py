"""features_only backbones and output_stride (dilation) for every family."""

from __future__ import annotations

import pytest
import torch

from resnets import create_model
from resnets.registry import FAMILIES

# Each family's example network, plus nets whose stems or shortcuts the examples do not cover.
ONE_PER_FAMILY = [f.example for f in FAMILIES.values()] + ["resnet50", "res2net50_v1b_26w_4s"]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_match_feature_info(name, output_stride):
    model = create_model(
        name, features_only=True, out_indices=(1, 2, 3, 4), output_stride=output_stride
    ).eval()
    size = 64
    with torch.no_grad():
        feats = model(torch.randn(1, 3, size, size))
    assert len(feats) == 4 == len(model.feature_info)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[-1] == size // info["reduction"]
    assert max(model.feature_info.reduction()) == output_stride


def test_features_equal_the_classifier_stages():
    torch.manual_seed(0)
    net = create_model("resnet18").eval()
    backbone = create_model("resnet18", features_only=True, out_indices=(4,)).eval()
    missing, unexpected = backbone.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.startswith("head.") for k in unexpected)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone(x)[0], net.forward_features(x))


def test_dilation_keeps_the_weights():
    # A dilated net has exactly the same parameters: classifier weights load unchanged.
    a, b = create_model("resnet50"), create_model("resnet50", output_stride=8)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert b.stages[3][1].conv2.dilation == (4, 4) and b.stages[3][0].conv2.dilation == (2, 2)


def test_bad_out_indices():
    with pytest.raises(ValueError, match="out_indices"):
        create_model("resnet20", features_only=True, out_indices=(4,))
