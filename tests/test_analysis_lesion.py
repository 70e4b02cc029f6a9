"""Lesions remove exactly the residual branch; a block whose branch is zero changes nothing."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from resnets import NetSpec, ResNet, create_model, list_models
from resnets.analysis import StudyError, lesion
from resnets.analysis.lesioning import (
    accuracy,
    branch_shortcut_ratios,
    identity_blocks,
    lesion_accuracies,
    lesion_k,
    lesioned,
    plot,
    table,
)

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
    r = lesion(run, DATA, num_test=40, out_dir=tmp_path / "out", max_removed=3, samples=5)
    # Every branch starts at zero (zero_init_last, BN bias 0): no lesion changes anything.
    assert r["num_test"] == 40 and len(r["blocks"]) == 9
    assert all(b["drop"] == 0 and b["branch_shortcut_ratio"] == 0 for b in r["blocks"].values())
    assert (tmp_path / "out" / "lesion.png").exists()
    # Nor does removing several at once; resnet20 has 9 blocks, 2 of them downsampling.
    assert r["identity_blocks"] == 7 and list(r["removed"]) == ["1", "2", "3"]
    assert [r["removed"][k]["count"] for k in ("1", "2", "3")] == [5, 5, 5]
    assert all(a == r["accuracy"] for k in r["removed"].values() for a in k["accuracies"])


# --- k blocks removed at once (Veit et al. 2016, Fig. 5) ----------------------------------------


def _zero_branch(block) -> None:
    """Make a basic block's residual branch output exactly 0 (last BN weight and bias 0)."""
    block.zero_init_last()
    torch.nn.init.zeros_(block.bn2.bias)


ALL4 = [f"{s}.{i}" for s in range(2) for i in range(4)]  # blocks of a (4, 4) net


def test_removing_any_k_zero_branches_changes_nothing():
    model = _tiny()
    for _label, block in identity_blocks(model):
        _zero_branch(block)
    batches = _batches()
    base = accuracy(model, batches)
    removed = lesion_k(model, batches, max_removed=5, samples=20)
    assert list(removed) == ["1", "2", "3", "4", "5"]  # 5 identity blocks: k stops there
    assert [r["count"] for r in removed.values()] == [5, 10, 10, 5, 1]
    for r in removed.values():
        assert r["accuracies"] == [base] * r["count"]
        assert r["mean"] == r["min"] == r["max"] == base and r["std"] == 0
    # Only the identity blocks were zeroed: the downsampling block's branch is still live.
    with torch.no_grad():
        intact = model(batches[0][0])
        with lesioned(model.stages[1][0]):
            assert not torch.allclose(model(batches[0][0]), intact)


@pytest.mark.parametrize(
    "block,shortcut,widths,downsampling",
    # Stage 1's first block halves the size; with widths 32, 64 block 0.0 also widens the stem's 8
    # channels (a projection), with 8, 16 it keeps them (an identity).
    [("basic", "A", (8, 16), {"1.0"}), ("bottleneck", "B", (32, 64), {"0.0", "1.0"})],
)
def test_subsets_are_distinct_identity_blocks_only(block, shortcut, widths, downsampling):
    model = ResNet(NetSpec(block, (4, 4), shortcut=shortcut, **{**TINY, "widths": widths})).eval()
    expected = [b for b in ALL4 if b not in downsampling]
    assert [label for label, _ in identity_blocks(model)] == expected
    n, samples = len(expected), 12
    removed = lesion_k(model, _batches(1), max_removed=4, samples=samples, seed=3)
    assert list(removed) == ["1", "2", "3", "4"]
    for k, r in ((int(k), r) for k, r in removed.items()):
        subsets = [tuple(s) for s in r["subsets"]]
        assert r["count"] == len(subsets) == len(r["accuracies"]) == min(samples, math.comb(n, k))
        assert len(set(subsets)) == len(subsets)  # distinct subsets ...
        assert all(len(set(s)) == k and set(s) <= set(expected) for s in subsets)  # ... of k blocks
        if math.comb(n, k) <= samples:  # all of them, in itertools.combinations order
            assert subsets == list(itertools.combinations(expected, k))
        accs = r["accuracies"]
        assert r["mean"] == pytest.approx(statistics.fmean(accs))
        assert r["std"] == pytest.approx(statistics.pstdev(accs))
        assert (r["min"], r["max"]) == (min(accs), max(accs))


