"""The residual units of He et al. 2016 (Fig. 4, Table 2) as `unit=` on the CIFAR ResNets."""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import randomise_bn
from torch.nn.functional import relu

from resnets import create_model
from resnets.deploy import fold_batchnorm
from resnets.models.preact_resnet import UNIT_ERRORS

UNITS = list(UNIT_ERRORS)


def _conv_bn(block, i):
    return getattr(block, f"conv{i}"), getattr(block, f"bn{i}")


def paper_unit(unit: str, b, x: torch.Tensor) -> torch.Tensor:
    """Each unit of Fig. 4 written out from the figure, with the block's own layers."""
    (c1, n1), (c2, n2) = _conv_bn(b, 1), _conv_bn(b, 2)
    sc = b.shortcut(x)
    if unit == "original":  # (a) conv, BN, ReLU, conv, BN; add; ReLU
        return relu(n2(c2(relu(n1(c1(x))))) + sc)
    if unit == "bn_after_add":  # (b) conv, BN, ReLU, conv; add; BN, ReLU
        return relu(n2(c2(relu(n1(c1(x)))) + sc))
    if unit == "relu_before_add":  # (c) conv, BN, ReLU, conv, BN, ReLU; add
        return relu(n2(c2(relu(n1(c1(x)))))) + sc
    if unit == "relu_only_preact":  # (d) ReLU, conv, BN, ReLU, conv, BN; add
        return n2(c2(relu(n1(c1(relu(x)))))) + sc
    # (e) BN, ReLU, conv, BN, ReLU, conv; add. Here bn1 normalises the input and bn2 follows conv1.
    return c2(relu(n2(c1(relu(n1(x)))))) + sc


def eval_model(unit: str):
    """resnet20 with the unit, in eval mode, with random BN statistics (so BN is not the identity)."""
    torch.manual_seed(0)
    model = create_model("resnet20", unit=unit).eval()
    randomise_bn(model)
    return model


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_computes_what_the_figure_draws(unit):
    model = eval_model(unit)
    for block, ch in ((model.stages[1][0], 16), (model.stages[1][1], 32)):  # option A pad, identity
        x = torch.randn(2, ch, 8, 8)
        with torch.no_grad():
            assert torch.allclose(block(x), paper_unit(unit, block, x), atol=1e-5), unit
    # Guard against a formula test that cannot tell units apart.
    block = model.stages[1][1]
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        others = [u for u in UNITS if u != unit and (u == "full_preact") == (unit == "full_preact")]
        assert all(not torch.allclose(block(x), paper_unit(u, block, x), atol=1e-3) for u in others)


def test_where_relu_sits_after_the_add():
    # A unit output is ReLU'd after the add only in (a) and (b); in (c)-(e) a signed input
    # reaches the output through the identity, so it can go negative.
    x = torch.randn(1, 16, 8, 8)
    for unit in UNITS:
        model = eval_model(unit)
        with torch.no_grad():
            out = model.stages[0][1](x)
        assert bool((out >= 0).all()) == (unit in ("original", "bn_after_add")), unit


def test_stem_and_head_follow_the_unit():
    for unit in UNITS:
        m = create_model("resnet20", unit=unit)
        preact = unit == "full_preact"
        assert (m.stem.bn is None) == preact
        assert (m.head.norm is not None) == preact
        assert (m.head.act is not None) == (unit in ("full_preact", "relu_only_preact"))


@pytest.mark.parametrize("name", ["resnet20", "resnet110"])
def test_units_have_equal_parameter_counts(name):
    # Table 2 compares the units at one size (ResNet-110, 1.7M): moving BN and ReLU adds nothing.
    # For full pre-activation the stem BN and the smaller first BN of each transition block
    # (in_ch instead of out_ch) exactly pay for the head BN: 2*(16 + 16 + 32) = 2*64.
    counts = {u: sum(p.numel() for p in create_model(name, unit=u).parameters()) for u in UNITS}
    assert len(set(counts.values())) == 1, counts


def test_every_unit_trains():
    for unit in UNITS:
        torch.manual_seed(0)
        model = create_model("resnet20", unit=unit, zero_init_last=True)
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        assert all(p.grad is not None for p in model.parameters()), unit


def test_bad_units_are_refused():
    with pytest.raises(ValueError, match="unknown unit 'preact'.*original, bn_after_add"):
        create_model("resnet110", unit="preact")
    with pytest.raises(ValueError, match="block 'preact_basic' does not use unit="):
        create_model("preact_resnet110", unit="bn_after_add")
    with pytest.raises(ValueError, match="has no SE"):
        create_model("resnet110", unit="bn_after_add", se_ratio=0.25)
    with pytest.raises(ValueError, match="shortcut='none'"):
        create_model("plain20", unit="relu_before_add")


def test_folding_batchnorm_keeps_every_unit_exact():
    x = torch.randn(2, 3, 32, 32)
    for unit in UNITS:
        model = eval_model(unit)
        folded = copy.deepcopy(model)
        n = fold_batchnorm(folded)
        # Stem + 2 per block; bn_after_add's second BN reads the sum and full pre-activation's first
        # BN the block input (and its stem has none): those stay.
        assert n == {"bn_after_add": 10, "full_preact": 9}.get(unit, 19), unit
        with torch.no_grad():
            assert torch.allclose(folded(x), model(x), atol=1e-4), unit
