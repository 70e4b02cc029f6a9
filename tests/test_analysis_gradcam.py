"""Grad-CAM: it follows what the model can see, and reduces to CAM for a pooled linear head;
deletion / insertion (Petsiuk et al. 2018) rank a map that points at the evidence above a random one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resnets.analysis import gradcam
from resnets.analysis.grad_cam import (
    auc,
    centre_share,
    deletion_insertion,
    faithfulness,
    gaussian_blur,
    grad_cam,
    mass_share,
    metric_test_images,
    perturbation_curves,
    random_maps,
    salience_order,
    table,
)

pytestmark = pytest.mark.usefixtures("one_thread")

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
    r = gradcam(["resnet20", "plain20"], images=paths, stage=1, out_dir=tmp_path / "out", steps=4)
    saved = json.loads((tmp_path / "out" / "gradcam.json").read_text())
    assert list(saved["models"]) == ["resnet20", "plain20"]
    # Stage 1 of a CIFAR net works at 16x16 on the 32x32 crop of each image.
    assert r["models"]["resnet20"]["map_size"] == [16, 16]
    assert torch.tensor(saved["models"]["plain20"]["maps"]).shape == (3, 16, 16)
    assert (tmp_path / "out" / "gradcam.png").exists()
    # The metric scores the same files: per-image AUCs, mean curves of steps + 1 points, paired
    # differences from the first model.
    assert saved["metric"]["images"] == ["img0.png", "img1.png", "img2.png"]
    m = saved["models"]["plain20"]["metric"]
    assert len(m["deletion"]["per_image"]) == 3 and len(m["random"]["insertion"]["curve"]) == 5
    assert m["deletion"]["mean"] == pytest.approx(sum(m["deletion"]["per_image"]) / 3)
    gains = [r - d for r, d in zip(m["random"]["deletion"]["per_image"], m["deletion"]["per_image"])]
    assert m["deletion_gain"]["per_image"] == pytest.approx(gains)
    a = saved["models"]["resnet20"]["metric"]
    diff = saved["metric"]["versus_first"]["plain20"]
    assert diff["reference"] == "resnet20"
    assert diff["insertion"]["mean"] == pytest.approx(m["insertion"]["mean"] - a["insertion"]["mean"])
    header, rows = table(r)
    assert (
        header[7].startswith("deletion AUC") and rows[-2][0] == "minus resnet20" and rows[-1][0] == "plain20"
    )


def test_metric_can_be_skipped(tmp_path):
    r = gradcam(["resnet20"], images=_write_images(tmp_path, 2), metric_images=0)
    assert "metric" not in r and "metric" not in r["models"]["resnet20"]
    assert len(table(r)[0]) == 7  # the table of maps alone


@pytest.mark.skipif(not DATA.exists(), reason="CIFAR-10 image tree not extracted into data/cifar10-jpeg")
def test_study_on_cifar_test_images(tmp_path):
    r = gradcam(["resnet20"], data_dir=DATA, num_images=3, out_dir=tmp_path, metric_images=12, steps=4)
    assert r["labels"] == ["airplane", "automobile", "bird"]  # one class after another
    assert 0.0 <= r["models"]["resnet20"]["accuracy"] <= 1.0
    assert len(r["metric"]["images"]) == 12 and 0.0 <= r["models"]["resnet20"]["metric"]["accuracy"] <= 1.0


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
    # Two runs of one model are grouped (as runs of several training seeds would be): the same
    # weights on the same images and random maps give the same AUCs, so no spread between runs.
    group = r["metric"]["by_model"]["resnet20"]
    assert group["runs"] == ["resnet20", "resnet20 (long-run)"]
    assert (
        group["insertion"]["std"] == 0
        and group["deletion_gain"]["mean"] == a["metric"]["deletion_gain"]["mean"]
    )
    assert table(r)[1][-1][:2] == ["resnet20", "2"]
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


# --- Deletion and insertion ----------------------------------------------------------------------


def test_auc_is_the_trapezoid_over_the_fraction():
    curves = torch.tensor(
        [
            [1.0, 0.5, 0.0],  # a straight line from 1 to 0: 1/2
            [0.3, 0.3, 0.3],  # a constant: itself
            [1.0, 0.0, 0.0],  # a drop to 0 within the first half: half of that half
            [0.0, 0.25, 0.5],
        ]
    )
    assert auc(curves).tolist() == pytest.approx([0.5, 0.3, 0.25, 0.25])
    step = torch.tensor([[1.0] + [0.0] * 16])  # 16 steps, gone after the first
    assert auc(step).item() == pytest.approx(1 / 32)


class RegionDetector(nn.Module):
    """Class 0's logit is `gain` times the correlation of an 8x8 region with a checkerboard (1 for
    an image that holds the checkerboard there); the other nine logits are 0. Zeroing the region
    or blurring it (the checkerboard is the highest frequency there is) removes all the evidence:
    the probability of class 0 is then exactly 1/10."""

    def __init__(self, size: int = 32, region: slice = slice(12, 20), gain: float = 5.0):
        super().__init__()
        n = region.stop - region.start
        board = (torch.arange(n)[:, None] + torch.arange(n)[None, :]) % 2 * 2.0 - 1
        weight = torch.zeros(3, size, size)
        weight[:, region, region] = board / (3 * n * n)
        self.register_buffer("weight", weight)
        self.gain = gain

    def forward(self, x):
        score = self.gain * (x * self.weight).sum((1, 2, 3))
        return torch.cat([score[:, None], torch.zeros(len(x), 9)], 1)

    def images(self, n: int, seed: int = 0) -> torch.Tensor:
        torch.manual_seed(seed)
        x = torch.randn(n, 3, 32, 32)
        inside = self.weight != 0
        return torch.where(inside, self.weight.sign(), x)


def _region_map(n: int, inside: bool) -> torch.Tensor:
    m = torch.zeros(n, 32, 32)
    m[:, 12:20, 12:20] = 1
    return m if inside else 1 - m


def test_a_map_on_the_evidence_beats_random_and_its_reverse_loses():
    model = RegionDetector()
    x, target = model.images(6), torch.zeros(6, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    curves = {
        "region": deletion_insertion(model, x, _region_map(6, True), target, 16, generator=gen),
        "reversed": deletion_insertion(model, x, _region_map(6, False), target, 16, generator=gen),
        # Random at 8x8, upsampled as a Grad-CAM map of a CIFAR net's last stage would be.
        "random": deletion_insertion(model, x, random_maps(6, (8, 8), gen), target, 16, generator=gen),
    }
    full = torch.e**5 / (torch.e**5 + 9)  # the intact image's probability of class 0
    region = curves["region"]
    # The region is 64 of 1024 pixels: 1/16 of them, exactly the first step.
    assert region["deletion"][:, 0].tolist() == pytest.approx([full] * 6)
    assert region["deletion"][:, 1:].flatten().tolist() == pytest.approx([0.1] * 6 * 16)
    # Blurred: the checkerboard is gone, only the noise around it bleeds in a little.
    assert region["insertion"][:, 0].tolist() == pytest.approx([0.1] * 6, abs=1e-3)
    assert region["insertion"][:, 1:].flatten().tolist() == pytest.approx([full] * 6 * 16, abs=1e-6)
    d = {k: auc(v["deletion"]) for k, v in curves.items()}
    i = {k: auc(v["insertion"]) for k, v in curves.items()}
    assert d["region"].tolist() == pytest.approx([0.1 + (full - 0.1) / 32] * 6)
    assert i["region"].tolist() == pytest.approx(d["reversed"].tolist(), abs=1e-3)
    # Deleting the region first is the fastest fall there is and deleting it last the slowest, so
    # every random map lies between; coarse random blobs sometimes hit the region, so the spread
    # over images is wide, but on average random is far from both ends.
    assert (d["region"] + 0.1 < d["random"]).all() and (d["random"] < d["reversed"]).all()
    assert (i["reversed"] + 0.05 < i["random"]).all() and (i["random"] + 0.1 < i["region"]).all()
    assert d["random"].mean() - d["region"].mean() > 0.3 and d["reversed"].mean() - d["random"].mean() > 0.2
    assert i["region"].mean() - i["random"].mean() > 0.3 and i["random"].mean() - i["reversed"].mean() > 0.2


def test_batching_gives_the_numbers_of_one_image_at_a_time():
    from resnets import create_model
    from resnets.analysis.common import calibrate_bn

    torch.manual_seed(0)
    model = create_model("resnet20")
    x = torch.randn(3, 3, 32, 32)
    calibrate_bn(model, torch.randn(16, 3, 32, 32))
    order = salience_order(torch.rand(3, 32, 32), torch.Generator().manual_seed(1))
    target = torch.tensor([0, 4, 9])
    start, finish = x, gaussian_blur(x, 2.0)
    together = perturbation_curves(model, start, finish, order, target, steps=4, batch_size=15)
    one_by_one = torch.cat(
        [
            perturbation_curves(
                model, start[j : j + 1], finish[j : j + 1], order[j : j + 1], target[j : j + 1], 4, 1
            )
            for j in range(3)
        ]
    )
    assert torch.allclose(together, one_by_one, atol=1e-6)
    # Step 0 is the start image, the last step the finish image.
    with torch.no_grad():
        p_start = model(start).softmax(1).gather(1, target[:, None])[:, 0]
        p_finish = model(finish).softmax(1).gather(1, target[:, None])[:, 0]
    assert torch.allclose(together[:, 0].float(), p_start, atol=1e-6)
    assert torch.allclose(together[:, -1].float(), p_finish, atol=1e-6)
    # Chunks that split images' steps across forward passes change nothing either.
    assert torch.allclose(perturbation_curves(model, start, finish, order, target, 4, 7), together, atol=1e-6)


def test_random_maps_are_reproducible_with_the_seed():
    from resnets import create_model
    from resnets.analysis.common import calibrate_bn

    torch.manual_seed(0)
    model = create_model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    calibrate_bn(model, x)
    runs = [faithfulness(model, x, model.stages[-1], steps=4, seed=s) for s in (3, 3, 4)]
    for kind in ("deletion", "insertion"):
        assert runs[0]["random"][kind]["per_image"] == runs[1]["random"][kind]["per_image"]
        assert runs[0]["random"][kind]["per_image"] != runs[2]["random"][kind]["per_image"]
        # The Grad-CAM map itself does not depend on the seed (only its ties' order could).
        assert runs[0][kind]["per_image"] == pytest.approx(runs[2][kind]["per_image"], abs=1e-6)
    assert torch.equal(random_maps(2, (8, 8), torch.Generator().manual_seed(5)),
                       random_maps(2, (8, 8), torch.Generator().manual_seed(5)))  # fmt: skip


def test_ties_go_in_random_order():
    # A flat map ranks nothing: its order is a permutation that depends on the generator only.
    flat = torch.zeros(2, 4, 4)
    a = salience_order(flat, torch.Generator().manual_seed(0))
    b = salience_order(flat, torch.Generator().manual_seed(1))
    assert sorted(a[0].tolist()) == list(range(16)) and not torch.equal(a, b)
    # Distinct values come out highest first whatever the generator.
    ramp = torch.arange(16.0).view(1, 4, 4)
    assert salience_order(ramp, torch.Generator().manual_seed(0))[0].tolist() == list(range(15, -1, -1))


def test_blur_keeps_a_constant_image_and_removes_a_checkerboard():
    const = torch.full((1, 3, 32, 32), 0.7)
    assert torch.allclose(gaussian_blur(const, 2.0), const, atol=1e-6)
    board = ((torch.arange(32)[:, None] + torch.arange(32)) % 2 * 2.0 - 1).expand(1, 3, 32, 32)
    assert gaussian_blur(board, 2.0).abs().max() < 1e-3
    assert torch.equal(gaussian_blur(board, 0.0), board)


def test_metric_images_are_drawn_from_the_whole_test_split(cifar_tree):
    # The test split is stored class after class: a random draw must reach all of it.
    pixels, labels, idx = metric_test_images(cifar_tree, 12, seed=0)
    assert pixels.shape == (12, 3, 32, 32) and len(set(idx)) == 12
    assert len(set(labels.tolist())) > 3 and idx != sorted(idx)
    assert metric_test_images(cifar_tree, 12, seed=0)[2] == idx
    assert metric_test_images(cifar_tree, 12, seed=1)[2] != idx
    assert len(metric_test_images(cifar_tree, 500)[2]) == 30  # capped at the split's size


def test_command_line_metric_options(tmp_path, capsys):
    from resnets.cli import main

    paths = _write_images(tmp_path, 2)
    argv = ["analyze", "gradcam", "--model", "resnet20", "--image", *paths, "--steps", "2"]
    code = main([*argv, "--metric-images", "1", "--blur-sigma", "1.5", "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    saved = json.loads((tmp_path / "o" / "gradcam.json").read_text())
    assert code == 0 and "insertion AUC" in captured.out
    # The metric's progress goes to stderr, one line as each model's starts and ends: 2 maps x
    # 2 curves x 3 steps x 1 image.
    assert "resnet20: deletion and insertion on 1 images, 12 forward images" in captured.err
    assert "resnet20: done in" in captured.err
    assert saved["metric"]["images"] == ["img0.png"] and saved["metric"]["blur_sigma"] == 1.5
    assert len(saved["models"]["resnet20"]["metric"]["deletion"]["curve"]) == 3
    assert main([*argv, "--blur-sigma", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "blur sigma" in capsys.readouterr().err


def test_row_labels_split_model_and_run_and_wrap():
    from resnets.analysis.grad_cam import _row_label

    label = "res2net56_26w_4s_cifar (gc_res2net56_26w_4s_cifar_s0)"
    assert _row_label(label).split("\n") == ["res2net56_26w_4s_cifar", "(gc_res2net56_26w_4s_cifar_s0)"]
    long = _row_label("x" * 50, width=20).split("\n")
    assert [len(t) for t in long] == [20, 20, 10]
    assert _row_label("resnet20") == "resnet20"
