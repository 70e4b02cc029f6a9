"""Two CPU processes (gloo) under torchrun against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

COMMON = dict(
    train_subset=64,
    test_subset=40,
    batch_size=16,
    epochs=2,
    warmup_epochs=0.0,
    lr=0.05,
    deterministic=True,
    quiet=True,
)


def _flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def _run(cmd: list[str], out) -> str:
    # One thread per process on both sides: a different thread count changes the order of float
    # sums inside the kernels, and a few steps of SGD turn that into visibly different weights.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, *_flags(COMMON), "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    printed = _run([*torchrun, "-m", "resnets", "train"], tmp_path / "ddp")
    assert printed.count("2 x cpu") == 1  # only rank 0 prints (and writes)
    # One process, the global batch of 16 cut into the same two micro-batches of 8 that the two
    # ranks see: the gradients, hence the weights, must agree.
    _run([sys.executable, "-m", "resnets", "train", "--accum-steps", "2"], tmp_path / "single")

    ddp, single = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ddp", "single"))
    a, b = (torch.load(tmp_path / d / "last.ckpt", weights_only=True) for d in ("ddp", "single"))
    assert a["step"] == b["step"] == 8
    params = [k for k in b["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 50
    for k in params:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    # The training loss is summed over both ranks, and the test set is split over them and summed back.
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    # BN running statistics differ (each rank keeps those of its own half batch), so the test
    # numbers agree only roughly.
    assert ddp["test_top1"] == pytest.approx(single["test_top1"], abs=0.1)


@pytest.mark.slow
def test_torchrun_restarts_a_dead_rank_and_the_run_resumes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, "-m", "resnets", "train"], tmp_path / "straight")
    script = os.path.join(os.path.dirname(__file__), "ddp_die_once.py")
    printed = _run([*torchrun, "--max-restarts", "1", script], tmp_path / "restarted")
    assert "resuming after epoch 1" in printed  # the second attempt went on from the checkpoint
    with open(tmp_path / "restarted" / "metrics.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2"]
    a, b = (torch.load(tmp_path / d / "last.ckpt", weights_only=True) for d in ("straight", "restarted"))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
