"""A user's mistake is one `error:` line and exit code 2; odd but valid images are converted.

Includes property-based tests (hypothesis) of the config parser and the command line: whatever
they are given, they either accept it or say `error:` in one line, never a traceback.
"""

from __future__ import annotations

import math
import os
import signal
import string
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_one_error_line, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnets.train as train_mod
from resnets.config import TrainConfig, field_types, from_dict, load_config, tomllib
from resnets.data import load_data
from resnets.data.augment import Augment
from resnets.data.images import load_rgb
from resnets.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_EPOCH = ["--epochs", "1", "--warmup-epochs", "0"]


# --- image modes ---------------------------------------------------------------------------------


def test_every_common_image_mode_becomes_8_bit_rgb(tmp_path):
    from PIL import Image

    gray = np.full((4, 5), 100, np.uint8)
    cases = {
        "gray.png": (Image.fromarray(gray, "L"), (100, 100, 100)),
        "gray_alpha.png": (Image.fromarray(gray, "L").convert("LA"), (100, 100, 100)),
        "rgba.png": (Image.new("RGBA", (5, 4), (10, 20, 30, 0)), (10, 20, 30)),
        "palette.png": (
            Image.new("RGB", (5, 4), (200, 0, 0)).convert("P", palette=Image.ADAPTIVE),
            (200, 0, 0),
        ),
        "bilevel.png": (Image.new("1", (5, 4), 1), (255, 255, 255)),
        "cmyk.jpg": (Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),
        # 16-bit: 0x8000 is mid-grey, not white (PIL's plain convert would clip it to 255).
        "gray16.png": (Image.fromarray(np.full((4, 5), 0x8000, np.uint16)), (128, 128, 128)),
        "gray16_max.png": (Image.fromarray(np.full((4, 5), 0xFFFF, np.uint16)), (255, 255, 255)),
    }
    for name, (im, rgb) in cases.items():
        im.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        arr = np.asarray(out)
        assert out.mode == "RGB" and arr.shape == (4, 5, 3), name
        assert np.abs(arr.astype(int) - rgb).max() <= 2, (name, arr[0, 0])
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")  # the case really is 16-bit


def _tree(root: Path, classes=("a", "b"), per_class=4, size=32, splits=("train", "test")) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )


def test_folder_of_mixed_modes_trains(tmp_path):
    from PIL import Image

    _tree(tmp_path / "d", splits=("train", "val"), size=40)
    Image.new("L", (50, 44), 90).save(tmp_path / "d" / "train" / "a" / "gray.png")
    Image.new("RGBA", (36, 36), (1, 2, 3, 4)).save(tmp_path / "d" / "train" / "b" / "rgba.png")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(tmp_path / "d" / "val" / "a" / "g16.png")
    data = load_data(f"folder:{tmp_path / 'd'}", image_size=24, workers=0)
    xs = [x for step in data.train_batches(0, seed=0, batch_size=10, augment=Augment()) for x, _ in step]
    assert xs[0].shape == (10, 3, 24, 24)
    ev = [x for x, _ in data.eval_batches(10)]
    assert sum(len(x) for x in ev) == 9


# --- unreadable data -----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def test_a_truncated_image_in_a_cifar_tree_names_the_file(tmp_path):
    _tree(tmp_path / "t", classes=[f"k{i}" for i in range(10)], per_class=1)
    bad = tmp_path / "t" / "train" / "k3" / "0.png"
    _truncate(bad)
    argv = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "t"), "--out", str(tmp_path / "r")]
    code, err = run_cli([*argv, "--no-download", "--epochs", "1", "--warmup-epochs", "0"])
    assert_one_error_line(code, err, f"cannot read image {bad}")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_in_a_streamed_folder_names_the_file(tmp_path, workers):
    _tree(tmp_path / "d", splits=("train", "val"))
    bad = tmp_path / "d" / "train" / "b" / "2.png"
    bad.write_bytes(b"this is not an image at all" * 10)
    data = load_data(f"folder:{tmp_path / 'd'}", image_size=16, workers=workers)
    with pytest.raises(DataError) as info:
        for _ in data.train_batches(0, seed=0, batch_size=4, augment=Augment()):
            pass
    assert str(info.value).startswith(f"cannot read image {bad}: ") and "\n" not in str(info.value)


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    from resnets.data import folder

    _tree(tmp_path / "d", splits=("train", "val"))
    parent = os.getpid()
    real = folder._Images.__getitem__

    def dying(self, key):
        if os.getpid() != parent:  # in a worker process: die as the OOM killer would kill it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key)

    monkeypatch.setattr(folder._Images, "__getitem__", dying)
    data = load_data(f"folder:{tmp_path / 'd'}", image_size=16, workers=2)
    with pytest.raises(DataError, match=r"DataLoader worker .* --workers 0"):
        for _ in data.train_batches(0, seed=0, batch_size=4, augment=Augment()):
            pass


@pytest.mark.parametrize(
    "layout, needle",
    [
        ("missing", "train/<class>/"),
        ("empty", "no images under"),
        ("classes_differ", "has classes"),
        ("no_eval_split", "neither val/ nor test/"),
    ],
)
def test_folders_that_cannot_be_trained_on(tmp_path, layout, needle):
    root = tmp_path / "d"
    if layout == "empty":
        (root / "train" / "a").mkdir(parents=True)
        (root / "val" / "a").mkdir(parents=True)
    elif layout == "classes_differ":
        _tree(root, classes=("a", "b"), splits=("train",))
        _tree(root, classes=("a", "c"), splits=("val",))
    elif layout == "no_eval_split":
        _tree(root, splits=("train",))
    code, err = run_cli(["train", "--data", f"folder:{root}", "--out", str(tmp_path / "r"), *ONE_EPOCH])
    assert_one_error_line(code, err, needle)