def test_the_seed_fixes_the_subsets():
    model = _tiny(depth=4)  # 7 identity blocks: C(7, 2) = 21 and C(7, 3) = 35 > 5 samples
    batches = _batches(1)
    first = lesion_k(model, batches, max_removed=3, samples=5, seed=1)
    assert lesion_k(model, batches, max_removed=3, samples=5, seed=1) == first
    other = lesion_k(model, batches, max_removed=3, samples=5, seed=2)
    assert other["2"]["subsets"] != first["2"]["subsets"]
    assert other["3"]["subsets"] != first["3"]["subsets"]


def test_removing_two_blocks_equals_zeroing_both_branches_by_hand():
    model = _tiny()
    x = _batches(1)[0][0]
    by_hand = copy.deepcopy(model)
    _zero_branch(by_hand.stages[0][1])
    _zero_branch(by_hand.stages[1][2])
    with torch.no_grad():
        intact = model(x)
        with contextlib.ExitStack() as stack:
            stack.enter_context(lesioned(model.stages[0][1]))
            stack.enter_context(lesioned(model.stages[1][2]))
            both = model(x)
        assert torch.equal(both, by_hand(x)) and not torch.allclose(both, intact)
        assert torch.equal(model(x), intact)  # both lesions undone
    # lesion_k's accuracy for every pair is that of the net with the pair zeroed by hand.
    batches = _batches()
    blocks = dict(identity_blocks(model))
    pairs = lesion_k(model, batches, max_removed=2, samples=20)["2"]
    assert pairs["count"] == 10
    for subset, acc in zip(pairs["subsets"], pairs["accuracies"]):
        zeroed = copy.deepcopy(model)
        zeroed_blocks = dict(identity_blocks(zeroed))
        for label in subset:
            assert label in blocks
            _zero_branch(zeroed_blocks[label])
        assert accuracy(zeroed, batches) == acc


def test_bad_counts_and_nets_without_identity_blocks():
    model = _tiny()
    with pytest.raises(StudyError, match="max_removed must be >= 0"):
        lesion_k(model, _batches(1), max_removed=-1)
    with pytest.raises(StudyError, match="samples must be a positive integer"):
        lesion_k(model, _batches(1), samples=0)
    assert lesion_k(model, _batches(1), max_removed=0) == {}
    every_projection = _tiny("basic", "C")  # option C projects on every shortcut
    assert identity_blocks(every_projection) == []
    with pytest.raises(StudyError, match="no block with an identity shortcut"):
        lesion_k(every_projection, _batches(1))


