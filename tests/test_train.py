"""The training loop end to end on tiny digit subsets: files written, resume, CLI errors, eval."""

import csv
import json
import sys
import time
from dataclasses import replace

import pytest
import torch

from resnets.checkpoint import load_model_file
from resnets.cli import main
from resnets.config import TrainConfig, from_dict
from resnets.errors import ConfigError, DataError, TrainingError
from resnets.evaluate import evaluate_file
from resnets.train import METRIC_COLUMNS, train

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def tiny(out, **kw) -> TrainConfig:
    base = dict(
        train_subset=96,
        test_subset=48,
        batch_size=32,
        epochs=2,
        warmup_epochs=0.5,
        lr=0.05,
        quiet=True,
        out=str(out),
    )
    return from_dict({**base, **kw})


def test_tiny_run_writes_every_file_with_consistent_contents(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.toml",
        "curves.png",
        "last.ckpt",
        "metrics.csv",
        "model.safetensors",
        "summary.json",
    ]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS and [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert 0 <= float(r["test_top1"]) <= float(r["test_top5"]) <= 1
        assert float(r["train_loss"]) > 0 and float(r["images_per_s"]) > 0
    assert float(rows[0]["time_s"]) < float(rows[1]["time_s"])
    # One-cycle: 3 steps per epoch, warm-up round(1.5) = 2 steps, then a line from the peak to 0 over
    # 4 steps; the last step (5) is 3/4 of the way down.
    assert float(rows[0]["lr"]) == pytest.approx(0.05 * (1 - 0 / 4), rel=1e-6)
    assert float(rows[1]["lr"]) == pytest.approx(0.05 * (1 - 3 / 4), rel=1e-6)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["model"] == "resnet20" and on_disk["data"] == "digits" and on_disk["epochs"] == 2
    assert on_disk["test_top1"] == float(rows[1]["test_top1"])
    assert on_disk["best_test_top1"] == max(float(r["test_top1"]) for r in rows)
    assert on_disk["train_loss"] == float(rows[1]["train_loss"])
    assert on_disk["time_s"] == float(rows[1]["time_s"]) and on_disk["train_images_per_s"] > 0

    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["epochs"] == 2 and cfg["flip"] is False  # resolved: digits are not flipped
    assert "out" not in cfg and cfg["resume"] is False  # reusable as a recipe for a new run
    assert from_dict(cfg).train_subset == 96

    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["model_name"] == "resnet20"
    assert ckpt["spec"]["in_chans"] == 1 and ckpt["spec"]["num_classes"] == 10
    assert len(ckpt["metrics"]) == 2 and ckpt["config"]["lr"] == 0.05

    from_ckpt, _ = load_model_file(out / "last.ckpt")
    from_st, meta = load_model_file(out / "model.safetensors")
    assert meta["model"] == "resnet20" and meta["data"] == "digits" and meta["spec"]["depths"] == [3, 3, 3]
    assert from_st.spec == from_ckpt.spec and from_st.spec.in_chans == 1
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_ckpt(x), from_st(x))
    # Re-evaluating the saved weights reproduces the run's last test accuracy.
    again = evaluate_file(str(out / "model.safetensors"))
    assert again["n"] == 360  # the whole held-out set: evaluate_file does not know the subset
    sub = evaluate_file(str(out / "last.ckpt"), tta=False)
    assert sub["test_top1"] == again["test_top1"]


