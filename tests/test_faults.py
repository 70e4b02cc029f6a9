"""Writes under real I/O faults: a full filesystem, a read-only one, a folder whose files cannot be
deleted, a writer killed mid-write; and, where a fault cannot be made real, a failure injected at
each call a write makes. Whatever fails, the error is one line and the previous file is kept.

The real faults need `mount` (root, or a container that allows it); without it those tests are
skipped with the reason, and the injected ones still run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_checks import assert_one_error_line, run_cli, snapshot

import resnets.checkpoint as ckpt_mod
from resnets import create_model, save_weights
from resnets.checkpoint import (
    atomic_write,
    atomic_write_files,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    save_model_file,
    temp_path,
)
from resnets.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _mount(*args: str) -> str | None:
    """None on success, else why mounting is not possible here."""
    try:
        r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount unavailable: {exc}"
    return None if r.returncode == 0 else f"mount {' '.join(args)} not permitted: {r.stderr.strip()}"


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str):
    """A tmpfs of `size` at `mnt`: a real full disk once the writes pass it; skips without mount."""
    mnt.mkdir()
    why = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
    if why:
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["chattr", "-R", "-a", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        yield mnt


@pytest.fixture
def read_only(tmp_path):
    """(writable folder, the same folder seen through a read-only bind mount)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    why = _mount("--bind", str(src), str(ro)) or _mount("-o", "remount,ro,bind", str(ro))
    if why:
        subprocess.run(["umount", str(ro)], capture_output=True)
        pytest.skip(why)
    yield src, ro
    subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def big_state() -> dict:
    return {"model": {"w": torch.arange(600_000, dtype=torch.float32)}}  # 2.4 MB


def small_state() -> dict:
    return {"model": {"w": torch.arange(10, dtype=torch.float32)}}


def tiny_weights(path: Path) -> Path:
    save_weights(create_model("resnet20", num_classes=3), path)
    return path


# --- real faults ----------------------------------------------------------------------------------


def test_checkpoint_on_a_full_filesystem_keeps_the_previous_one(small_fs):
    path = small_fs / "last.ckpt"
    save_checkpoint(path, small_state())
    before = snapshot(small_fs)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, big_state())  # torch.save reports this as its own RuntimeError
    msg = str(info.value)
    assert msg == f"could not write {path} (No space left on device); the previous one is kept"
    assert snapshot(small_fs) == before  # no temporary file left, the old checkpoint unchanged
    assert torch.equal(load_checkpoint(path)["model"]["w"], small_state()["model"]["w"])


def test_first_checkpoint_on_a_full_filesystem_says_nothing_was_written(small_fs):
    with pytest.raises(CheckpointError, match=r"No space left on device\); nothing was written$"):
        save_checkpoint(small_fs / "last.ckpt", big_state())
    assert snapshot(small_fs) == {}


