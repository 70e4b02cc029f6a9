"""The block contract: a spec asks only for what its block builds, and each family's block says
which NetSpec fields it reads."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from resnets import NetSpec, create_model
from resnets.models.layers import SqueezeExcite
from resnets.models.net import BLOCKS, COMMON_FIELDS, Block
from resnets.registry import FAMILIES, get_entry

# A value away from the default for every field a block may or may not use (and a second one for
# a network that already has the first).
PROBES = {
    "groups": (2, 4),
    "base_width": (32, 48),
    "scale": (4, 2),
    "stride_in_1x1": (True,),
    "se_ratio": (1 / 16, 1 / 8),
    "dropout": (0.3,),
    "official_quirks": (False,),
    "unit": ("bn_after_add",),
    "resnext_form": ("a",),
}


def test_every_optional_field_has_a_probe():
    optional = {f.name for f in fields(NetSpec)} - COMMON_FIELDS
    assert optional == set(PROBES)


def test_every_block_follows_the_contract():
    for name, cls in BLOCKS.items():
        assert issubclass(cls, Block) and cls.block_name == name
        assert cls.uses <= set(PROBES), f"{name} declares a field NetSpec does not have"
        assert cls.zero_init_last is not Block.zero_init_last and cls.fold_pairs is not Block.fold_pairs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_unused_field_is_refused_naming_field_and_block(family):
    name = FAMILIES[family].example
    spec = get_entry(name).spec
    block = spec.block
    uses = BLOCKS[block].uses
    with torch.device("meta"):  # builds without allocating weights
        default = repr(create_model(name))
    for field, values in PROBES.items():
        value = next(v for v in values if v != getattr(spec, field))
        if field in uses:
            with torch.device("meta"):
                changed = repr(create_model(name, **{field: value}))
            # A used field must change what is built (official_quirks changes only the forward
            # pass: tests/test_iresnet.py checks it).
            assert field == "official_quirks" or changed != default, f"{block} ignores {field}"
        else:
            with pytest.raises(ValueError, match=rf"{name}.*block '{block}' does not use {field}="):
                create_model(name, **{field: value})


@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("resnet18", dict(groups=32)),
        ("resnet50", dict(dropout=0.3)),
        ("preact_resnet50", dict(stride_in_1x1=True)),
        ("wrn28_10", dict(se_ratio=0.25)),
        ("iresnet50", dict(scale=4)),
    ],
)
def test_overrides_that_built_the_default_network_are_refused(name, override):
    with pytest.raises(ValueError, match=f"does not use {next(iter(override))}"):
        create_model(name, **override)


def test_se_on_a_basic_block_builds_se():
    model = create_model("resnet18", se_ratio=1 / 16)
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 8 and se[-1].fc1.out_channels == 32  # 512 / 16


def test_unsupported_shortcut_is_refused():
    with pytest.raises(ValueError, match="block 'ibottleneck' does not support shortcut='none'"):
        create_model("iresnet50", shortcut="none")
    with pytest.raises(ValueError, match="does not support shortcut='Z' \\(supported: A, B"):
        create_model("resnet18", shortcut="Z")


def _preact_transition(shortcut: str):
    torch.manual_seed(0)
    model = create_model("preact_resnet110", shortcut=shortcut).eval()
    block = model.stages[1][0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        branch = block.branch(torch.relu(block.bn1(x)))
        return model, block, x, branch, block(x)


def test_preact_option_a_pads_the_block_input():
    model, block, x, branch, out = _preact_transition("A")
    padded = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16))
    assert torch.allclose(out, branch + padded, atol=1e-6)
    assert not any(".shortcut." in k for k, _ in model.named_parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_preact_without_shortcut_is_a_plain_net():
    model, block, x, branch, out = _preact_transition("none")
    assert torch.equal(out, branch)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
