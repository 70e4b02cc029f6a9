"""The degradation study: one recipe for every net, curves read back from the runs, the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resnets.analysis import StudyError
from resnets.analysis.degradation_curves import FULL, degradation, paper_lr, plot, steps_per_epoch, verdict

DATA = Path("data/cifar10-jpeg")


def test_verdict_compares_the_deepest_with_the_shallowest_of_each_family():
    models = {
        "plain20": {"family": "plain", "final_train_err": 0.30},
        "plain56": {"family": "plain", "final_train_err": 0.40},
        "plain110": {"family": "plain", "final_train_err": 0.35},
        "resnet20": {"family": "resnet", "final_train_err": 0.30},
        "resnet56": {"family": "resnet", "final_train_err": 0.20},
        "resnet50": {"family": "iresnet", "final_train_err": 0.1},  # alone in its family: no verdict
    }
    v = verdict({"models": models})
    assert set(v) == {"plain", "resnet"}
    assert v["plain"]["shallow"] == "plain20" and v["plain"]["deep"] == "plain110"  # by depth, not name order
    assert v["plain"]["deeper_trains_worse"] and v["plain"]["train_err_gap"] == pytest.approx(0.05)
    assert not v["resnet"]["deeper_trains_worse"] and v["resnet"]["train_err_gap"] == pytest.approx(-0.1)


def test_learning_rate_is_the_papers_per_image():
    assert paper_lr(128) == 0.1 and paper_lr(32) == pytest.approx(0.025)
    assert FULL["batch_size"] == 128 and FULL["milestones"] == (82, 123) and "lr" not in FULL


def test_figure_counts_iterations_as_fig_6_does():
    """Fig. 6's x axis is iterations: the figure gives them on top of the epochs, at the trainer's
    steps per epoch (the last partial batch dropped: 50,000 // 128 = 390)."""
    assert steps_per_epoch({"train_subset": 0, "batch_size": 128}) == 390
    assert steps_per_epoch({"train_subset": 512, "batch_size": 32}) == 16
    recipe = {"train_subset": 0, "batch_size": 128, "lr": 0.1, "schedule": "constant"}
    e = {"family": "resnet", "epochs": [1, 2], "train_err": [0.5, 0.4], "test_err": [0.6, 0.5]}
    fig = plot({"recipe": recipe, "models": {"resnet20": e}})
    (top,) = fig.axes[0].child_axes
    assert "iterations (thousands, batch 128)" in top.get_xlabel()
    fig.canvas.draw()  # the top axis' limits are the epochs' limits in thousands of steps
    assert top.get_xlim() == pytest.approx(tuple(0.39 * x for x in fig.axes[0].get_xlim()))


@pytest.mark.skipif(not DATA.exists(), reason="CIFAR-10 image tree not extracted into data/cifar10-jpeg")
def test_tiny_run_is_read_back_and_reused(tmp_path):
    small = dict(epochs=1, train_subset=64, test_subset=32, batch_size=32)
    r = degradation(["resnet20"], DATA, overrides=small, out_dir=tmp_path)
    e = r["models"]["resnet20"]
    metrics = (tmp_path / "degradation_runs" / "resnet20" / "metrics.csv").read_text().splitlines()
    train_top1 = float(metrics[1].split(",")[2])
    assert e["epochs"] == [1] and e["final_train_err"] == pytest.approx(1 - train_top1)
    # The paper's 0.1 per 128 images, at this batch of 32.
    assert json.loads((tmp_path / "degradation.json").read_text())["recipe"]["lr"] == pytest.approx(0.025)
    # The same recipe again reads the finished run instead of training it twice ...
    again = degradation(["resnet20"], DATA, overrides=small, out_dir=tmp_path)
    assert again["models"]["resnet20"]["final_train_loss"] == e["final_train_loss"]
    # ... and another recipe does not overwrite or mix with it.
    with pytest.raises(StudyError, match="another recipe.*lr"):
        degradation(["resnet20"], DATA, overrides=small | {"lr": 0.05}, out_dir=tmp_path)


def test_seeds_are_studies_of_their_own_combined_by_mean_and_range(tmp_path, cifar_tree):
    from resnets.analysis.degradation_curves import degradation_seeds, table

    small = dict(epochs=2, train_subset=0, test_subset=0, batch_size=10)
    r = degradation_seeds(
        ["resnet20", "resnet32"], cifar_tree, overrides=small, seeds=[0, 1], out_dir=tmp_path
    )
    one = [json.loads((tmp_path / f"seed_{s}" / "degradation.json").read_text()) for s in (0, 1)]
    for name in ("resnet20", "resnet32"):
        e = r["models"][name]
        finals = [o["models"][name]["final_train_err"] for o in one]
        assert e["final_train_err_seeds"] == finals and e["final_train_err"] == pytest.approx(sum(finals) / 2)
        assert e["train_err"][0] == pytest.approx(
            (one[0]["models"][name]["train_err"][0] + one[1]["models"][name]["train_err"][0]) / 2
        )
        assert len(e["test_err_seeds"]) == 2 and e["epochs"] == [1, 2]
    assert finals[0] != finals[1]  # the seeds are different runs
    v = r["verdict"]["resnet"]
    gaps = [o["verdict"]["resnet"]["train_err_gap"] for o in one]
    assert v["train_err_gap_seeds"] == gaps and v["train_err_gap"] == pytest.approx(sum(gaps) / 2)
    assert v["all_seeds_agree"] == all((g > 0) == (sum(gaps) > 0) for g in gaps)
    saved = json.loads((tmp_path / "degradation.json").read_text())
    assert saved["seeds"] == [0, 1] and (tmp_path / "degradation.png").stat().st_size > 0
    header, rows = table(r)
    assert (
        rows[0][2]
        == f"{100 * r['models']['resnet20']['final_train_err']:.1f} ({100 * one[0]['models']['resnet20']['final_train_err']:.1f}, {100 * one[1]['models']['resnet20']['final_train_err']:.1f})"
    )


def test_command_line_fixes_the_precision_of_new_runs_and_checks_old_ones(tmp_path, cifar_tree, capsys):
    """`--amp off` trains in fp32 whatever the hardware has, so nets added to a study later match
    the numerics of the runs read back; a run of the other precision is refused, not mixed in."""
    from resnets.cli import main

    argv = ["analyze", "degradation", "--model", "resnet20", "--data-dir", str(cifar_tree)]
    argv += ["--epochs", "1", "--train-subset", "0", "--test-subset", "0", "--batch-size", "10"]
    argv += ["--out", str(tmp_path)]
    assert main([*argv, "--amp", "off"]) == 0
    config = (tmp_path / "degradation_runs" / "resnet20" / "config.toml").read_text()
    assert 'amp = "off"' in config
    assert main([*argv, "--amp", "bf16"]) == 2
    assert "another recipe (amp differ)" in capsys.readouterr().err
    assert main(argv) == 0  # auto accepts what the run resolved


@pytest.mark.parametrize("seeds", [None, [0, 1]])
def test_a_misspelt_model_is_refused_before_any_net_trains(tmp_path, cifar_tree, seeds):
    from resnets.analysis.degradation_curves import degradation_seeds
    from resnets.registry import UnknownModelError

    small = dict(epochs=1, train_subset=32, test_subset=32, batch_size=32)
    with pytest.raises(UnknownModelError, match="resnt56.*did you mean"):
        if seeds is None:
            degradation(["resnet20", "resnt56"], cifar_tree, overrides=small, out_dir=tmp_path)
        else:
            degradation_seeds(
                ["resnet20", "resnt56"], cifar_tree, overrides=small, seeds=seeds, out_dir=tmp_path
            )
    assert not list(tmp_path.rglob("metrics.csv"))  # resnet20 was not trained first
