"""Every subcommand, given generated bad values: one `error:` line on stderr, exit code 2, no
traceback, and the folder it ran in exactly as it was (names, sizes and hashes of every file)."""

from __future__ import annotations

import string

import pytest
import torch
from cli_checks import run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnets import create_model, save_weights
from resnets.checkpoint import save_model_file
from resnets.registry import list_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder holding what the commands read: weights, a 1-channel model, an image, a text file,
    a pixel bomb and a sub-folder."""
    from PIL import Image
    from test_hostile_data import png_claiming

    root = tmp_path_factory.mktemp("sweep")
    save_weights(create_model("resnet20"), root / "w.safetensors")
    gray = create_model("resnet20", in_chans=1)
    info = {
        "data": "digits",
        "classes": [str(i) for i in range(10)],
        "mean": [0.5],
        "std": [0.25],
        "image_size": 32,
    }
    save_model_file(root / "gray.safetensors", gray, info)
    Image.new("RGB", (32, 32), (9, 8, 7)).save(root / "img.png")
    png_claiming(root / "bomb.png", 20000, 20000)
    (root / "notes.txt").write_text("not a model\n")
    (root / "adir").mkdir()
    return root


def _cuda_ok(text: str) -> bool:
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return False
    if dev.type == "cpu":
        return dev.index in (None, 0)
    return dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()


def ints(lo=None, hi=None):
    return st.integers(lo, hi).map(str)


NOT_INT = st.text(max_size=6).filter(lambda t: not t.strip().lstrip("+-").isdigit())
BAD_DEVICE = st.one_of(
    st.sampled_from(
        ["banana", "cuda:abc", "cpu:1", "mps", "meta", "CUDA", " cpu", "cuda:-1", "cuda:99", "cuda:0:1"]
    ),
    st.text(string.ascii_letters + string.digits + ":-_ ", min_size=1, max_size=8),
).filter(lambda t: not _cuda_ok(t))
NON_POSITIVE = ints(hi=0)
TOO_BIG_SIZE = ints(8193, 10**12)
MISSING = st.text(string.ascii_letters, min_size=1, max_size=6).map(lambda t: f"nowhere/{t}")
UNKNOWN_NAME = st.text(string.ascii_lowercase + string.digits + "_", min_size=1, max_size=10).filter(
    lambda t: t not in list_models()
)
NOT_A_MODEL = st.sampled_from(
    ["adir", "img.png", "notes.txt", "bomb.png", "nowhere.pth", "nowhere.safetensors"]
)
BAD_SECONDS = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "0", "-1"]), NOT_INT.filter(lambda t: not _is_float(t))
)


def _is_float(t: str) -> bool:
    try:
        float(t)
    except ValueError:
        return False
    return True


# (argv with one "{}" slot, the bad values for that slot)
CASES = [
    (["{}"], st.sampled_from(["bogus", "trian", "--nope"])),
    (
        ["list", "{}"],
        st.one_of(UNKNOWN_NAME, st.text("*?[]", min_size=1, max_size=3).map(lambda t: "zz" + t)),
    ),
    (["info", "{}"], UNKNOWN_NAME),
    (["info", "resnet20", "--input-size", "{}"], st.one_of(NON_POSITIVE, TOO_BIG_SIZE, NOT_INT)),
    (["eval", "--checkpoint", "{}"], NOT_A_MODEL),
    (["eval", "--checkpoint", "w.safetensors", "--device", "{}"], BAD_DEVICE),
    (["eval", "--checkpoint", "w.safetensors", "--workers", "{}"], st.one_of(ints(hi=-1), ints(257, 10**9))),
    (["eval", "--checkpoint", "w.safetensors", "--batch-size", "{}"], st.one_of(NON_POSITIVE, NOT_INT)),
    (
        ["eval", "--checkpoint", "w.safetensors", "--data", "{}"],
        st.one_of(UNKNOWN_NAME, MISSING.map("folder:{}".format)),
    ),
    (
        ["eval", "--checkpoint", "w.safetensors", "--data", "cifar10", "--data-dir", "{}"],
        st.just("notes.txt"),
    ),
    (["eval", "--checkpoint", "gray.safetensors", "--data", "{}"], st.just("folder:adir")),
    (["bench", "{}"], UNKNOWN_NAME),
    (["bench", "resnet20", "--device", "{}"], BAD_DEVICE),
    (["bench", "resnet20", "--max-seconds", "{}"], BAD_SECONDS),
    (
        ["bench", "resnet20", "--plot", "{}"],
        st.one_of(MISSING.map("{}.png".format), st.just("adir"), st.just("p.jpg")),
    ),
    (["bench", "resnet20", "--input-size", "{}"], st.one_of(NON_POSITIVE, TOO_BIG_SIZE)),
    (["bench", "resnet20", "--batch-size", "{}"], st.one_of(NON_POSITIVE, ints(10**8, 10**15))),
    (["bench", "resnet20", "--dtype", "{}"], st.sampled_from(["float64", "int8", ""])),
    (["convert", "{}", "out.pth"], NOT_A_MODEL),
    (
        ["convert", "w.safetensors", "{}"],
        st.one_of(MISSING.map("{}.pth".format), st.sampled_from(["adir", "o.txt", "o"])),
    ),
    (["convert", "w.safetensors", "o.pth", "--to", "{}"], UNKNOWN_NAME),
    (["convert", "w.safetensors", "o.pth", "--model", "{}"], UNKNOWN_NAME),
    (["export", "{}", "o.onnx", "--format", "onnx"], UNKNOWN_NAME),
    (
        ["export", "resnet20", "{}", "--format", "onnx"],
        st.one_of(MISSING.map("{}.onnx".format), st.just("adir")),
    ),
    (["export", "resnet20", "o.onnx", "--format", "{}"], st.sampled_from(["tflite", "ONNX", ""])),
    (
        ["export", "resnet20", "o.onnx", "--format", "onnx", "--input-size", "{}"],
        st.one_of(NON_POSITIVE, TOO_BIG_SIZE),
    ),
    (["export", "resnet20", "o.onnx", "--format", "onnx", "--weights", "{}"], NOT_A_MODEL),
    (["export", "{}", "o.onnx"], NOT_A_MODEL),
    (
        ["export", "gray.safetensors", "{}"],
        st.one_of(MISSING.map("{}.xml".format), st.sampled_from(["o.tflite", "o", "adir", "o.onnx.txt"])),
    ),
    (
        ["export", "gray.safetensors", "o.onnx", "--static", "--batch-size", "{}"],
        st.one_of(NON_POSITIVE, ints(4097, 10**9), NOT_INT),
    ),
    (["predict", "--checkpoint", "{}", "img.png"], NOT_A_MODEL),
    (
        ["predict", "--checkpoint", "gray.safetensors", "img.png", "--top", "{}"],
        st.one_of(NON_POSITIVE, NOT_INT),
    ),
    (
        ["predict", "--checkpoint", "gray.safetensors", "img.png", "--batch-size", "{}"],
        st.one_of(NON_POSITIVE, ints(65537, 10**12), NOT_INT),
    ),
    (["predict", "--checkpoint", "gray.safetensors", "img.png", "--device", "{}"], BAD_DEVICE),
    (["analyze", "{}"], UNKNOWN_NAME),
    (
        ["analyze", "signal", "--model", "resnet20", "--out", "{}"],
        st.sampled_from(["notes.txt", "notes.txt/sub"]),
    ),
    (["analyze", "signal", "--model", "{}", "--out", "o"], UNKNOWN_NAME),
    (
        ["analyze", "receptive-field", "--model", "resnet20", "--input-size", "{}"],
        st.one_of(NON_POSITIVE, ints(2049, 10**9)),
    ),
    (
        ["analyze", "gradcam", "--model", "resnet20", "--image", "{}", "--out", "o"],
        NOT_A_MODEL.filter(lambda p: p != "img.png"),
    ),
    (
        ["analyze", "gradcam", "--checkpoint", "{}", "--image", "img.png", "--out", "o"],
        st.just("gray.safetensors"),
    ),
    (["analyze", "lesion", "--checkpoint", "{}", "--out", "o"], NOT_A_MODEL),
    (
        ["analyze", "shortcut", "--size", "{}", "--out", "o"],
        st.one_of(NON_POSITIVE, ints(2049, 10**9), st.just("3")),
    ),
]


@pytest.mark.parametrize("template,values", CASES, ids=[" ".join(t) for t, _ in CASES])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_command_refuses_bad_values_in_one_line_and_changes_nothing(
    folder, monkeypatch, template, values, data
):
    value = data.draw(values, label="value")
    argv = [value if a == "{}" else a for a in template]
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    code, err = run_cli(argv)
    assert code == 2, (argv, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert snapshot(folder) == before, argv
