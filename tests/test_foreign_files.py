"""Files that parse but were not written by us as they are: safetensors files whose `resnets`
metadata is malformed, checkpoints with missing or mistyped fields, torch files that would inflate
far beyond their size. Each is refused in one line before it can make us crash or allocate much."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from cli_checks import assert_one_error_line, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from resnets import create_model, load_model, load_weights, save_weights
from resnets.checkpoint import (
    CHECKPOINT_FIELDS,
    load_checkpoint,
    load_model_file,
    save_checkpoint,
    save_model_file,
    validate_checkpoint,
)
from resnets.errors import CheckpointError
from resnets.weights import model_from_weights

pytestmark = pytest.mark.usefixtures("one_thread")

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A resnet20 (3 classes) saved as a run saves it: tensors, and its metadata."""
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    info = {
        "data": "digits",
        "classes": ["a", "b", "c"],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "image_size": 32,
    }
    save_model_file(path, create_model("resnet20", num_classes=3), info)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    return tensors, meta


def with_meta(path: Path, tensors: dict, meta: dict) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def loaders(path: Path):
    yield "load_model_file", lambda: load_model_file(path)[0]
    yield "load_model", lambda: load_model(path)
    yield "model_from_weights", lambda: model_from_weights(path)[0]


def assert_loads_or_refuses(path: Path) -> None:
    """Each loader either returns a model that runs, or raises CheckpointError in one line."""
    for name, load in loaders(path):
        try:
            model = load()
        except CheckpointError as exc:
            assert "\n" not in str(exc), (name, str(exc))
            continue
        with torch.no_grad():
            out = model(torch.zeros(1, model.spec.in_chans, 64, 64))
        assert out.shape == (1, model.num_classes), name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_spec_metadata_is_refused_in_one_line(tmp_path, weights_file, data):
    tensors, meta = weights_file
    spec = json.loads(meta["spec"])
    how = data.draw(st.sampled_from(["whole", "field", "extra", "info"]), label="how")
    meta = dict(meta)
    if how == "whole":
        meta["spec"] = json.dumps(data.draw(JSON, label="spec"))
    elif how == "field":
        field = data.draw(st.sampled_from(sorted(spec)), label="field")
        spec[field] = data.draw(JSON | st.just(0) | st.just([0, 0, 0]) | st.just("banana"), label="value")
        meta["spec"] = json.dumps(spec)
    elif how == "extra":
        spec[data.draw(st.text(min_size=1, max_size=6), label="key")] = 1
        meta["spec"] = json.dumps(spec)
    else:
        key = data.draw(st.sampled_from(["mean", "std", "classes", "image_size", "data"]), label="key")
        meta[key] = json.dumps(data.draw(JSON, label="value"))
    assert_loads_or_refuses(with_meta(tmp_path / "m.safetensors", tensors, meta))


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda spec, meta: json.dumps([spec]), "must be a dict of network settings"),
        (lambda spec, meta: json.dumps({**spec, "strides": [1, 0, 2]}), "strides must be a list of positive"),
        (lambda spec, meta: json.dumps({**spec, "stem": "banana"}), "stored spec"),
        (lambda spec, meta: json.dumps({**spec, "depths": [10**7] * 3}), "blocks, but the file holds"),
        (lambda spec, meta: json.dumps({**spec, "widths": [16, 32, 10**6]}), "values, but the file holds"),
        (lambda spec, meta: "{", "not valid JSON"),
    ],
    ids=["list", "stride0", "stem", "deep", "wide", "json"],
)
def test_the_examples_of_malformed_specs(tmp_path, weights_file, change, needle):
    tensors, meta = weights_file
    meta = {**meta, "spec": change(json.loads(meta["spec"]), meta)}
    path = with_meta(tmp_path / "m.safetensors", tensors, meta)
    for _, load in loaders(path):
        with pytest.raises(CheckpointError, match=needle):
            load()
    before = snapshot(tmp_path)
    for argv in (
        ["eval", "--checkpoint", str(path)],
        ["convert", str(path), str(tmp_path / "out.pth")],
        ["export", "resnet20", str(tmp_path / "m.onnx"), "--format", "onnx", "--weights", str(path)],
    ):
        if argv[0] == "export" and needle != "not valid JSON":
            continue  # export names the model itself and reads only the tensors
        assert_one_error_line(*run_cli(argv))
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("mean", [0.5, 0.5], "the stored mean has 2 values for a model of 3 input channels"),
        ("std", [0.2, 0.0, 0.2], "the stored std must be positive"),
        ("classes", ["a"], "the stored classes name 1, but the model has 3 outputs"),
        ("image_size", 0, "image_size must be an integer in 1..8192"),
        ("mean", "0.5", "the stored mean must be a list of numbers"),
    ],
)
def test_the_normalisation_and_classes_must_fit_the_model(tmp_path, weights_file, key, value, needle):
    tensors, meta = weights_file
    path = with_meta(tmp_path / "m.safetensors", tensors, {**meta, key: json.dumps(value)})
    with pytest.raises(CheckpointError, match=needle):
        load_model_file(path)
    assert_one_error_line(*run_cli(["eval", "--checkpoint", str(path)]), needle)


