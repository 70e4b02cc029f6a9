"""`resnets list` reads the counts shipped with the package, in natural order, and ends quietly
when its reader stops early."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import resnets.complexity
from resnets.cli import main
from resnets.registry import list_models, model_counts, natural_key


def test_list_counts_nothing(monkeypatch):
    def no_counting(*args, **kwargs):
        raise AssertionError("resnets list must not count models")

    monkeypatch.setattr(resnets.complexity, "count_params_macs", no_counting)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list", "--json"]) == 0
    rows = json.loads(out.getvalue())
    names = [r["name"] for r in rows]
    assert names == list_models() == sorted(names, key=natural_key)
    assert names.index("resnet18") < names.index("resnet101") < names.index("resnet1202")
    r50 = next(r for r in rows if r["name"] == "resnet50")
    assert r50["params"] == 25_557_032 and r50["gmacs"] == round(model_counts("resnet50")[1] / 1e9, 4)


def test_shipped_counts_are_the_live_ones():
    # The full comparison is tests/test_registry.py::test_golden_counts; this one needs no file.
    for name in ("resnet20", "resnext29_8x64d", "iresnet18"):
        assert model_counts(name) == resnets.complexity.count_params_macs(name)


def test_a_closed_pipe_ends_without_traceback():
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnets", "list", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Closed before the command writes (it is still importing torch), as `| head` does when it
    # has its lines: every write then fails, whether or not the output would fit the pipe.
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