def test_a_temporary_file_that_cannot_be_deleted_still_gives_one_error(small_fs):
    # An append-only folder: files can be created in it but not deleted, as on a filesystem that
    # refuses the cleanup. The write fails (full disk), and so does removing its temporary file.
    folder = small_fs / "run"
    folder.mkdir()
    save_checkpoint(folder / "last.ckpt", small_state())
    if subprocess.run(["chattr", "+a", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +a not supported here")
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(folder / "last.ckpt", big_state())
    assert torch.equal(load_checkpoint(folder / "last.ckpt")["model"]["w"], small_state()["model"]["w"])


@pytest.mark.parametrize(
    "write",
    [
        lambda p: save_checkpoint(p / "last.ckpt", small_state()),
        lambda p: save_model_file(p / "model.safetensors", create_model("resnet20")),
        lambda p: atomic_write(p / "summary.json", lambda f: f.write(b"{}")),
    ],
    ids=["checkpoint", "safetensors", "bytes"],
)
def test_every_writer_on_a_read_only_filesystem(read_only, write):
    src, ro = read_only
    (src / "last.ckpt").write_bytes(b"old")
    (src / "model.safetensors").write_bytes(b"old")
    before = snapshot(src)
    with pytest.raises(CheckpointError, match=r"\(Read-only file system\); "):
        write(ro)
    assert snapshot(src) == before


def test_cli_convert_and_export_on_a_full_filesystem_keep_the_old_file(tmp_path, small_fs):
    src = tiny_weights(tmp_path / "w.safetensors")
    (small_fs / "pad").write_bytes(b"\0" * 700_000)  # leaves less than one resnet20 (1.1 MB) free
    for name in ("m.safetensors", "m.pth", "m.onnx", "m.pt", "m.xml", "m.bin"):
        (small_fs / name).write_bytes(b"old")
    before = snapshot(small_fs)
    cases = [
        ["convert", str(src), str(small_fs / "m.safetensors")],
        ["convert", str(src), str(small_fs / "m.pth"), "--to", "torchvision"],
        ["export", "resnet20", str(small_fs / "m.onnx"), "--format", "onnx", "--weights", str(src)],
        ["export", "resnet20", str(small_fs / "m.pt"), "--format", "torchscript", "--weights", str(src)],
        ["export", str(src), str(small_fs / "m.xml")],  # the .xml fits, its .bin does not: neither changes
    ]
    for argv in cases:
        code, err = run_cli(argv)
        assert_one_error_line(code, err, "No space left on device")
        assert "the previous one is kept" in err, err
        assert snapshot(small_fs) == before, argv


def test_cli_convert_and_export_into_a_read_only_folder(tmp_path, read_only):
    src_dir, ro = read_only
    src = tiny_weights(tmp_path / "w.safetensors")
    before = snapshot(src_dir)
    for argv in (
        ["convert", str(src), str(ro / "m.safetensors")],
        ["export", "resnet20", str(ro / "m.pt"), "--format", "torchscript", "--weights", str(src)],
        ["export", str(src), str(ro / "m.xml")],
    ):
        code, err = run_cli(argv)  # refused before the model is even read
        assert_one_error_line(code, err, f"the folder {ro} is on a read-only file system")
        assert snapshot(src_dir) == before


def test_files_that_belong_together_keep_the_old_set_on_a_full_filesystem(small_fs):
    old = {small_fs / "m.xml": b"old xml", small_fs / "m.bin": b"old bin"}
    for path, blob in old.items():
        path.write_bytes(blob)
    before = snapshot(small_fs)
    new = {small_fs / "m.xml": b"x" * 1000, small_fs / "m.bin": b"w" * 2_000_000}  # the .bin fails
    with pytest.raises(
        CheckpointError, match=r"m\.bin \(No space left on device\); the previous one is kept"
    ):
        atomic_write_files({p: (lambda f, b=b: f.write(b)) for p, b in new.items()})
    assert snapshot(small_fs) == before  # the .xml written first was not renamed into place either


# --- injected faults: each call a write makes ------------------------------------------------------


class _FailingFile:
    """A real file whose `fail_at`-th write (counting from 1) raises ENOSPC after writing half."""

    calls = 0

    def __init__(self, f, fail_at: int):
        self._f, self.fail_at = f, fail_at

    def write(self, data):
        type(self).calls += 1
        if type(self).calls == self.fail_at:
            self._f.write(bytes(memoryview(data)[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _open_failing_at(monkeypatch, fail_at: int) -> None:
    _FailingFile.calls = 0
    monkeypatch.setattr(ckpt_mod, "open", lambda p, mode: _FailingFile(open(p, mode), fail_at), raising=False)


def _count_writes(monkeypatch, tmp_path, state) -> int:
    _open_failing_at(monkeypatch, fail_at=0)
    save_checkpoint(tmp_path / "count.ckpt", state)
    monkeypatch.undo()
    (tmp_path / "count.ckpt").unlink()
    return _FailingFile.calls


def test_a_failure_at_each_write_call_of_a_checkpoint(tmp_path, monkeypatch):
    state = {"model": {f"w{i}": torch.randn(3, 3) for i in range(3)}, "epoch": 1}
    n = _count_writes(monkeypatch, tmp_path, state)
    assert n >= 4  # torch.save writes a zip archive in several pieces
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, small_state())
    before = snapshot(tmp_path)
    for k in range(1, n + 1):
        _open_failing_at(monkeypatch, fail_at=k)
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(path, state)
        monkeypatch.undo()
        assert (
            str(info.value) == f"could not write {path} (No space left on device); the previous one is kept"
        )
        assert snapshot(tmp_path) == before, k


@pytest.mark.parametrize("call", ["open", "fsync", "replace"])
@pytest.mark.parametrize("unlink_fails", [False, True])
def test_a_failure_at_open_fsync_or_rename(tmp_path, monkeypatch, call, unlink_fails):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, small_state())
    before = snapshot(tmp_path)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    target = ckpt_mod if call == "open" else ckpt_mod.os
    monkeypatch.setattr(target, call, fail, raising=False)
    real_unlink = Path.unlink
    if unlink_fails:  # the cleanup fails too, as on a filesystem that turned read-only
        monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: fail())
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, big_state())
    monkeypatch.undo()
    assert str(info.value) == f"could not write {path} (Input/output error); the previous one is kept"
    leftover = temp_path(path)
    if unlink_fails and leftover.exists():
        real_unlink(leftover)  # what the next write would remove once the filesystem allows it
    assert snapshot(tmp_path) == before


def test_an_error_that_is_no_io_fault_is_not_disguised(tmp_path):
    def write(f):
        f.write(b"partial")
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_write(tmp_path / "x", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_ctrl_c_never_splits_files_that_belong_together(tmp_path, monkeypatch, when):
    # Ctrl-C while the files are written: all old files stay. Ctrl-C between the renames: it waits
    # until both are in place, so the pair is never one old and one new file.
    a, b = tmp_path / "m.xml", tmp_path / "m.bin"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    real_replace = os.replace

    def write_b(f):
        if when == "writing":
            signal.raise_signal(signal.SIGINT)
        f.write(b"new b")

    def replace(src, dst):
        real_replace(src, dst)
        if when == "renaming":
            signal.raise_signal(signal.SIGINT)  # after the first rename, before the second

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_files({a: lambda f: f.write(b"new a"), b: write_b})
    monkeypatch.undo()
    expected = {"writing": (b"old a", b"old b"), "renaming": (b"new a", b"new b")}[when]
    assert (a.read_bytes(), b.read_bytes()) == expected
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.xml"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- temporary files of killed writers -------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".last.ckpt.{dead}.tmp"
    other = tmp_path / f".model.safetensors.{dead}.tmp"
    alive = tmp_path / f".last.ckpt.{live}.tmp"
    for p in (stale, other, alive):
        p.write_bytes(b"x" * 100)
    atomic_write(tmp_path / "last.ckpt", lambda f: f.write(b"new"))
    assert not stale.exists() and other.exists() and alive.exists()  # only this file's, only dead
    assert remove_stale_temps(tmp_path) == [other]
    assert alive.exists() and (tmp_path / "last.ckpt").read_bytes() == b"new"


def _writer_script(body: str) -> str:
    return textwrap.dedent(
        f"""
        import sys, time
        import resnets.checkpoint as c
        real = c.atomic_write

        def slow(path, write):
            def w(f):
                write(f)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
            real(path, w)

        {body}
        """
    )


def _start(script: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    return p


def test_a_killed_convert_leaves_a_temporary_file_that_the_next_one_removes(tmp_path):
    src = tiny_weights(tmp_path / "w.safetensors")
    dst = tmp_path / "out" / "m.pth"
    dst.parent.mkdir()
    dst.write_bytes(b"old")
    script = _writer_script(
        f"""
        import resnets.weights as w
        w.atomic_write = slow
        from resnets.cli import main
        main(["convert", {str(src)!r}, {str(dst)!r}])
        """
    )
    p = _start(script)
    p.kill()
    p.wait()
    leftovers = list(dst.parent.glob(".m.pth.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 1_000_000  # SIGKILL: no cleanup
    assert dst.read_bytes() == b"old"  # but the file the user had is whole
    assert run_cli(["convert", str(src), str(dst)])[0] == 0
    assert sorted(os.listdir(dst.parent)) == ["m.pth"] and dst.stat().st_size > 1_000_000


@pytest.mark.parametrize("command", ["convert", "export"])
def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path, command):
    src = tiny_weights(tmp_path / "w.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / ("m.safetensors" if command == "convert" else "m.onnx")
    dst.write_bytes(b"old")
    argv = (
        ["convert", str(src), str(dst)]
        if command == "convert"
        else ["export", "resnet20", str(dst), "--format", "onnx", "--weights", str(src)]
    )
    module = "resnets.weights" if command == "convert" else "resnets.export"
    script = _writer_script(
        f"""
        import {module} as m
        m.atomic_write = slow
        from resnets.cli import main
        sys.exit(main({argv!r}))
        """
    )
    p = _start(script)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err == "error: terminated\n"
    assert sorted(os.listdir(out)) == [dst.name] and dst.read_bytes() == b"old"


def test_a_run_whose_disk_fills_stops_in_one_line_and_keeps_its_checkpoint(tmp_path):
    # A real full disk under a real run: 3 MiB hold the first epoch's files (last.ckpt of a
    # resnet20 with its momentum is 2.2 MB) but not the second last.ckpt beside the first.
    with tmpfs(tmp_path / "mnt", "3m") as mnt:
        out = mnt / "run"
        argv = ["train", "--out", str(out), "--epochs", "2", "--warmup-epochs", "0", "--quiet"]
        argv += ["--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--amp", "off"]
        code, err = run_cli(argv)
        # The error is the last line of stderr (torch may log a warning of its own before it).
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and "Traceback" not in err and len(errors) == 1, err
        assert err.endswith(errors[0] + "\n") and "last.ckpt" in errors[0], err
        assert "(No space left on device); the previous one is kept" in errors[0], err
        assert load_checkpoint(out / "last.ckpt")["epoch"] == 1
        assert not list(out.glob(".*.tmp"))
