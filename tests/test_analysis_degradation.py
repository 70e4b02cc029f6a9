"""The degradation study: one recipe for every net, curves read back from the runs, the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resnets.analysis import StudyError
from resnets.analysis.degradation_curves import FULL, degradation, paper_lr, verdict

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
