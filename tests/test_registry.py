"""The model zoo: every registered network builds, trains one step, and matches its paper's counts."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import pytest
import torch
from model_checks import DEEPER_COPIES

import resnets
from resnets import NetSpec, count_params_macs, create_model, get_entry, list_models
from resnets.registry import UnknownModelError

REQUIRED = """
resnet18 resnet34 resnet50 resnet101 resnet152 resnet200 resnet50_v1 resnet101_v1 resnet152_v1 plain18 plain34
resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202 plain20 plain32 plain44 plain56 plain110
preact_resnet18 preact_resnet34 preact_resnet50 preact_resnet101 preact_resnet152 preact_resnet200
preact_resnet110 preact_resnet164 preact_resnet1001
wrn16_4 wrn16_8 wrn16_10 wrn22_8 wrn22_10 wrn28_10 wrn28_12 wrn40_1 wrn40_2 wrn40_4 wrn40_8 wrn40_10 wrn52_1
wide_resnet50_2 wide_resnet101_2
resnext50_32x4d resnext101_32x4d resnext101_32x8d resnext101_64x4d resnext29_8x64d resnext29_16x64d
res2net50_26w_4s res2net50_48w_2s res2net50_14w_8s res2net50_26w_6s res2net50_26w_8s res2net101_26w_4s res2next50
se_res2net50_26w_4s res2net50_v1b_26w_4s res2net101_v1b_26w_4s
res2next29_6c24w4s res2next29_8c25w4s res2next29_6c24w6s se_res2next29_6c24w6s
iresnet18 iresnet34 iresnet50 iresnet101 iresnet152 iresnet200 iresnet302 iresnet404 iresnet1001
""".split()

# The deepest nets take seconds each to build and run; they run with `pytest -m slow`.
DEEPEST = {"resnet1202", "preact_resnet1001", "iresnet302", "iresnet404", "iresnet1001"}
SLOW = DEEPEST | DEEPER_COPIES
# The exact counts ship with the package (`resnets list` reads them instead of counting).
GOLDEN = json.loads((Path(resnets.__file__).parent / "counts.json").read_text())


@cache
def counts(name: str) -> tuple[int, int]:
    return count_params_macs(name)


def test_registry_has_every_required_name():
    missing = sorted(set(REQUIRED) - set(list_models()))
    assert not missing, f"not registered: {missing}"


def _sweep_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()]


@pytest.mark.parametrize("name", _sweep_params())
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(2, 3, 32, 32)  # 32 px reaches 1x1 in the ImageNet nets: the cheapest valid size
    out = model(x)
    assert out.shape == (2, get_entry(name).spec.num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def _printed_decimals(x: float) -> int:
    s = repr(x)
    return len(s.split(".")[1]) if "." in s else 0


def _within(ours: float, printed: float, rel: float) -> bool:
    # A number printed as 0.6 only says 0.55 <= x < 0.65: allow half a unit of the last printed digit.
    rounding = 0.5 * 10 ** -_printed_decimals(printed)
    return abs(ours - printed) <= max(rel * printed, rounding)


@pytest.mark.parametrize("name", [n for n in list_models() if get_entry(n).paper.params_m is not None])
def test_params_match_the_paper(name):
    paper = get_entry(name).paper
    if paper.params_tol > 0.02:
        assert paper.note, "a looser tolerance needs a note explaining the gap"
    params, _ = counts(name)
    assert _within(params / 1e6, paper.params_m, paper.params_tol), (
        f"{name}: {params / 1e6:.3f}M vs paper {paper.params_m}M ({paper.source})"
    )


@pytest.mark.parametrize("name", [n for n in list_models() if get_entry(n).paper.gmacs is not None])
def test_macs_match_the_paper(name):
    paper = get_entry(name).paper
    _, macs = counts(name)
    assert _within(macs / 1e9, paper.gmacs, 0.03), f"{name}: {macs / 1e9:.3f} GMACs vs paper {paper.gmacs}"


def test_tolerance_rule_rejects_real_gaps():
    # resnet50 (v1.5, 4.09 GMACs) is not the paper's 3.8-GMAC network: the rule must say so.
    _, macs = counts("resnet50")
    assert not _within(macs / 1e9, 3.8, 0.03)
    assert _within(macs / 1e9, 4.089, 0.03)
    assert not _within(0.66, 0.6, 0.02) and _within(0.564, 0.6, 0.02)


@pytest.mark.parametrize("name", [n for n in list_models() if n not in SLOW])
def test_golden_counts(name):
    params, macs = counts(name)
    golden = GOLDEN[name]
    assert (params, macs) == (golden["params"], golden["macs"]), (
        f"{name} changed; if on purpose, run `python scripts/update_golden.py --write`"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_golden_counts_deepest(name):
    assert counts(name) == (GOLDEN[name]["params"], GOLDEN[name]["macs"])


def test_golden_file_lists_every_model():
    assert sorted(GOLDEN) == sorted(list_models())
    assert all(GOLDEN[n]["input_size"] == get_entry(n).input_size for n in GOLDEN)


def test_macs_count_convs_as_the_arithmetic_gives():
    # resnet20 by hand: 3x3 convs at 32/16/8 px, option A shortcuts (free), fc 64 -> 10.
    def conv(cin, cout, hw):
        return cin * cout * 9 * hw * hw

    expected = conv(3, 16, 32) + 6 * conv(16, 16, 32)
    expected += conv(16, 32, 16) + 5 * conv(32, 32, 16)
    expected += conv(32, 64, 8) + 5 * conv(64, 64, 8) + 64 * 10
    assert counts("resnet20")[1] == expected


def test_v1_and_v15_differ_only_in_stride_placement():
    p15, m15 = counts("resnet50")
    p1, m1 = counts("resnet50_v1")
    assert p15 == p1 and m1 < m15
    assert math.isclose(m1 / 1e9, 3.86, abs_tol=0.01)


def test_iresnet_has_no_extra_parameters():
    for depth in (18, 34, 50, 101, 152, 200):
        assert counts(f"iresnet{depth}")[0] == counts(f"resnet{depth}")[0]


def test_plain_nets_equal_their_residual_twins_in_size():
    for depth in (20, 32, 44, 56, 110):
        assert counts(f"plain{depth}") == counts(f"resnet{depth}")


def test_overrides():
    m = create_model("resnet18", num_classes=7, in_chans=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    with pytest.raises(TypeError, match="not_a_field"):
        create_model("resnet18", not_a_field=1)
    with pytest.raises(ValueError, match="drop_path"):
        create_model("resnet18", drop_path=1.5)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="resnet50"):
        create_model("resnet05")


def test_list_models_pattern():
    assert list_models("wrn40_*") == ["wrn40_1", "wrn40_2", "wrn40_4", "wrn40_8", "wrn40_10"]  # natural order
    assert list_models("resnet1*") == [
        "resnet18",
        "resnet101",
        "resnet101_v1",
        "resnet110",
        "resnet152",
        "resnet152_v1",
        "resnet1202",
    ]
    assert list_models("resnet*").index("resnet18") < list_models("resnet*").index("resnet101")
    assert list_models("nothing*") == []


def test_entry_carries_the_paper_record():
    e = get_entry("resnet110")
    assert e.input_size == 32 and e.family == "resnet"
    assert e.paper.cifar10_err == 6.43 and "1512.03385" in e.paper.cite
    assert isinstance(e.spec, NetSpec) and e.spec.shortcut == "A"
    assert "v1.5" in get_entry("resnet50").paper.note


def test_zero_init_last_makes_blocks_identity():
    torch.manual_seed(0)
    for name in ("resnet20", "preact_resnet110", "iresnet18", "res2net50_26w_4s"):
        model = create_model(name, zero_init_last=True).eval()
        for stage in model.stages:
            # Blocks with an identity shortcut; iResNet's end block normalises after the add, so
            # only its middle blocks are identities.
            blocks = list(stage)[1:-1] if name.startswith("iresnet") else list(stage)[1:]
            for block in blocks:
                x = torch.randn(1, block.conv1.in_channels, 8, 8).relu()
                assert torch.allclose(block(x), x, atol=1e-6), f"{name}: block is not the identity"


def test_drop_path_rises_linearly_and_only_trains():
    model = create_model("resnet20", drop_path=0.2)
    rates = [b.drop_path.rate for s in model.stages for b in s]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.2)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_wrn_dropout_is_an_override():
    assert not any(isinstance(m, torch.nn.Dropout) for m in create_model("wrn16_4").modules())
    m = create_model("wrn16_4", dropout=0.3)
    drops = [x for x in m.modules() if isinstance(x, torch.nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)


def test_counting_a_model_touches_nothing():
    model = create_model("resnet18")  # training mode, real weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_params_macs(model) == counts("resnet18")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_params_macs(model, 112)[1] < counts("resnet18")[1] / 3


def test_create_model_builds_cifar_nets_of_other_depths_by_name():
    # The studies' CIFAR nets are trainable by name (`resnets train --model iresnet20_cifar`),
    # without being listed as papers' networks.
    from dataclasses import replace

    from resnets.models.cifar_depths import depth_spec

    ir = create_model("iresnet20_cifar", num_classes=100)
    assert ir.spec == replace(depth_spec("iresnet", 20), num_classes=100)
    assert (ir.spec.block, ir.spec.shortcut, ir.spec.depths, ir.spec.stem) == (
        "ibasic",
        "maxpool",
        (3, 3, 3),
        "cifar",
    )
    assert ir(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert create_model("preact_resnet56").spec.depths == (9, 9, 9)
    assert create_model("resnet32").spec == get_entry("resnet32").spec  # registered names win
    assert (
        create_model("resnet50_cifar").spec.stem == "cifar" and create_model("resnet50").spec.stem != "cifar"
    )
    assert not [n for n in list_models() if n.endswith("_cifar") and n.startswith("iresnet")]
    # A ResNet and a Res2Net that differ in the block only, at nearly the same cost.
    plain_b, r2 = create_model("resnet56_bottleneck_cifar"), create_model("res2net56_26w_4s_cifar")
    v2 = get_entry("preact_resnet164").spec
    assert plain_b.spec == replace(v2, block="bottleneck", depths=(6, 6, 6))
    assert r2.spec == replace(plain_b.spec, block="res2net", base_width=26, scale=4)
    n_plain, n_r2 = (sum(p.numel() for p in m.parameters()) for m in (plain_b, r2))
    assert (n_plain, n_r2) == (591322, 597792)
    assert r2(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert create_model("resnet164_bottleneck_cifar").spec.depths == (18, 18, 18)
    # not 6n+2, n < 1, an iResNet depth without the suffix (iresnet{d} are ImageNet names), a
    # bottleneck depth that is not 9n+2, a Res2Net of scale 1 (a bottleneck)
    for bad in (
        "resnet21",
        "resnet2_cifar",
        "iresnet20",
        "resnet21_bottleneck_cifar",
        "res2net2_26w_4s_cifar",
        "res2net56_26w_1s_cifar",
        "res2net56_0w_4s_cifar",
    ):
        with pytest.raises(UnknownModelError, match=f"unknown model '{bad}'"):
            create_model(bad)
