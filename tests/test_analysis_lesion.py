"""Lesions remove exactly the residual branch; a block whose branch is zero changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resnets import NetSpec, ResNet, create_model, list_models
from resnets.analysis import StudyError, lesion
from resnets.analysis.lesioning import branch_shortcut_ratios, lesion_accuracies, lesioned

TINY = dict(widths=(8, 16), strides=(1, 2), stem="cifar", stem_width=8, num_classes=3)
DATA = Path("data/cifar10-jpeg")

list_models()  # imports every family module, which registers the blocks NetSpec names


def _batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(n)
    ]


def _tiny(block: str = "basic", shortcut: str = "A", depth: int = 3) -> ResNet:
    torch.manual_seed(0)
    model = ResNet(NetSpec(block, (depth, depth), shortcut=shortcut, **TINY)).eval()
    with torch.no_grad():  # non-trivial BN statistics, as in a trained net
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_lesioning_a_zeroed_branch_changes_nothing():
    model = _tiny()
    zeroed = model.stages[0][1]
    zeroed.zero_init_last()  # BN weight 0 ...
    torch.nn.init.zeros_(zeroed.bn2.bias)  # ... and bias 0: the branch outputs exactly 0
    x = _batches(1)[0][0]
    with torch.no_grad():
        intact = model(x)
        with lesioned(zeroed):
            assert torch.equal(model(x), intact)
        with lesioned(model.stages[0][2]):  # a block with a live branch does change the output
            assert not torch.allclose(model(x), intact)
        assert torch.equal(model(x), intact)  # the lesion is undone on leaving the context
    base, per_block = lesion_accuracies(model, _batches())
    assert per_block["0.1"] == base
    assert list(per_block) == ["0.0", "0.1", "0.2", "1.0", "1.1", "1.2"]
    ratios = branch_shortcut_ratios(model, _batches())
    assert ratios["0.1"] == 0.0 and all(v > 0 for k, v in ratios.items() if k != "0.1")


@pytest.mark.parametrize(
    "block,shortcut",
    [("basic", "A"), ("bottleneck", "B"), ("preact_basic", "B"), ("res2net", "B"), ("ibasic", "maxpool")],
)
def test_a_lesioned_identity_block_passes_its_input_through(block, shortcut):
    # Block 0.2 has an identity shortcut in every family (iResNet: a middle block; its block 0.1
    # carries the official code's ReLU on the shortcut, and 0.3 is an end block with BN after
    # the add). v1-style blocks end in ReLU, which leaves their non-negative input unchanged.
    model = _tiny(block, shortcut, depth=4)
    seen = {}
    target = model.stages[0][2]
    handle = target.register_forward_hook(lambda _m, args, out: seen.update(x=args[0].clone(), y=out.clone()))
    with torch.no_grad(), lesioned(target):
        model(_batches(1)[0][0])
    handle.remove()
    assert torch.equal(seen["y"], seen["x"])


def test_ratio_uses_the_input_when_preact_blocks_skip_the_shortcut_module():
    # A pre-activation identity block adds its input without calling `shortcut`; the ratio must
    # still be branch / input, computed here by hand.
    model = _tiny("preact_basic", "B")
    x = _batches(1)[0][0]
    block = model.stages[0][1]
    rec = {}
    # Norms taken at once: the block may add its input into the branch tensor in place.
    h1 = block.register_forward_pre_hook(lambda _m, args: rec.update(x=args[0].flatten(1).norm(dim=1)))
    h2 = block.drop_path.register_forward_hook(lambda _m, _i, out: rec.update(b=out.flatten(1).norm(dim=1)))
    with torch.no_grad():
        model(x)
    h1.remove()
    h2.remove()
    expected = (rec["b"] / rec["x"]).mean()
    got = branch_shortcut_ratios(model, [(x, None)])["0.1"]
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_plain_nets_have_nothing_to_lesion():
    model = create_model("plain20").eval()
    with pytest.raises(StudyError, match="no residual block"):
        lesion_accuracies(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(StudyError, match="only a block with a shortcut"):
        with lesioned(model.stages[0][0]):
            pass


@pytest.mark.skipif(not DATA.exists(), reason="CIFAR-10 image tree not extracted into data/cifar10-jpeg")
def test_study_on_a_saved_model(tmp_path):
    from resnets.checkpoint import save_model_file

    torch.manual_seed(0)
    model = create_model("resnet20", zero_init_last=True).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_model_file(run / "model.safetensors", model, {"mean": [0.5] * 3, "std": [0.25] * 3})
    r = lesion(run, DATA, num_test=40, out_dir=tmp_path / "out")
    # Every branch starts at zero (zero_init_last, BN bias 0): no lesion changes anything.
    assert r["num_test"] == 40 and len(r["blocks"]) == 9
    assert all(b["drop"] == 0 and b["branch_shortcut_ratio"] == 0 for b in r["blocks"].values())
    assert (tmp_path / "out" / "lesion.png").exists()
