"""Grad-CAM: it follows what the model can see, and reduces to CAM for a pooled linear head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resnets.analysis import gradcam
from resnets.analysis.grad_cam import centre_share, grad_cam, mass_share

DATA = Path("data/cifar10-jpeg")


class HalfSighted(nn.Module):
    """Sees only one half of the image: the input is masked, then cut into non-overlapping 2x2
    patches, so each feature column covers exactly two input columns."""

    def __init__(self, side: str, size: int = 16):
        super().__init__()
        mask = torch.zeros(1, 1, size, size)
        if side == "left":
            mask[..., : size // 2] = 1
        elif side == "right":
            mask[..., size // 2 :] = 1
        else:
            mask[:] = 1
        self.register_buffer("mask", mask)
        self.patch = nn.Conv2d(3, 8, 2, stride=2, bias=False)
        self.features = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False), nn.ReLU())
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():  # class 0 is evidence from every feature: its map is positive where A > 0
            self.fc.weight[0].uniform_(0.5, 1.0)

    def forward(self, x):
        return self.fc(self.features(self.patch(x * self.mask)).mean((2, 3)))


@pytest.mark.parametrize("side,empty", [("left", slice(4, 8)), ("right", slice(0, 4))])
def test_no_mass_where_the_model_cannot_see(side, empty):
    torch.manual_seed(0)
    model = HalfSighted(side)
    cams, target, _ = grad_cam(model, torch.randn(6, 3, 16, 16), model.features, target=0)
    assert cams.shape == (6, 8, 8) and target.tolist() == [0] * 6
    assert cams[:, :, empty].abs().max() == 0
    assert (cams.sum((1, 2)) > 0).all()  # the seen half carries all of it
    seen = slice(0, 4) if side == "left" else slice(4, 8)
    assert mass_share(cams, seen).tolist() == pytest.approx([1.0] * 6)


def test_a_model_that_sees_everything_puts_mass_on_both_halves():
    # The control: the same architecture without the mask does use the right half.
    torch.manual_seed(0)
    model = HalfSighted("both")
    cams, _, _ = grad_cam(model, torch.randn(6, 3, 16, 16), model.features, target=0)
    assert (mass_share(cams, slice(4, 8)) > 0.2).all()


def test_equals_cam_for_global_pooling_and_a_linear_head():
    # For logits = W mean(A), dy/dA_c = W[t, c] / (h w) everywhere: Grad-CAM is CAM / (h w).
    torch.manual_seed(0)
    model = HalfSighted("both")
    x = torch.randn(4, 3, 16, 16)
    cams, target, probs = grad_cam(model, x, model.features)
    with torch.no_grad():
        acts = model.features(model.patch(x))
        logits = model(x)
    w = model.fc.weight[target]  # (N, C)
    expected = torch.relu((w[:, :, None, None] * acts).sum(1)) / 64
    assert torch.allclose(cams, expected, atol=1e-6)
    assert target.tolist() == logits.argmax(1).tolist()
    assert torch.allclose(probs, logits.softmax(1).max(1).values)


def _write_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    paths = []
    for i in range(n):
        arr = (torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def test_study_on_image_files(tmp_path):
    paths = _write_images(tmp_path, 3)
    r = gradcam(["resnet20", "plain20"], images=paths, stage=1, out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "gradcam.json").read_text())
    assert list(saved["models"]) == ["resnet20", "plain20"]
    # Stage 1 of a CIFAR net works at 16x16 on the 32x32 crop of each image.
    assert r["models"]["resnet20"]["map_size"] == [16, 16]
    assert torch.tensor(saved["models"]["plain20"]["maps"]).shape == (3, 16, 16)
    assert (tmp_path / "out" / "gradcam.png").exists()


@pytest.mark.skipif(not DATA.exists(), reason="CIFAR-10 image tree not extracted into data/cifar10-jpeg")
def test_study_on_cifar_test_images(tmp_path):
    r = gradcam(["resnet20"], data_dir=DATA, num_images=3, out_dir=tmp_path)
    assert r["labels"] == ["airplane", "automobile", "bird"]  # one class after another
    assert 0.0 <= r["models"]["resnet20"]["accuracy"] <= 1.0


def test_checkpoint_rows_use_the_runs_classes_and_normalisation(tmp_path):
    from resnets import create_model
    from resnets.checkpoint import save_model_file

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3).eval()
    classes = ["cat", "dog", "frog"]
    for run in ("resnet20", "long-run"):
        (tmp_path / run).mkdir()
        save_model_file(
            tmp_path / run / "model.safetensors",
            model,
            {"classes": classes, "mean": [0.5] * 3, "std": [0.2] * 3},
        )
    paths = _write_images(tmp_path, 2)
    r = gradcam(checkpoints=[str(tmp_path / "resnet20"), str(tmp_path / "long-run")], images=paths)
    # A run folder named after its model adds nothing to the label; another name tells runs apart.
    assert list(r["models"]) == ["resnet20", "resnet20 (long-run)"]
    a, b = r["models"].values()
    assert set(a["predicted"]) <= set(classes) and a["maps"] == b["maps"]  # same weights, same maps
    # The run's own normalisation is used: the prediction matches the model on (x/255 - 0.5) / 0.2.
    from resnets.analysis.inputs import load_images

    x = (load_images(paths, 32).float() / 255 - 0.5) / 0.2
    with torch.no_grad():
        expected = [classes[i] for i in model(x).argmax(1).tolist()]
    assert a["predicted"] == expected


def test_centre_share_of_uniform_and_centred_maps():
    uniform = torch.ones(1, 8, 8)
    centred = torch.zeros(1, 8, 8)
    centred[0, 2:6, 2:6] = 1
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1
    assert centre_share(torch.cat([uniform, centred, corner])).tolist() == [0.25, 1.0, 0.0]
