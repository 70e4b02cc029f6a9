"""`resnets predict` and `resnets.predict.predict`: images prepared as the training run's test
images were, the top classes named as the run named them, unreadable images reported one by one."""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest
import torch
from cli_checks import assert_one_error_line, run_cli
from PIL import Image
from test_export import DIGITS_INFO, digits_run, trained_like

from resnets import create_model
from resnets.checkpoint import save_model_file
from resnets.cli import main
from resnets.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 1-channel digits run and a folder of images: grey 32x32 ones (the size the run was
    trained at), an RGB one of another size and shape, and a file that is no image."""
    root = tmp_path_factory.mktemp("predict")
    model, run = digits_run(root / "run")
    images = root / "images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(images / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8), "RGB").save(
        images / "more" / "rgb.png"
    )
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return model, run, images


def expected_probs(model, pixels: np.ndarray) -> torch.Tensor:
    """Softmax of the model's logits on uint8 (N, 32, 32) grey pixels, normalised by hand with
    the run's mean and std."""
    x = (torch.from_numpy(pixels.copy()).float()[:, None] / 255 - DIGITS_INFO["mean"][0]) / DIGITS_INFO[
        "std"
    ][0]
    with torch.no_grad():
        return model(x).softmax(1)


def test_top_classes_are_the_models_on_the_runs_preprocessing(digits):
    model, run, images = digits
    results = predict(run, [images / f"{i}.png" for i in range(5)], top=3, batch_size=2)
    pixels = np.stack([np.asarray(Image.open(images / f"{i}.png")) for i in range(5)])  # 32x32 as they are
    probs = expected_probs(model, pixels)
    for r, p in zip(results, probs):
        best = p.topk(3)
        assert [t["index"] for t in r["top"]] == best.indices.tolist()
        assert [t["class"] for t in r["top"]] == [DIGITS_INFO["classes"][i] for i in best.indices]
        assert np.allclose([t["prob"] for t in r["top"]], best.values.numpy(), atol=1e-5)
    assert [r["image"] for r in results] == [str(images / f"{i}.png") for i in range(5)]


def test_another_size_is_resized_and_cropped_and_rgb_turns_grey(digits):
    model, run, images = digits
    (r,) = predict(run, images / "more" / "rgb.png", top=10)
    # 40 wide, 50 high: the shorter side to 32 (32 x 40), then the centre 32 x 32 rows 4..36.
    im = Image.open(images / "more" / "rgb.png").convert("L").resize((32, 40), Image.BILINEAR)
    pixels = np.asarray(im.crop((0, 4, 32, 36)))[None]
    probs = expected_probs(model, pixels)[0]
    got = torch.zeros(10)
    for t in r["top"]:
        got[t["index"]] = t["prob"]
    assert torch.allclose(got, probs, atol=1e-5)


def test_cli_json_lines_with_a_broken_image(digits, capsys):
    model, run, images = digits
    code = main(["predict", "--checkpoint", str(run), str(images), "--json", "--top", "2", "--quiet"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    names = [f"{i}.png" for i in range(5)] + ["more/rgb.png"]  # sorted, at every depth
    assert code == 1 and [r["image"] for r in rows] == [str(images / n) for n in names]
    assert all(len(r["top"]) == 2 and r["top"][0]["class"] in DIGITS_INFO["classes"] for r in rows)
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith(f"error: cannot read image {images / 'broken.png'}")
    assert lines[1] == "error: 1 of 7 images could not be read"


def test_cli_table(digits, capsys):
    model, run, images = digits
    assert main(["predict", "--checkpoint", str(run / "model.safetensors"), str(images / "0.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["image", "top-1", "top-2", "top-3", "top-4", "top-5"]
    (best,) = predict(run, images / "0.png", top=1)
    cell = f"{best['top'][0]['class']} ({best['top'][0]['prob']:.3f})"
    assert len(out) == 3 and out[2].startswith(str(images / "0.png")) and cell in out[2]


def test_deployed_model_predicts_the_same(digits, monkeypatch):
    # deploy(compile=False): BN folded, channels-last, conv paths timed, and the last batch padded
    # to the first one's shape; compiling (tens of seconds here) is checked in the slow test below.
    module = sys.modules["resnets.deploy"]  # the package's `resnets.deploy` is the function
    monkeypatch.setattr(module, "deploy", functools.partial(module.deploy, compile=False))
    _, run, images = digits
    files = [images / f"{i}.png" for i in range(5)]
    plain = predict(run, files, top=3, batch_size=2)
    deployed = predict(run, files, top=3, batch_size=2, deploy=True)
    for a, b in zip(plain, deployed):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert np.allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-4)


@pytest.mark.slow
def test_cli_deploy_compiles_and_predicts_the_same(digits, capsys):
    _, run, images = digits
    argv = ["predict", "--checkpoint", str(run), str(images / "0.png"), str(images / "1.png"), "--json"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--deploy"]) == 0
    deployed = capsys.readouterr().out
    for a, b in zip(plain.splitlines(), deployed.splitlines()):
        a, b = json.loads(a), json.loads(b)
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]


def test_a_model_object_and_pil_images(digits):
    model, _, images = digits
    im = Image.open(images / "0.png")
    (r,) = predict(model, im, top=1)  # its own data config: CIFAR statistics, averaged to one channel
    assert r["image"] == "<image 0>" and r["top"][0]["class"] in [str(i) for i in range(10)]


def test_cli_mistakes_are_one_line(digits, tmp_path):
    _, run, images = digits
    odd = create_model("resnet20", in_chans=2)
    save_model_file(tmp_path / "two.safetensors", trained_like(odd, 32), {"image_size": 32})
    img = str(images / "0.png")
    for argv, needle in [
        (["predict", "--checkpoint", str(tmp_path / "nope"), img], "does not exist"),
        (["predict", "--checkpoint", str(tmp_path), img], "without model.safetensors or last.ckpt"),
        (["predict", "--checkpoint", str(run), img, "--top", "0"], "--top must be at least 1"),
        (["predict", "--checkpoint", str(run), img, "--batch-size", "0"], "--batch-size must be between"),
        (["predict", "--checkpoint", str(run), img, "--device", "banana"], "is not a device"),
        (["predict", "--checkpoint", str(tmp_path / "two.safetensors"), img], "takes 2-channel input"),
        (["predict", img], "--checkpoint"),
    ]:
        code, err = run_cli(argv)
        assert_one_error_line(code, err, needle)
