"""`resnets analyze <study>`: tables, files, and one-line errors for mistakes."""

from __future__ import annotations

import json

import pytest

from resnets.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shortcut_prints_a_table_and_writes_files(tmp_path, capsys):
    code, out, _ = run(
        capsys, "analyze", "shortcut", "--kinds", "B", "avgdown", "--inputs", "gaussian",
        "--channels", "4", "--size", "8", "--num-fit", "32", "--num-test", "8", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0 and "positions used %" in out and str(tmp_path / "shortcut.png") in out
    saved = json.loads((tmp_path / "shortcut.json").read_text())
    assert saved["kinds"]["B"]["gaussian"]["positions"] == 0.25
    assert saved["kinds"]["avgdown"]["gaussian"]["elements"] == 1.0


def test_signal_on_one_model(tmp_path, capsys):
    code, out, _ = run(
        capsys, "analyze", "signal", "--model", "resnet20", "--batch-size", "2", "--out", str(tmp_path)
    )
    assert code == 0 and out.splitlines()[2].startswith("resnet20  init")
    assert len(json.loads((tmp_path / "signal.json").read_text())["models"]["resnet20"]["init"]["mean"]) == 10


def test_signal_depth_sweep(tmp_path, capsys):
    argv = ["analyze", "signal", "--depths", "20", "--batch-size", "2", "--input-size", "16"]
    code, out, _ = run(capsys, *argv, "--out", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["model", "weights", "depth"]
    # Only the sweep: no default 110-layer nets when --depths is given without --model.
    assert [ln.split()[:3] for ln in lines[2:5]] == [
        ["resnet20", "init", "20"], ["preact_resnet20", "init", "20"], ["iresnet20_cifar", "init", "20"],
    ]  # fmt: skip
    saved = json.loads((tmp_path / "signal.json").read_text())
    assert saved["depths"] == [20] and len(saved["models"]) == 3
    assert saved["models"]["iresnet20_cifar"]["init"]["stage"] == [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["receptive-field", "--model", "resnet5O"], "unknown model 'resnet5O'; did you mean"),
        (["receptive-field", "--split-block", "two"], "expected STAGE.INDEX"),
        (["shortcut", "--size", "7"], "size must be even"),
        (["shortcut", "--kinds", "Z"], "invalid choice"),
        (["lesion", "--checkpoint", "no/such/run"], "does not exist"),
        (["gradcam", "--model", "resnet20", "--image", "no/such.png"], "does not exist"),
        (["bogus"], "invalid choice"),
        (
            ["signal", "--depths", "20", "21"],
            "a CIFAR depth is 6n+2 with n >= 1 (8, 14, 20, 26, ...); got 21",
        ),
        (["signal", "--depths", "twenty"], "invalid int value"),
    ],
)
def test_mistakes_are_one_error_line(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "analyze", *argv, "--out", str(tmp_path))
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert message in err


def test_gradcam_stage_out_of_range(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    argv = ["analyze", "gradcam", "--model", "resnet20", "--stage", "3", "--image", str(tmp_path / "red.png")]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path))
    assert code == 2 and err.strip() == "error: resnet20 has stages 0..2; got --stage 3"


def test_gradcam_without_images_or_data(tmp_path, capsys):
    missing = tmp_path / "nothing"
    argv = ["analyze", "gradcam", "--model", "resnet20", "--data-dir", str(missing), "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cifar10 is not in {missing}")