def _fake_run(monkeypatch, model: ResNet, n: int = 48):
    """Let `lesion` read `model` and n random images instead of a checkpoint and CIFAR-10."""
    from resnets.analysis import inputs
    from resnets.analysis.inputs import LoadedModel

    gen = torch.Generator().manual_seed(0)
    data = SimpleNamespace(
        test_x=torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen),
        test_y=torch.randint(0, 3, (n,), generator=gen),
        num_test=n,
    )
    loaded = LoadedModel(model, "tiny", "fake/run", (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(inputs, "load_checkpoint_model", lambda _path: loaded)
    monkeypatch.setattr(inputs, "load_cifar_test", lambda _dir, _n: data)


def test_study_result_table_and_figure(monkeypatch, tmp_path):
    _fake_run(monkeypatch, _tiny(depth=4))
    r = lesion("fake/run", max_removed=2, samples=4, seed=0, out_dir=tmp_path)
    assert {"model", "family", "checkpoint", "num_test", "accuracy", "blocks", "median_drop"} <= set(r)
    assert len(r["blocks"]) == 8 and r["identity_blocks"] == 7
    assert [(k, v["count"]) for k, v in r["removed"].items()] == [("1", 4), ("2", 4)]
    assert (
        json.loads((tmp_path / "lesion.json").read_text())["removed"]["2"]["subsets"]
        == r["removed"]["2"]["subsets"]
    )
    header, rows = table(r)
    assert len(header) == 4 and all(len(row) == 4 for row in rows)
    assert rows[-3:-2] == [["k of 7 identity", "mean +- std %", "min %", "max %"]]
    two = r["removed"]["2"]
    assert rows[-1] == [
        "2 at once (4 subsets)",
        f"{100 * two['mean']:.2f} +- {100 * two['std']:.2f}",
        f"{100 * two['min']:.2f}",
        f"{100 * two['max']:.2f}",
    ]
    fig = plot(r)
    third = fig.axes[2]
    assert len(fig.axes) == 3 and third.get_ylabel() == "test accuracy (%)"
    assert "4 subsets per k" in third.get_title() and "7 identity-shortcut blocks only" in third.get_title()
    assert [t.get_text() for t in third.get_xticklabels()] == ["0\n(intact)", "1", "2"]
    dots = [c for c in third.collections if c.get_label() == "one subset"]
    assert len(dots) == 1 and len(dots[0].get_offsets()) == 4  # k = 1's subsets

    skipped = lesion("fake/run", max_removed=0)
    assert skipped["removed"] == {} and skipped["blocks"] == r["blocks"]
    assert len(table(skipped)[1]) == 1 + 8 and len(plot(skipped).axes) == 2


def test_cli_flags_reach_the_study(monkeypatch, tmp_path, capsys):
    from resnets.analysis import lesioning
    from resnets.cli import main

    seen = []
    real = lesioning.lesion
    monkeypatch.setattr(lesioning, "lesion", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    _fake_run(monkeypatch, _tiny(depth=4))
    argv = ["analyze", "lesion", "--checkpoint", "fake/run", "--out", str(tmp_path)]
    assert main([*argv, "--max-removed", "2", "--samples", "3", "--seed", "5"]) == 0
    assert {k: seen[-1][k] for k in ("max_removed", "samples", "seed")} == {
        "max_removed": 2,
        "samples": 3,
        "seed": 5,
    }
    saved = json.loads((tmp_path / "lesion.json").read_text())
    assert saved["seed"] == 5 and [v["count"] for v in saved["removed"].values()] == [3, 3]
    assert "2 at once (3 subsets)" in capsys.readouterr().out
    assert main(argv) == 0
    assert {k: seen[-1][k] for k in ("max_removed", "samples", "seed")} == {
        "max_removed": 3,
        "samples": 20,
        "seed": 0,
    }
    for flag, value in (("--max-removed", "-1"), ("--samples", "0")):
        capsys.readouterr()
        assert main([*argv, flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and flag in err and len(err.strip().splitlines()) == 1


def test_comparing_two_nets_lines_up_their_lesions(monkeypatch, tmp_path, capsys):
    from resnets.analysis import inputs
    from resnets.analysis.inputs import LoadedModel
    from resnets.analysis.lesioning import _drop_profile, lesion_compare
    from resnets.cli import main

    _fake_run(monkeypatch, _tiny(depth=2))  # the test images; the models come from the map below
    models = {"shallow": _tiny(depth=2), "deep": _tiny(depth=4)}
    monkeypatch.setattr(
        inputs,
        "load_checkpoint_model",
        lambda path: LoadedModel(models[path], path, path, (0.5,) * 3, (0.25,) * 3),
    )
    with pytest.raises(StudyError, match="at least two"):
        lesion_compare(["deep"])
    r = lesion_compare(["shallow", "deep"], max_removed=2, samples=3, out_dir=tmp_path)
    assert [n["model"] for n in r["nets"]] == ["shallow", "deep"]
    # Each net's numbers are those of a lesion study of it alone.
    alone = lesion("deep", max_removed=2, samples=3)
    assert r["nets"][1]["blocks"] == alone["blocks"] and r["nets"][1]["removed"] == alone["removed"]
    assert [len(n["blocks"]) for n in r["nets"]] == [4, 8]
    xs, drops = _drop_profile(r["nets"][1])
    assert drops == sorted((100 * b["drop"] for b in alone["blocks"].values()), reverse=True)
    assert xs == [(i + 0.5) / 8 for i in range(8)]
    header, rows = table(r)
    assert header[-2:] == ["1 removed %", "2 removed %"]
    assert rows[1][:3] == ["deep", "8", f"{100 * alone['accuracy']:.2f}"]
    two = alone["removed"]["2"]
    assert rows[1][-1] == f"{100 * two['mean']:.1f} +- {100 * two['std']:.1f}"
    saved = json.loads((tmp_path / "lesion.json").read_text())
    assert [n["median_drop"] for n in saved["nets"]] == [n["median_drop"] for n in r["nets"]]
    assert (tmp_path / "lesion.png").stat().st_size > 0
    # The command line takes several checkpoints and prints one row per net.
    out = tmp_path / "cli"
    argv = ["analyze", "lesion", "--checkpoint", "shallow", "deep", "--max-removed", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "shallow" in printed and "deep" in printed and "1 removed %" in printed
    assert len(json.loads((out / "lesion.json").read_text())["nets"]) == 2
