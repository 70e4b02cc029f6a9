"""`resnets list` and `resnets info`, and how the command line reports mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resnets import count_params_macs
from resnets.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json(capsys):
    code, out, _ = run(capsys, "list", "resnet5*", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == ["resnet50", "resnet50_v1", "resnet56"]
    keys = {
        "name",
        "family",
        "input_size",
        "num_classes",
        "params",
        "gmacs",
        "paper_params_m",
        "paper_gmacs",
        "source",
        "note",
    }
    assert all(set(r) == keys for r in rows)
    r50 = rows[0]
    assert r50["params"] == count_params_macs("resnet50")[0] and r50["paper_gmacs"] == 4.089


def test_list_table(capsys):
    code, out, _ = run(capsys, "list", "wrn28*")
    assert code == 0 and "wrn28_10" in out and "36.48" in out and "36.50" in out


def test_info_json_sums_to_the_total(capsys):
    code, out, _ = run(capsys, "info", "resnet50", "--json")
    info = json.loads(out)
    params, macs = count_params_macs("resnet50")
    assert code == 0 and info["total"] == {"params": params, "macs": macs}
    assert [s["output_shape"] for s in info["stages"]][1:5] == [
        [256, 56, 56],
        [512, 28, 28],
        [1024, 14, 14],
        [2048, 7, 7],
    ]


def test_info_input_size(capsys):
    code, out, _ = run(capsys, "info", "resnet20", "--input-size", "64", "--json")
    assert json.loads(out)["stages"][-2]["output_shape"] == [64, 16, 16]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["list", "resnt50"], "did you mean resnet50"),
        (["info", "iresnt50"], "iresnet50"),
        (["info", "resnet50", "--input-size", "abc"], "invalid int"),
        (["info", "resnet50", "--input-size", "0"], "positive"),
        (["frobnicate"], "invalid choice"),
        (["list", "zzz*"], "no model matches"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "resnets", "info", "nope"], capture_output=True, text=True)
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: unknown model")
        and "Traceback" not in proc.stderr
    )
