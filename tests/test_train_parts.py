"""The named parts of the training loop, each on its own: the training step, the run state a
checkpoint holds, the agreement between processes, the speed settings, the warm-up of short runs
and the TensorBoard log."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnets.runtime as runtime
from resnets.checkpoint import load_checkpoint
from resnets.cli import main
from resnets.config import COMPILE_MIN_STEPS, from_dict, load_config
from resnets.errors import CheckpointError, ConfigError
from resnets.train import EMA, RunState, Totals, TrainStep, agree, lr_at, train

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


# --- TrainStep ------------------------------------------------------------------------------------


def test_a_step_over_micro_batches_makes_the_update_of_the_whole_batch():
    # BN statistics differ per micro-batch, so compare on a net without BN.
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).double()

    x, y = batch(8)
    x = x.double()
    whole, split = net(), net()
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.1, momentum=0.9)
    opt_s = torch.optim.SGD(split.parameters(), lr=0.1, momentum=0.9)
    out_w = TrainStep(whole, opt_w)([(x, y)], lr=0.5)
    out_s = TrainStep(split, opt_s)([(x[:4], y[:4]), (x[4:], y[4:])], lr=0.5)
    assert out_w.finite and out_s.finite and out_w.signum == 0
    assert opt_w.param_groups[0]["lr"] == 0.5
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    tw, ts = out_w.totals.read(), out_s.totals.read()
    assert tw["seen"] == ts["seen"] == 8 and tw["correct"] == ts["correct"]
    assert tw["loss_sum"] == pytest.approx(ts["loss_sum"], rel=1e-12)
    assert tw["loss_sum"] / 8 == pytest.approx(F.cross_entropy(net()(x), y).item(), rel=1e-12)


def test_a_non_finite_step_leaves_weights_momentum_and_ema_untouched():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, 0.9)
    step = TrainStep(model, opt, ema=ema)
    x, y = batch()
    assert step([(x, y)], lr=0.1).finite  # one good step: momentum buffers exist now
    weights = copy.deepcopy(model.state_dict())
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    ema_weights = copy.deepcopy(ema.module.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    outcome = step([(bad, y)], lr=0.1, stop_signal=15)
    assert not outcome.finite and outcome.signum == 15
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # the forward pass itself updates BN statistics, as in any framework
        assert torch.equal(v, weights[k]), k
    for p, m in zip(model.parameters(), momentum):
        assert torch.equal(opt.state[p]["momentum_buffer"], m) and p.grad is None
    assert ema.updates == 1 and all(
        torch.equal(v, ema_weights[k]) for k, v in ema.module.state_dict().items()
    )


def test_a_step_under_bf16_autocast_computes_in_bf16_and_updates_fp32_weights():
    model = small_net()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    step = TrainStep(
        model, torch.optim.SGD(model.parameters(), lr=0.1), amp="bf16", memory_format=torch.channels_last
    )
    assert step([batch()], lr=0.1).finite
    assert seen == [torch.bfloat16] and all(p.dtype == torch.float32 for p in model.parameters())


def test_the_criterion_is_what_the_step_minimises():
    model = small_net()
    calls = []

    def criterion(logits, y):
        calls.append(logits.dtype)
        return F.cross_entropy(logits, y) * 0

    before = copy.deepcopy(model.state_dict())
    TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), criterion=criterion)([batch()], lr=1.0)
    assert calls == [torch.float32]
    assert torch.equal(model[5].weight, before["5.weight"])  # a zero loss moves nothing


# --- Totals, agree, RunState ----------------------------------------------------------------------


def test_totals_sum_by_name():
    t = Totals(torch.device("cpu"))
    t.add_batch(
        torch.tensor(2.0), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 0, 0])
    )
    t.count_skipped()
    assert t.read() == {"loss_sum": 6.0, "correct": 2.0, "seen": 3.0, "skipped": 1.0}
    u = Totals(torch.device("cpu"), [1.0, 1.0, 1.0, 0.0])
    u.add(t)
    assert u.read()["seen"] == 4.0


def test_agree_with_one_process_returns_the_flags():
    assert agree([0.0, 15.0], 1, torch.device("cpu")) == [0, 15]


def _state(seed: int) -> RunState:
    torch.manual_seed(seed)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, 0.99)
    TrainStep(model, opt, ema=ema)([batch(seed=seed)], lr=0.1)
    st = RunState(model, opt, torch.amp.GradScaler("cpu", enabled=False), ema, torch.device("cpu"))
    st.epoch, st.step, st.epoch_step, st.metrics = seed, 10 * seed, seed, [{"epoch": seed}]
    st.epoch_sums, st.epoch_train_s, st.train_time_s, st.time_s = [1.0, 2.0, 3.0, 0.0], 1.5, 2.5, 3.5
    return st


def test_run_state_restores_exactly_what_it_writes():
    a, b = _state(1), _state(2)
    written = a.state_dict()
    b.load_state_dict(copy.deepcopy(written))
    again = b.state_dict()
    assert written.keys() == again.keys()
    for key in written:
        if key in ("model", "ema"):
            assert all(torch.equal(written[key][k], again[key][k]) for k in written[key]), key
        elif key == "optimizer":
            for pa, pb in zip(written[key]["state"].values(), again[key]["state"].values()):
                assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
        elif key == "rng":
            assert torch.equal(written[key]["torch"], again[key]["torch"])
        else:
            assert written[key] == again[key], key
    assert b.ema.updates == a.ema.updates == 1 and b.epoch == 1 and b.metrics == [{"epoch": 1}]


def test_run_state_names_what_a_checkpoint_lacks():
    written = _state(1).state_dict()
    del written["epoch_sums"], written["rng"]
    with pytest.raises(CheckpointError, match="x.ckpt lacks rng, epoch_sums"):
        _state(2).load_state_dict(written, "x.ckpt")


# --- speed settings -------------------------------------------------------------------------------


def test_auto_speed_follows_the_hardware_and_the_run_length(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "compiler_available", lambda d: (True, "g++"))
    monkeypatch.setattr(runtime, "native_bf16", lambda d: (True, "CPU has AMX"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    long = runtime.choose_speed(from_dict({}), cpu, COMPILE_MIN_STEPS)
    assert (long.amp, long.channels_last, long.compile) == ("bf16", True, True)
    assert long.threads == torch.get_num_threads()
    assert "amp bf16 (CPU has AMX)" in long.line()
    assert f"{COMPILE_MIN_STEPS} steps >= " in long.line()
    short = runtime.choose_speed(from_dict({}), cpu, COMPILE_MIN_STEPS - 1)
    assert (
        not short.compile and short.why["compile"] == f"{COMPILE_MIN_STEPS - 1} steps < {COMPILE_MIN_STEPS}"
    )
    det = runtime.choose_speed(from_dict({"deterministic": True}), cpu, 10**6)
    assert not det.compile and det.why["compile"] == "deterministic run"
    monkeypatch.setattr(runtime, "native_bf16", lambda d: (False, "CPU has no native bf16"))
    monkeypatch.setattr(runtime, "compiler_available", lambda d: (False, "no C++ compiler"))
    plain = runtime.choose_speed(from_dict({}), cpu, 10**6)
    assert (plain.amp, plain.compile, plain.why["compile"]) == ("off", False, "no C++ compiler")
    # What is set explicitly is kept.
    given = runtime.choose_speed(
        from_dict({"amp": "bf16", "compile": "on", "channels_last": "off", "threads": 3}), cpu, 1
    )
    assert (given.amp, given.compile, given.channels_last, given.threads) == ("bf16", True, False, 3)
    assert given.why == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.choose_speed(from_dict({}), cpu, 1).threads == 1


def test_native_bf16_reads_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert runtime.native_bf16(torch.device("cpu")) == (True, "CPU has AVX-512 BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert runtime.native_bf16(torch.device("cpu")) == (False, "CPU has no native bf16")


def test_speed_flags_take_auto_on_off_and_recipes_may_write_booleans(tmp_path):
    from resnets.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--channels-last", "--no-compile", "--amp", "off"])
    assert (args.channels_last, args.compile, args.amp) == ("on", "off", "off")
    args = parser.parse_args(["train", "--compile", "auto", "--channels-last", "off"])
    assert (args.compile, args.channels_last) == ("auto", "off")
    recipe = tmp_path / "r.toml"
    recipe.write_text("channels_last = true\ncompile = false\n")
    cfg = load_config(recipe)
    assert (cfg.channels_last, cfg.compile, cfg.amp) == ("on", "off", "auto")
    with pytest.raises(ConfigError, match="compile must be one of auto, on, off"):
        from_dict({"compile": "fast"})


# --- short runs -----------------------------------------------------------------------------------


def test_an_unset_warm_up_scales_with_the_run():
    assert from_dict({}).warmup() == 3.0  # the default 12 epochs: a quarter
    assert from_dict({"epochs": 1}).warmup() == 0.25
    assert from_dict({"epochs": 100}).warmup() == 3.0
    assert from_dict({"epochs": 1, "warmup_epochs": 0.0}).warmup() == 0.0
    with pytest.raises(ConfigError, match=r"warmup_epochs \(3.0\) must be shorter than epochs \(1\)"):
        from_dict({"epochs": 1, "warmup_epochs": 3.0})
    # lr_at uses it: one epoch of 8 steps warms up over 2.
    cfg = from_dict({"epochs": 1, "lr": 1.0})
    assert [lr_at(s, cfg, 8) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])


def test_one_epoch_of_the_default_recipe_runs_and_records_its_choices(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--epochs",
        "1",
        "--train-subset",
        "128",
        "--test-subset",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    speed_line = next(line for line in printed.splitlines() if line.startswith("speed: "))
    summary = json.loads((out / "summary.json").read_text())
    recipe = tomllib.loads((out / "config.toml").read_text())
    speed = summary["speed"]
    assert recipe["amp"] == speed["amp"] in ("bf16", "off") and f"amp {speed['amp']}" in speed_line
    assert recipe["channels_last"] == "on" and recipe["compile"] == "off"  # 2 steps: too short to compile
    assert recipe["warmup_epochs"] == 0.25 and recipe["threads"] == speed["threads"] >= 1
    assert summary["first_step_s"] > 0 and summary["cpu"]
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["config"]["amp"] == speed["amp"] and ckpt["epoch"] == 1


def test_milestones_past_the_last_epoch_are_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "2", "--schedule", "step", "--milestones", "1,5", "--train-subset", "64"]
    argv += ["--test-subset", "16", "--warmup-epochs", "0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: milestones 5 lie at or past the last epoch (2)" in err


# --- TensorBoard ----------------------------------------------------------------------------------


def _tiny(out, **kw):
    base = dict(train_subset=96, test_subset=48, batch_size=32, epochs=2, lr=0.05, quiet=True)
    return from_dict({**base, "out": str(out), **kw})


def test_tensorboard_events_hold_the_metrics_of_each_epoch_and_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_tiny(out, tensorboard=True, log_every=1))
    events = list(out.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(out))
    acc.Reload()
    rows = load_checkpoint(out / "last.ckpt")["metrics"]
    top1 = acc.Scalars("epoch/test_top1")
    assert [e.step for e in top1] == [3, 6]  # against the optimizer step: 3 steps per epoch
    assert [e.value for e in acc.Scalars("epoch/epoch")] == [1, 2]
    assert [e.value for e in top1] == pytest.approx([r["test_top1"] for r in rows], abs=1e-6)
    losses = acc.Scalars("step/train_loss")
    assert [e.step for e in losses] == list(range(1, 7))  # 3 steps per epoch, a point every step
    assert all(0 < e.value < 10 for e in losses)
    assert len(acc.Scalars("step/images_per_s")) == 5 and len(acc.Scalars("step/lr")) == 6


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    argv = ["train", "--tensorboard", "--epochs", "1", "--train-subset", "64", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: --tensorboard needs the tensorboard package: pip install tensorboard\n"


def test_a_resumed_run_keeps_one_tensorboard_curve(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = _tiny(out, tensorboard=True, log_every=1, epochs=3, ckpt_every=4)

    class Crash(Exception):
        pass

    def crash(done):
        if done == 6:  # steps 1-5 are logged; the checkpoint holds step 4
            raise Crash

    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    assert load_checkpoint(out / "last.ckpt")["step"] == 4
    train(replace(cfg, resume=True))
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/test_top1")] == [3, 6, 9]
    # Step 5, logged by both lives, appears once: the second one's.
    assert [e.step for e in acc.Scalars("step/train_loss")] == list(range(1, 10))


# --- the run folder: checked before the first write, locked while a run uses it -----------------


def _snapshot(folder):
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


TINY_ARGS = ["--train-subset", "64", "--test-subset", "16", "--epochs", "1", "--quiet"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", str(2**40)], "seed must be in [0, 2**32 - 1]"),
        (["--lr", "1e308"], "lr must be a positive number of at most 1000"),
        (["--batch-size", "100000"], "batch_size 100000 is larger than the 64 training images"),
        (["--amp", "fp16", "--device", "cpu"], "amp fp16 needs a CUDA device"),
    ],
)
def test_a_refused_run_changes_nothing_on_disk(tmp_path, capsys, extra, message):
    done = tmp_path / "done"
    assert main(["train", *TINY_ARGS, "--out", str(done)]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    # The same folder again, and a new one: both refused, neither touched nor created.
    for out in (done, tmp_path / "new"):
        assert (
            main(["train", *TINY_ARGS, *extra, "--out", str(out), "--resume" if out == done else "--quiet"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert _snapshot(tmp_path) == before


def test_out_that_is_a_file_or_read_only_is_refused_before_anything_is_written(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert main(["train", *TINY_ARGS, "--out", str(f)]) == 2
    assert capsys.readouterr().err == f"error: --out {f} is a file, not a folder\n"
    assert main(["train", *TINY_ARGS, "--out", str(f / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and f.read_text() == "keep me"


def test_out_on_a_read_only_filesystem_is_refused(tmp_path, capsys):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
    ).returncode:
        pytest.skip("this machine does not let the tests mount a read-only tmpfs")
    try:
        assert main(["train", *TINY_ARGS, "--out", str(ro / "run")]) == 2
        assert (
            capsys.readouterr().err
            == f"error: --out {ro / 'run'}: cannot write in {ro} (read-only filesystem)\n"
        )
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_run_frees_it(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import time

    from resnets.train import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out):  # another run holds the folder
        assert main(["train", *TINY_ARGS, "--out", str(out)]) == 2
        assert "is in use by another resnets train run" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # the refused run wrote nothing
    # A process that holds the lock and is killed (no cleanup at all) leaves the folder free.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from resnets.train import FolderLock; import time\n"
            f"with FolderLock(__import__('pathlib').Path({str(out)!r})):\n print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match="in use"), FolderLock(out):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    assert main(["train", *TINY_ARGS, "--out", str(out)]) == 0
    assert (out / "summary.json").exists()


def test_a_signal_during_the_final_writes_lets_them_finish(tmp_path, capsys):
    import os
    import signal

    out = tmp_path / "run"

    def last_epoch(row):
        if row["epoch"] == 2:  # the checkpoint of the last epoch is on disk; the final files follow
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(_tiny(out), callback=last_epoch)
    assert summary["epochs"] == 2
    for name in ("model.safetensors", "summary.json", "curves.png", "metrics.csv", "last.ckpt"):
        assert (out / name).exists(), name
    assert (
        "SIGINT arrived during the final writes; they are done and the run is complete"
        in capsys.readouterr().err
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_recipe_paths_that_are_not_recipes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('model = "r\xe9sum\xe9"\n'.encode("latin-1"))
    for path, message in (
        (tmp_path, "is a folder, not a TOML file"),
        (bad, "is not valid TOML: it is not UTF-8 text"),
    ):
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "never").exists()


def test_a_model_option_the_network_does_not_use_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY_ARGS, "--dropout", "0.3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not use dropout=0.3" in err
    assert not (tmp_path / "r").exists()


def test_device_and_worker_values_are_checked_in_the_recipe():
    for device in ("cuda:abc", "cuda:", "gpu", "cuda:1:2"):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            from_dict({"device": device})
    assert from_dict({"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ConfigError, match="workers must be at most 256"):
        from_dict({"workers": 10**8})


def test_a_checkpoint_of_another_network_is_one_line():
    small = _state(1).state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(3, 4))
    st = RunState(
        other,
        torch.optim.SGD(other.parameters(), lr=0.1),
        torch.amp.GradScaler("cpu", enabled=False),
        None,
        torch.device("cpu"),
    )
    with pytest.raises(CheckpointError, match=r"^x.ckpt: its model state does not fit this run"):
        st.load_state_dict(small, "x.ckpt")


def test_progress_bar_on_a_terminal_and_epoch_lines_only_in_a_log(tmp_path, capsys, monkeypatch):
    args = ["train", "--train-subset", "64", "--test-subset", "16", "--epochs", "1", "--batch-size", "32"]
    assert main([*args, "--out", str(tmp_path / "log")]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1  train loss" in captured.out and "it/s" not in captured.err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*args, "--out", str(tmp_path / "tty")]) == 0
    captured = capsys.readouterr()
    assert "2/2 [" in captured.err  # tqdm's bar: steps done / steps of the epoch
    assert "train loss" not in captured.out  # the bar's last state shows the epoch instead