def test_cifar_tree_whose_test_classes_differ(tmp_path):
    _tree(tmp_path / "t", classes=[f"k{i}" for i in range(10)], per_class=1, splits=("train",))
    _tree(tmp_path / "t", classes=[f"k{i}" for i in range(1, 11)], per_class=1, splits=("test",))
    argv = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "t"), "--no-download", *ONE_EPOCH]
    assert_one_error_line(*run_cli([*argv, "--out", str(tmp_path / "r")]), "test has classes")


def test_a_mistake_leaves_an_existing_run_untouched(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--train-subset", "64", "--test-subset", "32", "--epochs", "1", "--warmup-epochs", "0"]
    assert run_cli([*argv, "--out", str(run), "--quiet"])[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for bad in (
        [*argv, "--out", str(run)],  # the folder holds a run: needs --resume
        ["train", "--out", str(run), "--resume", "--lr", "0.3"],  # a resumed run keeps its recipe
        ["train", "--out", str(run), "--resume", "--nonfinite", "sometimes"],
        ["eval", "--checkpoint", str(run / "nope.ckpt")],
    ):
        assert_one_error_line(*run_cli(bad))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# --- property-based: the config parser and the command line ----------------------------------------

FIELDS = field_types()
NAMES = sorted(FIELDS)
VALUES = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(-5, 300), max_size=4),
    st.none(),
)
WORDS = ["step", "cosine", "onecycle", "constant", "off", "bf16", "fp16", "zeros", "reflect", "stop", "skip"]
WORDS += ["cpu", "auto", "cuda:1", "resnet20", "digits", "cifar10", "folder:/x"]


def typed(name: str):
    """Values of the field's own type, mostly in or near the valid range."""
    return {
        bool: st.booleans(),
        int: st.integers(-2, 400),
        float: st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 0.1, 0.9, 3.0])),
        str: st.one_of(st.sampled_from(WORDS), st.text(max_size=6)),
        tuple: st.lists(st.integers(-1, 300), max_size=3).map(tuple),
    }[FIELDS[name]]


TYPED = st.lists(st.sampled_from(NAMES), unique=True, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: typed(k) for k in keys})
)
CASES = {"config": 0, "toml": 0, "cli": 0, "accepted": 0}


def _check_config(cfg: TrainConfig) -> None:
    """What every accepted config must satisfy."""
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.batch_size % cfg.accum_steps == 0
    assert cfg.lr > 0 and math.isfinite(cfg.lr) and 0 <= cfg.momentum < 1
    assert cfg.warmup() < cfg.epochs or cfg.schedule == "constant"
    assert from_dict(tomllib.loads(cfg.to_toml())) == cfg  # it round-trips through TOML


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=10)), VALUES, max_size=6), TYPED
    )
)
def test_config_parser_accepts_or_raises_config_error(values):
    CASES["config"] += 1
    try:
        cfg = from_dict(values)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    CASES["accepted"] += 1
    _check_config(cfg)


TOML_TEXT = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.tuples(
            st.sampled_from(NAMES),
            st.sampled_from(["1", "0", "-1", '"x"', "1.5", "true", "[1, 2]", "nan", "inf", "{a = 1}"]),
        ),
        max_size=5,
    ).map(lambda kv: "\n".join(f"{k} = {v}" for k, v in kv)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TOML_TEXT)
def test_recipe_files_are_read_or_refused_in_one_line(tmp_path, text):
    CASES["toml"] += 1
    path = tmp_path / "r.toml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    _check_config(cfg)


FLAG_VALUES = st.one_of(
    st.integers(-3, 300).map(str),
    st.floats(-1e3, 1e3, allow_nan=False).map(repr),
    st.sampled_from(
        ["nan", "inf", "-inf", "", "true", "x", "cuda:7", "skip", "stop", "1,2", "3,1", "step", "bf16"]
    ),
    st.text(alphabet=string.printable, max_size=8),
)
FLAGS = st.lists(
    st.tuples(
        st.sampled_from(["--" + n.replace("_", "-") for n in NAMES] + ["--bogus", "--config"]), FLAG_VALUES
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(FLAGS)
def test_train_command_line_never_shows_a_traceback(monkeypatch, tmp_path, flags):
    """The real parser, recipe merge and validation; the training loop itself is replaced by a
    recorder (a valid config would otherwise start a run)."""
    CASES["cli"] += 1
    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg: seen.append(cfg) or {})
    argv = ["train", "--out", str(tmp_path / "never")]
    for flag, value in flags:
        argv += (
            [flag] if FIELDS.get(flag[2:].replace("-", "_")) is bool and value == "true" else [flag, value]
        )
    code, err = run_cli(argv)
    if code == 0:
        assert len(seen) == 1 and isinstance(seen[0], TrainConfig)
        _check_config(seen[0])
    else:
        assert_one_error_line(code, err)
        assert not seen


def test_report_how_many_cases_were_tried(capsys):
    """Runs after the property tests in this module: prints the counts for the record."""
    with capsys.disabled():
        print(f"\nhypothesis cases tried: {CASES}")
    if all(CASES[k] for k in ("config", "toml", "cli")):  # the module ran as a whole
        assert CASES["config"] >= 100 and CASES["cli"] >= 100 and CASES["accepted"] >= 20


@pytest.mark.parametrize("key", ["weight_decay", "warmup_epochs", "gamma", "lr", "label_smoothing"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_in_a_recipe_are_refused(tmp_path, key, value):
    # Found by the property test above: weight_decay = nan used to be accepted.
    path = tmp_path / "r.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"{key} must be"):
        load_config(path)
