"""Loading, saving and converting weight files: layouts, wrappers, formats, and bad input."""

from __future__ import annotations

import builtins
import warnings

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resnets import WeightsError, create_model, load_model, load_weights, save_weights
from resnets.cli import main
from resnets.convert import from_ours
from resnets.weights import detect_layout, group_keys

pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random, so a tensor loaded into the wrong place cannot go unnoticed.

    Weights are scaled by their fan-in and BN statistics stay in [0.5, 1.5], so logits stay finite.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.ndim > 1:
                v.copy_(torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5)
            elif v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    return model.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def write(obj, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


# Small nets (shallow overrides) of each kind of layout; keys, not sizes, are under test.
SMALL = {
    "resnet18": dict(),
    "resnet18d": dict(stem="deep", shortcut="avgdown"),  # timm's resnet18d: deep stem, avg-down
    "res2net50_v1b_26w_4s": dict(depths=(1, 1, 1, 1)),
    "iresnet50": dict(depths=(3, 2, 2, 2)),  # bn0, max-pool shortcuts
    "preact_resnet18": dict(),
}


def small(name: str) -> torch.nn.Module:
    return create_model("resnet18" if name == "resnet18d" else name, **SMALL[name])


CASES = [  # (model, layout written, wrapper, file suffix, layout detected)
    ("resnet18", "torchvision", "plain", ".pth", "torchvision"),
    ("resnet18", "torchvision", "dataparallel", ".pt", "torchvision"),
    ("resnet18", "mmpretrain", "state_dict", ".pth", "mmpretrain"),
    ("resnet18d", "timm", "model", ".bin", "timm"),
    ("resnet18d", "mmpretrain", "state_dict", ".pth", "mmpretrain"),
    # timm's res2net* keys are the official Res2Net's, and are reported under that name.
    ("res2net50_v1b_26w_4s", "timm", "model", ".bin", "res2net_official"),
    ("res2net50_v1b_26w_4s", "mmpretrain", "state_dict", ".pth", "mmpretrain"),
    ("iresnet50", "iresnet_official", "dataparallel", ".pth", "iresnet_official"),
    ("preact_resnet18", "timm_resnetv2", "lightning", ".safetensors", "timm_resnetv2"),
    ("preact_resnet18", "resnets", "plain", ".safetensors", "resnets"),
]


def wrap(sd: dict, wrapper: str) -> dict:
    if wrapper == "dataparallel":
        return {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 90}
    if wrapper == "lightning":  # flattened into one dict for safetensors
        return {f"model.{k}": v for k, v in sd.items()}
    if wrapper in ("state_dict", "model"):
        return {wrapper: sd, "meta": {"epoch": 3}}
    return sd


@pytest.mark.parametrize("name,layout,wrapper,suffix,detected", CASES)
def test_load_weights_recognises_layout_and_wrapper(tmp_path, name, layout, wrapper, suffix, detected):
    src = randomized(small(name))
    path = tmp_path / f"w{suffix}"
    write(wrap(from_ours(src.state_dict(), layout, src.spec), wrapper), path)
    dst = small(name)
    report = load_weights(dst, path)
    assert report.layout == detected
    assert report.loaded == len(dst.state_dict()) and not report.missing and not report.mismatched
    assert_same_state(src, dst)


def test_loaded_torchvision_file_gives_torchvision_logits(tmp_path):
    tv = randomized(torchvision.models.resnet18(weights=None), seed=1)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = create_model("resnet18")
    load_weights(ours, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (tv(x) - ours.eval()(x)).abs().max() <= 1e-4 * tv(x).abs().max()


def test_save_weights_and_load_model_rebuild_the_model(tmp_path):
    model = randomized(create_model("resnet20", num_classes=7))
    save_weights(model, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.name == "resnet20" and back.spec == model.spec and not back.training
    assert_same_state(model, back)
    with pytest.raises(WeightsError, match="safetensors"):
        save_weights(model, tmp_path / "m.pth")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="does not record which model"):
        load_model(tmp_path / "plain.pth")


def test_other_classifier_size_needs_strict_false_and_keeps_the_fresh_head():
    src = randomized(create_model("resnet20"))
    dst = create_model("resnet20", num_classes=4)
    fresh_head = dst.head.fc.weight.detach().clone()
    with pytest.raises(WeightsError, match=r"head\.fc\.weight .*strict=False"):
        load_weights(dst, src.state_dict())
    with pytest.warns(UserWarning, match=r"classifier \(head\.fc\) keeps its fresh initialisation"):
        report = load_weights(dst, src.state_dict(), strict=False)
    assert [k for k, *_ in report.mismatched] == ["head.fc.weight", "head.fc.bias"]
    assert torch.equal(dst.head.fc.weight, fresh_head)
    sd_src, sd_dst = src.state_dict(), dst.state_dict()
    assert all(torch.equal(sd_src[k], sd_dst[k]) for k in sd_dst if not k.startswith("head.fc."))


def test_another_architecture_is_one_readable_error():
    resnet18 = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(WeightsError) as err:
        load_weights(create_model("resnet50"), resnet18)
    msg = str(err.value)
    assert "layout detected: torchvision" in msg and "missing 198" in msg and "shape conflicts" in msg
    assert "\n" not in msg and len(msg) < 2000  # grouped, not one line per key
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    with pytest.raises(WeightsError, match="no known ResNet layout"):
        load_weights(create_model("resnet18"), mobilenet)
    with pytest.raises(WeightsError, match="no known ResNet layout"):  # strict=False loads nothing either
        load_weights(create_model("resnet18"), mobilenet, strict=False)


def test_group_keys_compresses_a_stage_pattern():
    keys = [f"stages.{s}.{i}.bn0.{t}" for s in range(4) for i in range(2, 6) for t in ("weight", "bias")]
    assert group_keys(keys) == "stages.{0-3}.{2-5}.bn0.{weight,bias} (32 keys)"


def test_detect_layout_names_each_layout_from_keys_alone():
    def keys(name, layout, **kw):
        with torch.device("meta"):
            model = create_model(name, **kw)
        return from_ours(model.state_dict(), layout, model.spec)

    assert detect_layout(keys("resnet50", "torchvision")) == "torchvision"
    assert detect_layout(keys("resnet50", "timm", stem="deep", shortcut="avgdown")) == "timm"
    assert detect_layout(keys("res2net50_26w_4s", "res2net_official")) == "res2net_official"
    assert detect_layout(keys("iresnet50", "iresnet_official")) == "iresnet_official"
    assert detect_layout(keys("preact_resnet50", "timm_resnetv2")) == "timm_resnetv2"
    assert detect_layout(keys("resnet50", "mmpretrain")) == "mmpretrain"
    assert detect_layout(keys("resnet50", "resnets")) == "resnets"
    assert detect_layout({"features.0.weight": torch.zeros(1)}) is None


# --- bad files: a clear exception from the API, one `error:` line and exit 2 from the CLI ------


class RunsCode:
    """Unpickling this calls open(path, "w"): a side effect a test can look for."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, capsys, legacy):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save(
        {"conv1.weight": torch.zeros(1), "x": RunsCode(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(WeightsError, match=r"refusing to load .*references io\.open"):
        load_weights(create_model("resnet20"), path)
    assert "refusing" in cli_error(
        capsys, "convert", str(path), str(tmp_path / "out.pth"), "--model", "resnet20"
    )
    assert not marker.exists()
    # The file is a working exploit: a full unpickler does run it.
    control = tmp_path / "control.pth"
    torch.save({"x": RunsCode(tmp_path / "control_ran")}, control)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(control, weights_only=False)
    assert (tmp_path / "control_ran").exists()


def test_unreadable_files(tmp_path, capsys):
    model = randomized(create_model("resnet20"))
    torch.save(model.state_dict(), tmp_path / "good.pth")
    save_weights(model, tmp_path / "good.safetensors")
    cases = {
        "truncated.pth": (tmp_path / "good.pth").read_bytes()[:5000],
        "truncated.safetensors": (tmp_path / "good.safetensors").read_bytes()[:5000],
        "random.pth": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        "empty.pt": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    for name in [*cases, "missing.pth"]:
        path = tmp_path / name
        with pytest.raises(WeightsError, match=name):
            load_weights(create_model("resnet20"), path)
        assert name in cli_error(
            capsys, "convert", str(path), str(tmp_path / "out.pth"), "--model", "resnet20"
        )


def test_cli_convert_rejects_other_architectures_and_unknown_names(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    out = str(tmp_path / "out.safetensors")
    assert "layout detected: torchvision" in cli_error(
        capsys, "convert", str(tmp_path / "r18.pth"), out, "--model", "resnet34"
    )
    assert "--model" in cli_error(capsys, "convert", str(tmp_path / "r18.pth"), out)
    assert "unknown model" in cli_error(
        capsys, "convert", str(tmp_path / "r18.pth"), out, "--model", "resnet19"
    )
    assert ".txt" in cli_error(
        capsys, "convert", str(tmp_path / "r18.pth"), str(tmp_path / "o.txt"), "--model", "resnet18"
    )
    assert not (tmp_path / "out.safetensors").exists()


# --- the CLI round trip: into our layout and back out to the reference's ------------------------


def test_cli_convert_torchvision_to_ours_and_back(tmp_path, capsys):
    tv = randomized(torchvision.models.resnet18(weights=None, num_classes=5), seed=2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "tv.pth")
    assert (
        main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "ours.safetensors"), "--model", "resnet18"])
        == 0
    )
    ours = load_model(tmp_path / "ours.safetensors")  # the name and the 5 classes travel in the file
    assert ours.name == "resnet18" and ours.num_classes == 5
    assert (
        main(
            ["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "back.pth"), "--to", "torchvision"]
        )
        == 0
    )
    assert "torchvision" in capsys.readouterr().out
    back = torchvision.models.resnet18(weights=None, num_classes=5)
    back.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True))  # strict
    assert_same_state(tv, back)


def test_cli_convert_preact_to_timm_resnetv2(tmp_path):
    import timm

    ours = randomized(create_model("preact_resnet18"), seed=3)
    save_weights(ours, tmp_path / "ours.safetensors")
    assert (
        main(["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "t.safetensors"), "--to", "timm"])
        == 0
    )
    ref = timm.create_model("resnetv2_18", pretrained=False)
    load = load_weights(create_model("preact_resnet18"), tmp_path / "t.safetensors")
    assert load.layout == "timm_resnetv2"
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(tmp_path / "t.safetensors"))  # strict: timm accepts the file
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ref.eval()(x) - ours(x)).abs().max() <= 1e-4 * ours(x).abs().max()
