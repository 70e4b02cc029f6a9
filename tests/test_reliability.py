"""A run survives kills, stop signals, non-finite losses and failing writes with nothing lost.

The subprocess tests run the real command line (`python -m resnets train`) on a small digit
subset in deterministic mode with one thread, and compare weights bit for bit with a run that
was never interrupted.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import resnets.checkpoint as checkpoint_mod
from resnets.checkpoint import load_checkpoint
from resnets.config import from_dict
from resnets.errors import CheckpointError, RunStopped, TrainingError
from resnets.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

# 256 images in steps of 32: 8 steps per epoch, a checkpoint every 2 steps.
RUN = dict(
    train_subset=256,
    test_subset=48,
    batch_size=32,
    epochs=3,
    warmup_epochs=0.5,
    lr=0.05,
    deterministic=True,
    quiet=True,
    ckpt_every=2,
)


def tiny(out, **kw):
    base = dict(train_subset=96, test_subset=48, batch_size=32, epochs=2, warmup_epochs=0.5, lr=0.05)
    return from_dict({**base, "quiet": True, "deterministic": True, "out": str(out), **kw})


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def epochs_in_metrics(run: Path) -> list[str]:
    return [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]


# --- in one process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run (in process)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(from_dict({**RUN, "out": str(out)}))
    return out


def test_sigterm_stops_after_the_step_and_the_resumed_run_is_bit_identical(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"

    def on_step(done):
        if done == 11:  # inside epoch 2, between two checkpoints (every 2 steps)
            # Twice at once, as a worker under torchrun gets Ctrl-C: still one graceful stop.
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunStopped) as info:
        train(from_dict({**RUN, "out": str(out)}), on_step=on_step)
    assert info.value.signum == signal.SIGTERM and info.value.out == str(out)
    assert "stopped by SIGTERM after step 12 (epoch 2, step 4 of 8)" in str(info.value)
    assert f"resnets train --out {out} --resume" in str(info.value)
    ckpt = load_checkpoint(out / "last.ckpt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (1, 12, 4)  # the step it was in finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are given back

    train(from_dict({"out": str(out), "resume": True, "quiet": True}))
    assert_same_weights(straight / "last.ckpt", out / "last.ckpt")
    assert epochs_in_metrics(out) == ["1", "2", "3"]
    a, b = (load_checkpoint(p / "last.ckpt")["metrics"] for p in (straight, out))
    # The epoch cut in two reports the same loss and accuracy as the whole one.
    for ra, rb in zip(a, b):
        assert (ra["train_loss"], ra["train_top1"], ra["test_top1"]) == (
            rb["train_loss"],
            rb["train_top1"],
            rb["test_top1"],
        )


def test_a_failing_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def after_epoch(row):
        if row["epoch"] == 1:  # from now on every write fails, as on a full disk
            monkeypatch.setattr(checkpoint_mod.os, "fsync", full_disk)

    with pytest.raises(
        CheckpointError,
        match=r"could not write .*last\.ckpt \(No space left on device\); the previous one is kept",
    ):
        train(tiny(out, epochs=2), callback=after_epoch)
    monkeypatch.undo()
    before = load_checkpoint(out / "last.ckpt")
    assert before["epoch"] == 1 and before["step"] == 3
    assert not list(out.glob(".*.tmp"))  # the half-written temporary file is gone


def _nan_at(calls: set[int]):
    """A criterion: the cross-entropy, but NaN on the given (1-based) calls."""
    count = [0]

    def cross_entropy(logits, y):
        count[0] += 1
        loss = F.cross_entropy(logits, y)
        return loss * float("nan") if count[0] in calls else loss

    return cross_entropy


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:  # 3 steps per epoch: step 5 is epoch 2, step 2
        train(tiny(out, epochs=3), criterion=_nan_at({5}))
    msg = str(info.value)
    assert "the training loss became nan at step 5 (epoch 2, step 2 of 3)" in msg
    assert "keeps the state after step 3" in msg and "--nonfinite skip" in msg
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_skip_leaves_out_the_bad_step_only(tmp_path):
    summary = train(tiny(tmp_path / "skip", epochs=2, nonfinite="skip"), criterion=_nan_at({5}))
    assert summary["skipped_steps"] == 1
    rows = load_checkpoint(tmp_path / "skip" / "last.ckpt")["metrics"]
    assert [r["skipped_steps"] for r in rows] == [0, 1]
    ckpt = load_checkpoint(tmp_path / "skip" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    for state in ckpt["optimizer"]["state"].values():
        assert torch.isfinite(state["momentum_buffer"]).all()
    # The first epoch, before the bad step, is exactly that of a clean run.
    clean = train(tiny(tmp_path / "clean", epochs=2), criterion=_nan_at(set()))
    clean_rows = load_checkpoint(tmp_path / "clean" / "last.ckpt")["metrics"]
    assert clean_rows[0]["train_loss"] == rows[0]["train_loss"]
    assert clean["skipped_steps"] == 0


def test_nonfinite_skip_still_stops_a_run_that_diverged(tmp_path):
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(tiny(tmp_path / "run", epochs=8, nonfinite="skip"), criterion=_nan_at(set(range(1, 1000))))


def test_batch_norm_on_a_single_value_is_a_config_error(tmp_path, capsys):
    from resnets.cli import main

    argv = ["train", "--model", "resnet18", "--batch-size", "1", "--train-subset", "4", "--epochs", "1"]
    assert main([*argv, "--warmup-epochs", "0", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resnet18 on a batch of 1 images of 32x32") and err.count("\n") == 1


# --- the real command line, killed -------------------------------------------------------------


def _cli(out: Path, *extra: str) -> list[str]:
    flags = []
    for k, v in RUN.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [flag, str(v)]
    return [sys.executable, "-m", "resnets", "train", *flags, "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def straight_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_cli") / "run"
    proc = subprocess.run(_cli(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _start(out: Path) -> subprocess.Popen:
    resume = ["--resume"] if (out / "last.ckpt").exists() else []
    # A resumed run takes its recipe from the checkpoint; only how-to-run flags are given again.
    again = ["--out", str(out), "--resume", "--quiet", "--ckpt-every", str(RUN["ckpt_every"])]
    cmd = [*_cli(out)[:4], *again] if resume else _cli(out)
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_new_checkpoint(proc: subprocess.Popen, path: Path, timeout: float = 120) -> bool:
    """True once `path` is (re)written by `proc`; False when `proc` ended first."""
    before = path.stat().st_mtime_ns if path.exists() else None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if path.exists() and path.stat().st_mtime_ns != before:
            return True
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def _kill_and_resume(out: Path, kills: int, seed: int) -> int:
    """Start, let it write a checkpoint, SIGKILL it a random moment later; `kills` times; then
    let the last start finish. Returns how many kills landed before the run ended."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(kills):
        proc = _start(out)
        if _wait_for_new_checkpoint(proc, out / "last.ckpt"):
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.kill()
                landed += 1
        proc.communicate(timeout=600)
        if proc.returncode == 0:
            return landed
    proc = _start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return landed


