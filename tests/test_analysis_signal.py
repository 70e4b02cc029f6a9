"""The signal study records every block's output, in order, and shows iResNet's per-stage reset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from resnets import NetSpec, ResNet, create_model, get_entry, list_models
from resnets.analysis import signal
from resnets.analysis.common import (
    EXTRA_SPECS,
    StudyError,
    build_model,
    cifar_depth_name,
    cifar_depth_spec,
)
from resnets.analysis.signal_propagation import block_statistics, stage_ends, table
from resnets.registry import UnknownModelError

TINY = dict(widths=(8, 16), strides=(1, 2), stem="cifar", stem_width=8, num_classes=10)

list_models()  # imports every family module, which registers the blocks NetSpec names


@pytest.mark.parametrize("block,shortcut", [("basic", "A"), ("preact_basic", "B")])
def test_identity_blocks_leave_the_statistics_unchanged(block, shortcut):
    # zero_init_last makes every residual branch output 0: an identity block (v1: ReLU of a
    # non-negative input) returns its input, so its statistics equal the previous entry's.
    torch.manual_seed(0)
    model = ResNet(NetSpec(block, (3, 3), shortcut=shortcut, zero_init_last=True, **TINY)).train()
    st = block_statistics(model, torch.randn(8, 3, 16, 16))
    assert len(st["std"]) == 1 + 6 and st["stage"] == [-1, 0, 0, 0, 1, 1, 1]
    for k in (1, 2, 3, 5, 6):  # every block except the first of stage 2, which downsamples
        assert st["std"][k] == st["std"][k - 1] and st["mean"][k] == st["mean"][k - 1]
    assert st["std"][4] != st["std"][3]


def test_iresnet_end_blocks_renormalise_the_main_path():
    # The end block applies BN (batch statistics) and ReLU after the add: for a roughly Gaussian
    # sum, ReLU(N(0, 1)) has mean 1/sqrt(2 pi) and std sqrt(1/2 - 1/(2 pi)).
    torch.manual_seed(0)
    model = ResNet(NetSpec("ibasic", (4, 4), shortcut="maxpool", **TINY)).train()
    st = block_statistics(model, torch.randn(64, 3, 16, 16))
    for end in (4, 8):
        assert st["mean"][end] == pytest.approx(1 / math.sqrt(2 * math.pi), abs=0.05)
        assert st["std"][end] == pytest.approx(math.sqrt(0.5 - 1 / (2 * math.pi)), abs=0.05)
    # Inside a stage the un-normalised sum grows past that.
    assert st["std"][3] > 1.5 * st["std"][4]


def test_study_writes_numbers_and_figure(tmp_path):
    r = signal(["resnet20"], batch_size=4, out_dir=tmp_path)
    saved = json.loads((tmp_path / "signal.json").read_text())
    assert len(saved["models"]["resnet20"]["init"]["std"]) == 1 + 9
    assert saved["models"]["resnet20"]["init"]["std"] == pytest.approx(r["models"]["resnet20"]["init"]["std"])
    assert (tmp_path / "signal.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "family,depth,name",
    [("v1", 20, "resnet20"), ("v1", 56, "resnet56"), ("v1", 110, "resnet110"), ("v1", 1202, "resnet1202"),
     ("v2", 110, "preact_resnet110")],
)  # fmt: skip
def test_cifar_depth_spec_is_the_registered_net_at_its_depth(family, depth, name):
    assert cifar_depth_spec(family, depth) == get_entry(name).spec
    assert cifar_depth_name(family, depth) == name
    assert cifar_depth_spec(family, depth).depths == ((depth - 2) // 6,) * 3


def test_cifar_depth_spec_iresnet_110_is_the_study_net():
    assert cifar_depth_spec("iresnet", 110) == EXTRA_SPECS["iresnet110_cifar"]
    assert cifar_depth_name("iresnet", 110) == "iresnet110_cifar"
    spec = cifar_depth_spec("iresnet", 20)
    assert (spec.block, spec.shortcut, spec.depths, spec.widths) == (
        "ibasic",
        "maxpool",
        (3, 3, 3),
        (16, 32, 64),
    )


@pytest.mark.parametrize("depth", [21, 2, 0, -4, 19])
def test_a_depth_that_is_not_6n_plus_2_is_refused(depth):
    with pytest.raises(StudyError, match="6n\\+2"):
        cifar_depth_spec("v1", depth)
    with pytest.raises(StudyError, match="6n\\+2"):
        signal(depths=(20, depth))


def test_unknown_sweep_family_is_refused():
    with pytest.raises(StudyError, match="unknown family 'v3'"):
        cifar_depth_spec("v3", 20)


def test_build_model_builds_unregistered_sweep_depths_and_keeps_registered_names():
    deep = build_model("resnet218")
    with torch.device("meta"):  # ImageNet nets: structure only, no weights to initialise
        resnet50, iresnet50 = build_model("resnet50"), build_model("iresnet50")
    assert deep.spec == cifar_depth_spec("v1", 218) and deep.name == "resnet218"
    assert len(list(deep.stages[0])) == 36
    assert build_model("preact_resnet56").spec == cifar_depth_spec("v2", 56)
    assert build_model("iresnet20_cifar").spec == cifar_depth_spec("iresnet", 20)
    # Registered names come from the registry: the same spec and the same parameters.
    for name in ("resnet110", "preact_resnet110", "resnet56"):
        assert build_model(name).spec == create_model(name).spec
    n_params = sum(p.numel() for p in build_model("resnet56").parameters())
    assert n_params == sum(p.numel() for p in create_model("resnet56").parameters()) == 853_018
    # resnet50 is 6n+2 but the registry's ImageNet net; its CIFAR namesake needs the suffix.
    assert resnet50.spec == get_entry("resnet50").spec and resnet50.spec.block == "bottleneck"
    assert cifar_depth_name("v1", 50) == "resnet50_cifar"
    assert build_model("resnet50_cifar").spec == cifar_depth_spec("v1", 50)
    assert iresnet50.spec == get_entry("iresnet50").spec  # no suffix: the ImageNet iResNet
    with pytest.raises(UnknownModelError, match="did you mean"):
        build_model("resnet19")  # not 6n+2: still the registry's error


@pytest.fixture(scope="module")
def sweep():
    return signal(depths=(32, 20), batch_size=4, input_size=16)


def test_sweep_has_every_family_at_every_depth(sweep):
    assert sweep["depths"] == [20, 32]
    assert list(sweep["models"]) == [
        "resnet20", "resnet32", "preact_resnet20", "preact_resnet32", "iresnet20_cifar", "iresnet32_cifar",
    ]  # fmt: skip
    family = {"resnet": "resnet", "preact": "preact_resnet", "iresnet": "iresnet"}
    for name, e in sweep["models"].items():
        n = (e["depth"] - 2) // 6
        assert e["depth"] == int("".join(c for c in name if c.isdigit()))
        assert e["family"] == family[name.split("_")[0].rstrip("0123456789")]
        st = e["init"]
        assert len(st["std"]) == len(st["mean"]) == 1 + 3 * n
        assert st["stage"] == [-1] + [0] * n + [1] * n + [2] * n
        assert stage_ends(st) == [n, 2 * n, 3 * n]
        assert "trained" not in e


def test_sweep_iresnet_end_blocks_reset_the_main_path(sweep):
    # The end block is BN (batch statistics) then ReLU: the mean is that of ReLU(N(0, 1)),
    # 1/sqrt(2 pi) = 0.399. The std is a little above ReLU(N(0, 1))'s sqrt(1/2 - 1/(2 pi)) = 0.584
    # (0.60-0.64 here): the BN input is the residual plus a shortcut of non-negative (post-ReLU)
    # values, skewed to the right (skewness 0.2-0.4 at these depths, ~0 at 110 layers), so more
    # than half its unit variance lies above 0. The shorter the stage, the larger the shortcut's
    # share and the skew: 32 layers are closer to 0.584 than 20.
    ideal_mean, ideal_std = 1 / math.sqrt(2 * math.pi), math.sqrt(0.5 - 1 / (2 * math.pi))
    ends = {}
    for depth in (20, 32):
        st = sweep["models"][f"iresnet{depth}_cifar"]["init"]
        ends[depth] = [st["std"][k] for k in stage_ends(st)]
        for k in stage_ends(st):
            assert st["mean"][k] == pytest.approx(ideal_mean, abs=0.015)
            assert ideal_std < st["std"][k] < ideal_std + 0.07
            assert st["std"][k] < 0.6 * st["std"][k - 1]  # inside the stage the sum grew past it
    assert sum(ends[32]) < sum(ends[20])
    # v2 has no such reset: its main path grows through every stage, and with depth.
    v2 = {d: sweep["models"][f"preact_resnet{d}"]["init"] for d in (20, 32)}
    for st in v2.values():
        assert all(st["std"][k] > 2 * ideal_std for k in stage_ends(st))
    assert v2[32]["std"][-1] > v2[20]["std"][-1]


def test_sweep_table_has_depths_and_stage_ends(sweep):
    header, rows = table(sweep)
    assert header[:3] == ["model", "weights", "depth"] and "std at stage ends" in header
    row = rows[-1]
    st = sweep["models"]["iresnet32_cifar"]["init"]
    assert row[:3] == ["iresnet32_cifar", "init", "32"]
    assert row[header.index("std at stage ends")] == " / ".join(f"{st['std'][k]:.3g}" for k in (5, 10, 15))


def test_sweep_with_a_trained_checkpoint_and_models(tmp_path):
    from resnets.checkpoint import save_model_file

    torch.manual_seed(1)
    run = tmp_path / "run"
    run.mkdir()
    save_model_file(run / "model.safetensors", create_model("resnet20").eval(), {"mean": [0.5] * 3})
    named = tmp_path / "resnet20"  # a run folder named after its model: labelled "resnet20"
    named.mkdir()
    (named / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    r = signal(
        ["resnet20"],
        [str(run), str(named)],
        batch_size=2,
        input_size=16,
        depths=(20,),
        out_dir=tmp_path / "out",
    )
    # resnet20 named and in the sweep is measured once; the checkpoints come last, with their
    # depth, and the one labelled like a sweep net does not replace it.
    assert list(r["models"]) == [
        "resnet20", "preact_resnet20", "iresnet20_cifar", "resnet20 (run)", "resnet20 (checkpoint)",
    ]  # fmt: skip
    assert "checkpoint" not in r["models"]["resnet20"]
    assert r["models"]["resnet20 (checkpoint)"]["trained"] == r["models"]["resnet20 (run)"]["trained"]
    ckpt = r["models"]["resnet20 (run)"]
    assert ckpt["depth"] == 20 and ckpt["family"] == "resnet" and len(ckpt["trained"]["std"]) == 10
    # Same seed, same spec: the checkpoint's fresh net is the sweep's resnet20.
    assert ckpt["init"]["std"] == r["models"]["resnet20"]["init"]["std"]
    assert ckpt["trained"]["std"] != ckpt["init"]["std"]  # eval-mode BN with default running stats
    assert (tmp_path / "out" / "signal.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "out" / "signal.json").read_text())
    assert saved["depths"] == [20] and saved["models"]["resnet20 (run)"]["depth"] == 20


def test_without_depths_the_default_models_are_measured():
    r = signal(["resnet20"], batch_size=2, input_size=16)
    assert r["depths"] == [] and list(r["models"]) == ["resnet20"]
    assert r["models"]["resnet20"]["depth"] == 20
