"""ResNeXt's three equivalent forms (Xie et al. 2017, Fig. 3): same weights, same function."""

from __future__ import annotations

import pytest
import torch
from model_checks import randomise_bn

from resnets import count_params_macs, create_model
from resnets.models.resnext import FORMS, ResNeXtPaths, convert_form

# (name, overrides, input size): the ImageNet net whole, ResNeXt-29 with one block per stage.
NETS = [("resnext50_32x4d", {}, 64), ("resnext29_8x64d", dict(depths=(1, 1, 1)), 32)]


@pytest.mark.parametrize(("name", "overrides", "size"), NETS)
def test_converted_weights_give_identical_outputs(name, overrides, size):
    torch.manual_seed(0)
    ref = create_model(name, **overrides).double().eval()
    randomise_bn(ref)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        expected = ref(x)
    for form in ("a", "b"):
        model = create_model(name, resnext_form=form, **overrides).double().eval()
        model.load_state_dict(convert_form(weights, ref.spec, form))  # strict: every key
        with torch.no_grad():
            assert torch.allclose(model(x), expected, rtol=0, atol=1e-10), form
        # Training mode: BN normalises per channel, so per path, with the same batch statistics.
        ref.load_state_dict(weights)
        model.train(), ref.train()
        assert torch.allclose(model(x), ref(x), rtol=0, atol=1e-10), form
        ref.eval()


@pytest.mark.parametrize(("name", "overrides", "size"), NETS)
def test_forms_convert_into_each_other_exactly(name, overrides, size):
    torch.manual_seed(0)
    sds = {f: create_model(name, resnext_form=f, **overrides).state_dict() for f in FORMS}
    spec = create_model(name, **overrides).spec
    for src in FORMS:
        for dst in FORMS:
            out = convert_form(sds[src], spec, dst)
            assert out.keys() == sds[dst].keys() and all(out[k].shape == sds[dst][k].shape for k in out)
        back = convert_form(convert_form(sds[src], spec, "a" if src != "a" else "b"), spec, src)
        assert all(torch.equal(back[k], v) for k, v in sds[src].items())


def test_forms_have_the_same_parameters_and_macs():
    counts = {
        f: count_params_macs(create_model("resnext29_8x64d", depths=(1, 1, 1), resnext_form=f)) for f in FORMS
    }
    assert len(set(counts.values())) == 1, counts


def test_forms_a_and_b_hold_c_paths_of_width_d():
    for form in ("a", "b"):
        block = create_model("resnext50_32x4d", resnext_form=form).stages[0][0]
        assert isinstance(block, ResNeXtPaths) and len(block.paths) == 32
        path = block.paths[0]
        assert path.conv1.out_channels == 4 and path.conv2.groups == 1 and path.conv2.out_channels == 4
        if form == "a":  # each path ends in its own 1x1 to the block width; their outputs are summed
            assert path.conv3.in_channels == 4 and path.conv3.out_channels == 256 and block.conv3 is None
        else:  # the paths are concatenated (128 channels) and share one 1x1
            assert path.conv3 is None and block.conv3.in_channels == 128
    c = create_model("resnext50_32x4d").stages[0][0]
    assert c.conv2.groups == 32 and c.conv2.in_channels == 128


def test_bad_forms_are_refused():
    with pytest.raises(ValueError, match="unknown resnext_form 'd' \\(expected c, a, b\\)"):
        create_model("resnext50_32x4d", resnext_form="d")
    with pytest.raises(ValueError, match="block 'res2net' does not use resnext_form="):
        create_model("res2next50", resnext_form="a")
    with pytest.raises(ValueError, match="not 'basic'"):
        convert_form({}, create_model("resnet18").spec, "a")