# --- checkpoint schema ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_state():
    model = create_model("resnet20", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "ema": None,
        "ema_updates": 0,
        "optimizer": opt.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "epoch": 1,
        "step": 3,
        "epoch_step": 0,
        "epoch_sums": [0.0] * 4,
        "epoch_train_s": 0.0,
        "rng": {"torch": torch.get_rng_state()},
        "model_name": "resnet20",
        "spec": __import__("dataclasses").asdict(model.spec),
        "config": {"model": "resnet20"},
        "data_info": {"data": "digits", "classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.2] * 3},
        "metrics": [{"epoch": 1}],
        "train_time_s": 1.0,
        "time_s": 2.0,
    }


def test_a_complete_checkpoint_passes(tmp_path, ckpt_state):
    save_checkpoint(tmp_path / "last.ckpt", ckpt_state)
    validate_checkpoint(load_checkpoint(tmp_path / "last.ckpt"), tmp_path / "last.ckpt")
    model, meta = load_model_file(tmp_path / "last.ckpt")
    assert model.num_classes == 3 and meta["classes"] == ["a", "b", "c"]


# Values that no field accepts, and for each field values that it must refuse.
NEVER = st.one_of(
    st.text(max_size=4), st.floats(allow_nan=True), st.lists(st.text(max_size=2), min_size=1, max_size=3)
)
WRONG = {
    "int": st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.none(), st.text(max_size=3)),
    "number": st.one_of(
        st.just(math.nan), st.just(math.inf), st.floats(max_value=-1e-9), st.none(), st.text(max_size=3)
    ),
    "dict": st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=3)),
}
KIND = {
    "ema_updates": "int", "epoch": "int", "step": "int", "epoch_step": "int",
    "train_time_s": "number", "time_s": "number", "epoch_train_s": "number",
    "scaler": "dict", "spec": "dict", "config": "dict", "data_info": "dict",
}  # fmt: skip


def wrong_value(field: str):
    extra = {
        "model": st.just({}) | st.just({"w": [1.0]}) | st.just({1: torch.zeros(1)}),
        "ema": st.just({}) | st.just({"w": 1}),
        "optimizer": st.just({}) | st.just({"state": {}, "param_groups": [{"params": ["x"]}]}),
        "rng": st.just({})
        | st.just({"torch": torch.zeros(3)})
        | st.just({"torch": torch.zeros(2, 2, dtype=torch.uint8)}),
        "epoch_sums": st.just([0.0] * 3) | st.just([math.nan] * 4),
        "metrics": st.just([1, 2]) | st.just({"epoch": 1}),
        "model_name": st.integers() | st.none() | st.lists(st.text(max_size=2), max_size=2),
    }
    if field == "model_name":  # any string is a name
        return extra[field]
    return WRONG[KIND[field]] if field in KIND else extra[field] | NEVER


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_checkpoint_with_a_missing_or_mistyped_field_is_refused(tmp_path, ckpt_state, data):
    field = data.draw(st.sampled_from(sorted(CHECKPOINT_FIELDS)), label="field")
    state = dict(ckpt_state)
    required = CHECKPOINT_FIELDS[field][2]
    if required and data.draw(st.booleans(), label="delete"):
        del state[field]
        needle = f"it has no {field!r}"
    else:
        state[field] = data.draw(wrong_value(field), label="value")
        needle = field
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(state, "last.ckpt")
    assert "\n" not in str(info.value) and needle in str(info.value), str(info.value)


def test_a_hand_edited_checkpoint_is_one_error_line_for_eval(tmp_path, ckpt_state):
    for field, value in (("spec", None), ("model_name", 3), ("model", {"w": 1}), ("spec", {"depths": "3"})):
        state = {k: v for k, v in ckpt_state.items() if k != field}
        if value is not None:
            state[field] = value
        run = tmp_path / field / "last.ckpt"
        run.parent.mkdir(exist_ok=True)
        save_checkpoint(run, state)
        before = snapshot(tmp_path)
        assert_one_error_line(
            *run_cli(["eval", "--checkpoint", str(run)]), field if field != "spec" else "spec"
        )
        assert snapshot(tmp_path) == before


# --- files that would inflate ---------------------------------------------------------------------------


def deflated_copy(src: bytes) -> bytes:
    """The same torch zip archive with every entry deflated, as no torch writes them."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return out.getvalue()


def test_a_small_deflated_torch_file_is_refused_before_it_inflates(tmp_path):
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(4_000_000)}, buf)  # 16 MB of zeros
    bomb = tmp_path / "bomb.pth"
    bomb.write_bytes(deflated_copy(buf.getvalue()))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(
        CheckpointError, match=r"refusing to load .*bomb.pth: its [\d,]+ bytes would expand to 16,"
    ):
        load_weights(create_model("resnet20"), bomb)
    with pytest.raises(CheckpointError, match="would expand"):
        load_checkpoint(bomb)
    before = snapshot(tmp_path)
    assert_one_error_line(
        *run_cli(["convert", str(bomb), str(tmp_path / "o.pth"), "--model", "resnet20"]), "would expand"
    )
    assert snapshot(tmp_path) == before


def test_the_files_torch_writes_are_not_refused(tmp_path):
    model = create_model("resnet20")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    save_weights(model, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        assert load_weights(create_model("resnet20"), tmp_path / name).loaded == len(model.state_dict())