def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, straight_cli):
    out = tmp_path / "run"
    landed = _kill_and_resume(out, kills=2, seed=0)
    assert landed >= 1
    assert_same_weights(straight_cli / "last.ckpt", out / "last.ckpt")
    assert epochs_in_metrics(out) == ["1", "2", "3"]
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_many_random_moments(tmp_path, straight_cli, seed):
    out = tmp_path / "run"
    landed = _kill_and_resume(out, kills=6, seed=seed)
    assert landed >= 3
    assert_same_weights(straight_cli / "last.ckpt", out / "last.ckpt")
    assert epochs_in_metrics(out) == ["1", "2", "3"]


def test_sigint_from_the_command_line_says_how_to_resume(tmp_path, straight_cli):
    out = tmp_path / "run"
    proc = _start(out)
    assert _wait_for_new_checkpoint(proc, out / "last.ckpt")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "SIGINT: finishing this step and writing a checkpoint" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT after step ") and last.endswith(
        f"resnets train --out {out} --resume"
    )
    assert "Traceback" not in err
    proc = _start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert_same_weights(straight_cli / "last.ckpt", out / "last.ckpt")


def test_sigterm_stops_a_study_with_its_checkpoint_and_the_same_command_resumes(tmp_path, cifar_tree):
    """A study trains in process: SIGTERM (a time limit's `timeout`) stops its run after writing
    last.ckpt, the command says so in one line and exits 143, and the same command continues it."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "resnets", "analyze", "degradation", "--model", "resnet20"]
    cmd += ["--data-dir", str(cifar_tree), "--epochs", "200", "--train-subset", "0", "--test-subset", "0"]
    cmd += ["--batch-size", "10", "--out", str(out)]
    ckpt = out / "degradation_runs" / "resnet20" / "last.ckpt"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_new_checkpoint(proc, ckpt)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and last.endswith(
        "holds it. Run the same command again to continue."
    )
    assert "Traceback" not in err and ckpt.exists()
    step = int(last.split("after step ")[1].split()[0])
    assert step >= 3  # at least the first epoch's 3 steps
    again = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_new_checkpoint(again, ckpt)
    again.send_signal(signal.SIGTERM)
    out2, err2 = again.communicate(timeout=120)
    assert f"resuming after epoch {step // 3}" in out2 + err2, (out2 + err2)[-2000:]