def test_resume_gives_bit_identical_weights(tmp_path):
    cfg = dict(
        deterministic=True,
        epochs=3,
        ema_decay=0.9,
        label_smoothing=0.1,
        accum_steps=2,
        cutout=8,
        drop_path=0.1,
    )
    train(tiny(tmp_path / "straight", **cfg))

    class Crash(Exception):
        pass

    def crash_after_first_epoch(row):
        if row["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        train(tiny(tmp_path / "resumed", **cfg), callback=crash_after_first_epoch)
    assert torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["epoch"] == 1
    # Resuming needs only the folder: the recipe comes from the checkpoint.
    train(from_dict({"out": str(tmp_path / "resumed"), "resume": True, "quiet": True}))

    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    strip = [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in a["metrics"]]
    assert strip == [
        {k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in b["metrics"]
    ]
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_resume_keeps_the_runs_data_place_and_run_settings(tmp_path, cifar_tree, monkeypatch):
    """`resnets train --out RUN --resume` (the line a stopped run prints) needs no other flag:
    the data come from the run's own data_dir while it exists (from the flag once it moved), and
    its checkpoint cadence and bad-step policy stay what they were."""
    kw = dict(data="cifar10", data_dir=str(cifar_tree), download=False, train_subset=0, test_subset=0)
    kw.update(batch_size=10, epochs=2, warmup_epochs=0, ckpt_every=2, nonfinite="skip")

    class Crash(Exception):
        pass

    def crash(row):
        raise Crash

    for run in ("r", "s"):
        with pytest.raises(Crash):
            train(tiny(tmp_path / run, **kw), callback=crash)
    monkeypatch.chdir(tmp_path)  # the default data_dir ("data") holds nothing here
    resume = {"resume": True, "quiet": True, "download": False}
    summary = train(from_dict({"out": str(tmp_path / "r"), **resume}))
    assert summary["epochs"] == 2
    with open(tmp_path / "r" / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    config = (tmp_path / "r" / "config.toml").read_text()
    assert f'data_dir = "{cifar_tree}"' in config
    assert "ckpt_every = 2\n" in config and 'nonfinite = "skip"' in config

    # Moved: the old place is gone, so the default is looked at, then the place given.
    moved = cifar_tree.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="cifar10 is not in data"):
        train(from_dict({"out": str(tmp_path / "s"), **resume}))
    train(from_dict({"out": str(tmp_path / "s"), "data_dir": str(moved), "ckpt_every": 3, **resume}))
    config = (tmp_path / "s" / "config.toml").read_text()
    assert f'data_dir = "{moved}"' in config and "ckpt_every = 3\n" in config  # given: changed


def test_explicit_out_holding_a_run_needs_resume(tmp_path):
    train(tiny(tmp_path / "r", epochs=1, warmup_epochs=0))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(tmp_path / "r", epochs=1, warmup_epochs=0))
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny(tmp_path / "empty", resume=True))


def test_default_out_is_numbered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        cfg = replace(tiny(None, epochs=1, warmup_epochs=0, train_subset=32, test_subset=16), out=None)
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["resnet20-digits", "resnet20-digits-2"]


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="loss became nan"):
        train(
            tiny(tmp_path / "nan", epochs=1, warmup_epochs=0),
            criterion=lambda logits, y: torch.nn.functional.cross_entropy(logits, y) * float("nan"),
        )
    assert not (tmp_path / "nan" / "last.ckpt").exists()  # no good epoch: nothing to keep


def test_folder_data_trains_end_to_end(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (40 + i, 36), colour).save(tmp_path / "imgs" / split / c / f"{i}.png")
    cfg = dict(data=f"folder:{tmp_path / 'imgs'}", image_size=32, workers=0, train_subset=0, test_subset=0)
    summary = train(tiny(tmp_path / "run", **cfg, batch_size=8, epochs=2, lr=0.05))
    assert summary["data"].startswith("folder:") and 0 <= summary["test_top1"] <= 1
    _, meta = load_model_file(tmp_path / "run" / "model.safetensors")
    assert meta["image_size"] == 32 and meta["classes"] == ["blue", "red"]


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--epochs", "-3"], "epochs must be at least 1, got -3"),
        (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["--epochs", "ten"], "invalid int value: 'ten'"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
        (["--milestones", "3,x"], "invalid integer list value"),
        (["--resume", "--lr", "0.1"], "--lr cannot change it"),
        (
            ["--amp", "fp16", "--device", "cpu", "--epochs", "1", "--warmup-epochs", "0"],
            "fp16 needs a CUDA device",
        ),
    ],
)
def test_cli_mistakes_are_one_error_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_recipe_errors(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("epochs = 2\nbatch_sise = 64\n")
    assert main(["train", "--config", str(recipe)]) == 2
    assert "unknown key 'batch_sise'" in capsys.readouterr().err
    recipe.write_text('epochs = "2"\n')
    assert main(["train", "--config", str(recipe)]) == 2
    assert "epochs must be an integer, got '2'" in capsys.readouterr().err


def test_cli_flags_override_the_recipe_and_eval_reads_the_run(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "epochs = 5\nbatch_size = 64\ntrain_subset = 64\ntest_subset = 32\nwarmup_epochs = 0.0\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(recipe),
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "2 steps of 32" in printed  # 64 images / 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert main(["eval", "--checkpoint", str(out / "model.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"test_top1", "test_top5", "test_loss"} and result["n"] == 360
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(tmp_path / "junk.ckpt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_default_run_reaches_95_percent_on_held_out_digits(tmp_path):
    """`resnets train` with no arguments: >= 95% on the held-out digits in under two minutes."""
    t = time.perf_counter()
    summary = train(replace(TrainConfig(), out=str(tmp_path / "default"), quiet=True))
    elapsed = time.perf_counter() - t
    assert summary["test_top1"] >= 0.95, summary
    assert elapsed < 120, f"took {elapsed:.0f} s (a busy machine can also cause this)"
