"""Trained ablations: the paper's pairs, the seed-noise screen, the runs behind them, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resnets import create_model
from resnets.analysis import StudyError
from resnets.analysis.ablation import (
    RECIPE,
    ablation,
    claims,
    compare,
    recipe_for,
    spearman,
    summarise,
    verdict,
)
from resnets.checkpoint import load_model_file

pytestmark = pytest.mark.usefixtures("one_thread")


def test_full_schedule_warms_up_the_110_layer_nets_as_the_paper_does():
    """He et al. 2015 start ResNet-110 gently (lr 0.01 for about 400 iterations); the full
    schedule gives nets of 110 layers and more a 1-epoch warm-up and shallower nets none, while a
    short run warms up over a tenth of itself and an explicit warm-up always wins."""
    deep, shallow = recipe_for("resnet110", full=True), recipe_for("resnet20", full=True)
    assert deep["warmup_epochs"] == 1.0 and shallow["warmup_epochs"] == 0.0
    assert deep["epochs"] == 164 and deep["milestones"] == (82, 123) and deep["lr"] == 0.1
    assert recipe_for("preact_resnet164", full=True)["warmup_epochs"] == 1.0
    assert recipe_for("resnet110")["warmup_epochs"] == 1.0 and recipe_for(
        "resnet110", overrides={"epochs": 5}
    )["warmup_epochs"] == pytest.approx(0.5)
    assert recipe_for("resnet110", full=True, overrides={"warmup_epochs": 0.0})["warmup_epochs"] == 0.0


def test_units_claims_are_every_pair_of_table_2_in_the_papers_order():
    pairs = claims("units")
    assert len(pairs) == 10  # 5 units, every pair differs in the paper
    assert ("full_preact", "original") in pairs and ("original", "bn_after_add") in pairs
    assert ("relu_only_preact", "relu_before_add") in pairs and ("bn_after_add", "original") not in pairs
    assert claims("shortcut") == [("maxpool", "projection")]


def test_compare_screens_differences_by_their_standard_error():
    a = summarise([0.10, 0.11, 0.12])  # mean 0.11, s.d. 0.01
    b = summarise([0.14, 0.15, 0.16])  # mean 0.15
    c = summarise([0.09, 0.12, 0.15])  # mean 0.12, s.d. 0.03
    assert a["mean_test_err"] == pytest.approx(0.11) and a["std_test_err"] == pytest.approx(0.01)
    ab = compare(a, b)
    assert ab["holds"] and ab["diff"] == pytest.approx(0.04)
    assert ab["se"] == pytest.approx((2 * 0.01**2 / 3) ** 0.5) and ab["beyond_noise"]
    ac = compare(a, c)  # 0.01 apart, se 0.018: within the noise
    assert ac["holds"] and not ac["beyond_noise"]
    assert not compare(b, a)["holds"] and compare(b, a)["beyond_noise"]  # contradicted, clearly
    one = summarise([0.10])
    assert one["std_test_err"] == 0.0 and not compare(one, summarise([0.5]))["beyond_noise"]


def test_verdict_counts_agreement_and_ranks_against_the_paper():
    means = {"x": [0.10, 0.10], "y": [0.20, 0.21], "z": [0.15, 0.30]}
    result = {
        "variants": {k: summarise(v) for k, v in means.items()},
        "paper": {"x": 5.0, "y": 7.0, "z": 6.0},
    }
    v = verdict(result, [("x", "y"), ("z", "y"), ("y", "x")])
    assert v["of"] == 3 and v["agree"] == 1  # x < y holds; z (0.225) < y (0.205) and y < x do not
    assert v["agree_beyond_noise"] == 1 and v["contradict_beyond_noise"] == 1  # x < y; y < x contradicted
    assert v["spearman_vs_paper"] == pytest.approx(0.5)  # ranks (0, 1, 2) vs (0, 2, 1)


def test_spearman_is_one_for_the_same_order_and_averages_ties():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.866, abs=1e-3)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_recipe_is_the_papers_optimiser():
    assert RECIPE["lr"] == 0.1 and RECIPE["batch_size"] == 128 and RECIPE["weight_decay"] == 1e-4
    assert RECIPE["label_smoothing"] == 0.0 and not RECIPE["nesterov"] and RECIPE["wd_norm_bias"]


def test_tiny_units_ablation_trains_each_variant_and_seed_and_resumes(tmp_path, cifar_tree):
    small = dict(epochs=1, batch_size=10, warmup_epochs=0.0)
    kw = dict(model="resnet20", data_dir=cifar_tree, overrides=small)
    r = ablation("units", seeds=[0, 1], variants=["original", "full_preact"], out_dir=tmp_path / "o", **kw)
    assert list(r["variants"]) == ["original", "full_preact"] and r["seeds"] == [0, 1]
    for label, e in r["variants"].items():
        assert set(e["runs"]) == {"0", "1"} and e["n"] == 2
        errs = [run["final_test_err"] for run in e["runs"].values()]
        assert e["mean_test_err"] == pytest.approx(sum(errs) / 2)
        # The run's model is the variant: its stored spec has the unit, and it rebuilds from the file.
        run = Path(e["runs"]["0"]["run"])
        model, meta = load_model_file(run / "model.safetensors")
        assert model.spec.unit == label and meta["spec"]["unit"] == label
        assert "unit = " + json.dumps(label) in (run / "config.toml").read_text()
    a, b = (r["variants"][k]["runs"]["0"]["final_train_loss"] for k in ("original", "full_preact"))
    assert a != b  # different networks, not the same one twice
    saved = json.loads((tmp_path / "o" / "ablation_units.json").read_text())
    assert saved["paper"] == {"original": 6.61, "full_preact": 6.37}
    assert saved["verdict"]["of"] == 1 and (tmp_path / "o" / "ablation_units.png").stat().st_size > 0
    # Again: the finished runs are read, not retrained or resumed (their last.ckpt is still there,
    # and nothing in the run folder is rewritten); another recipe is refused, not mixed in.
    run1 = Path(r["variants"]["original"]["runs"]["1"]["run"])
    assert (run1 / "last.ckpt").exists()
    stamps = {f.name: f.stat().st_mtime_ns for f in run1.iterdir()}
    again = ablation(
        "units", seeds=[0, 1], variants=["original", "full_preact"], out_dir=tmp_path / "o", **kw
    )
    assert again["variants"]["original"]["runs"]["1"] == r["variants"]["original"]["runs"]["1"]
    assert {f.name: f.stat().st_mtime_ns for f in run1.iterdir()} == stamps
    with pytest.raises(StudyError, match="another recipe.*epochs"):
        ablation(
            "units",
            seeds=[0],
            variants=["original"],
            out_dir=tmp_path / "o",
            **(kw | {"overrides": small | {"epochs": 2}}),
        )
    # Only the small files a results folder keeps (no checkpoint, no weights): read back, not
    # retrained, so a study can be finished on another machine.
    kept = tmp_path / "kept" / "ablation_runs" / "units" / "original_s0"
    kept.mkdir(parents=True)
    for name in ("config.toml", "metrics.csv", "summary.json"):
        (kept / name).write_bytes((Path(r["variants"]["original"]["runs"]["0"]["run"]) / name).read_bytes())
    back = ablation("units", seeds=[0], variants=["original"], out_dir=tmp_path / "kept", **kw)
    assert (
        back["variants"]["original"]["runs"]["0"]["final_test_err"]
        == r["variants"]["original"]["runs"]["0"]["final_test_err"]
    )
    assert sorted(p.name for p in kept.iterdir()) == ["config.toml", "metrics.csv", "summary.json"]
    with pytest.raises(StudyError, match="another recipe.*epochs"):
        ablation(
            "units",
            seeds=[0],
            variants=["original"],
            out_dir=tmp_path / "kept",
            **(kw | {"overrides": small | {"epochs": 2}}),
        )
    (kept / "metrics.csv").write_text((kept / "metrics.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(StudyError, match="0 of 1 epochs and no last.ckpt"):
        ablation("units", seeds=[0], variants=["original"], out_dir=tmp_path / "kept", **kw)


def test_shortcut_variants_are_the_projection_and_the_max_pool():
    from resnets.analysis.ablation import STUDIES

    field, values, paper, _ = STUDIES["shortcut"]
    assert field == "shortcut" and paper is None
    b, m = (create_model("resnet20", shortcut=values[k]) for k in ("projection", "maxpool"))
    # The same parameters: the max-pool only changes which positions the 1x1 reads.
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in m.parameters())
    assert b.spec.shortcut == "B" and m.spec.shortcut == "maxpool"


@pytest.mark.parametrize(
    "study, variants, needle",
    [("nope", None, "unknown ablation"), ("units", ["sideways"], "unknown units variant 'sideways'")],
)
def test_mistakes_are_study_errors(tmp_path, study, variants, needle):
    with pytest.raises(StudyError, match=needle):
        ablation(study, variants=variants, out_dir=tmp_path)
    with pytest.raises(StudyError, match="at least one seed"):
        ablation("units", seeds=[], out_dir=tmp_path)


def test_command_line_runs_the_study(tmp_path, cifar_tree):
    from resnets.cli import main

    argv = ["analyze", "ablation", "shortcut", "--seeds", "3", "--epochs", "1", "--batch-size", "10"]
    argv += ["--data-dir", str(cifar_tree), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "o" / "ablation_shortcut.json").read_text())
    assert list(saved["variants"]) == ["projection", "maxpool"] and saved["seeds"] == [3]
    assert saved["recipe"]["epochs"] == 1 and saved["recipe"]["batch_size"] == 10
