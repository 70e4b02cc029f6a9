"""deploy(): BN folding is exact for every block family, the declared pairs are the real ones."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.fx
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import resnets
from resnets import ResNet, create_model
from resnets.deploy import (
    MAX_GEMM_ROWS,
    MIN_GEMM_DEPTH,
    Deployed,
    GemmConv2d,
    choose_conv_paths,
    conv_as_gemm,
    deploy,
    fold_batchnorm,
    fold_pairs,
    frozen_torchscript,
    low_precision_supported,
)

# One model per block family (and per stem / shortcut variant), at a small input so it runs fast.
FAMILY_MODELS = [
    ("resnet20", 32),  # basic block, CIFAR stem, zero-pad shortcuts (no projection BN)
    ("resnet18", 64),  # basic block, ImageNet stem, projection shortcuts
    ("resnet50", 64),  # bottleneck
    ("resnext50_32x4d", 64),  # grouped bottleneck
    ("preact_resnet18", 64),  # pre-activation basic, BN-free projection
    ("preact_resnet50", 64),  # pre-activation bottleneck
    ("wrn16_4", 32),  # wide pre-activation basic
    ("res2net50_26w_4s", 64),  # split 3x3 convs
    ("res2net50_v1b_26w_4s", 64),  # deep stem + avg-down shortcut
    ("iresnet18", 64),  # iResNet basic: start / middle / end, max-pool shortcut
    ("iresnet50", 64),  # iResNet bottleneck
    ("resgroup50", 64),  # iResNet paper's improved building block: 3x3 groups per stage
    ("iresgroup50", 64),  # the same in iResNet's positions
]


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters far from the identity, so a wrong fold shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(create_model(name)).eval()


def traced_conv_bn_pairs(model: nn.Module) -> set[tuple[str, str]]:
    """(conv, BN) pairs in the traced graph where the BN's only input is a conv used by nothing else."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pairs = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods[src.target], nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.add((src.target, node.target))
    return pairs


def owner(model: nn.Module, path: str) -> str:
    """The closest enclosing module that declares fold pairs (a block, the stem, a shortcut)."""
    parts = path.split(".")
    for k in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:k])
        if hasattr(model.get_submodule(prefix), "fold_pairs"):
            return prefix
    return ""


@pytest.mark.parametrize("name", [n for n, _ in FAMILY_MODELS])
def test_declared_pairs_are_exactly_the_traced_conv_bn_pairs(name):
    # A block that forgets a pair loses speed; one that lists a wrong pair computes something else.
    model = create_model(name).eval()
    declared = fold_pairs(model)
    assert len(declared) == len(set(declared))
    traced = traced_conv_bn_pairs(model)
    across = {(c, b) for c, b in traced if owner(model, c) != owner(model, b)}
    assert set(declared) == traced - across
    # The one pair that spans two modules: a CIFAR pre-act stem (no pool) feeding a first block whose
    # projection reads the normalised input. Folding it would tie the stem to the block; it is one BN.
    if across:
        assert across == {("stem.conv", "stages.0.0.bn1")} and model.spec.block.startswith("preact")


def _force_gemm(monkeypatch, gemm_wins: bool) -> list:
    """Replace the timing by a fixed verdict; returns the list of timed calls."""
    calls = []

    def fake_best_time(fn, other, repeats):
        calls.append(repeats)
        return (0.0, 1.0) if gemm_wins else (1.0, 1.0)

    monkeypatch.setattr(sys.modules["resnets.deploy"], "_best_time", fake_best_time)
    return calls


@pytest.mark.parametrize("convs_as_gemm", [False, True], ids=["timed", "all-gemm"])
@pytest.mark.parametrize(("name", "size"), FAMILY_MODELS)
def test_folded_model_gives_the_same_logits(name, size, convs_as_gemm, monkeypatch):
    if convs_as_gemm:  # every candidate conv as patches + matrix multiply, whatever the timing says
        _force_gemm(monkeypatch, gemm_wins=True)
    model = make(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    fast = deploy(model, compile=False)
    got = fast(x)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    # Logits of order 1 or more make the 1e-4 bound a real test, not a vacuous one.
    assert want.std() > 0.1
    assert (got - want).abs().max().item() <= 1e-4
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_left = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert n_bn - n_left == len(fold_pairs(model)) > 0
    swapped = {m for m in fast.model.modules() if isinstance(m, GemmConv2d)}
    # Grouped convs (ResNeXt) and thin ones (stems) keep the conv kernel; every other conv is a candidate.
    assert swapped == {
        m
        for m in fast.model.modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight[0].numel() >= MIN_GEMM_DEPTH
    }
    first_conv = next(m for m in fast.model.modules() if isinstance(m, nn.Conv2d))  # reads the 3 RGB channels
    assert swapped and not isinstance(first_conv, GemmConv2d)
    if convs_as_gemm:
        assert len(fast.conv_paths) > 0 and all(gemm for _, _, gemm in fast.conv_paths)
        for conv_name, shape, _ in fast.conv_paths:
            assert shape in fast.model.get_submodule(conv_name).gemm_shapes


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "pad", "size", "bias"),
    [
        (8, 16, 3, 1, 1, 7, True),
        (8, 16, 3, 2, 1, 14, False),
        (8, 16, 3, 2, 1, 15, True),  # odd size: the last window stops short of the padded edge
        (16, 8, 1, 1, 0, 7, True),
        (16, 8, 1, 2, 0, 14, True),
        (3, 8, 7, 2, 3, 32, False),  # an ImageNet stem
        (4, 4, 3, 1, 0, 9, True),  # no padding
    ],
)
def test_conv_as_gemm_is_the_convolution(cin, cout, k, stride, pad, size, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=bias).eval()
    x = torch.randn(3, cin, size, size)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = nn.functional.conv2d(x, conv.weight, conv.bias, stride, pad)
        got = conv_as_gemm(x, conv)
    assert got.shape == want.shape and want.abs().max() > 0.5
    assert (got - want).abs().max().item() <= 1e-5
    if channels_last:  # the product comes out channels-last, as the next layer wants it
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_conv_paths_are_timed_once_per_shape_and_keep_the_state_dict(monkeypatch):
    calls = _force_gemm(monkeypatch, gemm_wins=True)
    model = make("resnet20")
    fast = deploy(model, compile=False)
    plain = deploy(model, compile=False, conv_gemm=False)
    assert not any(isinstance(m, GemmConv2d) for m in plain.model.modules())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    fast(x)
    first = len(calls)
    # resnet20: stem + 9 blocks x 2 convs; 11 have >= 256 inputs per output (32- and 64-channel 3x3s).
    assert len(fast.conv_paths) == 11
    # Repeated blocks share a configuration and input shape: each distinct pair is timed once.
    distinct = set()
    for conv_name, shape, _ in fast.conv_paths:
        m = fast.model.get_submodule(conv_name)
        distinct.add((m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, shape))
    assert first == len(distinct) < 11
    fast(x)
    assert len(calls) == first  # same shape: no new timing
    fast(torch.randn(1, 3, 32, 32))
    assert len(calls) > first and len(fast.conv_paths) == 22
    conv = fast.model.get_submodule("stages.2.2.conv2")
    assert conv.gemm_shapes == {(2, 64, 8, 8), (1, 64, 8, 8)}


def test_conv_kernel_kept_where_the_gemm_is_not_faster(monkeypatch):
    _force_gemm(monkeypatch, gemm_wins=False)
    fast = deploy(make("resnet20"), compile=False)
    fast(torch.randn(2, 3, 32, 32))
    assert len(fast.conv_paths) == 11 and not any(gemm for _, _, gemm in fast.conv_paths)
    assert all(not m.gemm_shapes for m in fast.model.modules() if isinstance(m, GemmConv2d))


def test_large_outputs_are_not_timed(monkeypatch):
    calls = _force_gemm(monkeypatch, gemm_wins=True)
    model = deploy(make("resnet20"), compile=False).model
    # The second stage's convs (16x16 outputs) exceed the row limit, the third's (8x8) do not.
    batch = MAX_GEMM_ROWS // (16 * 16) + 1
    chosen = choose_conv_paths(
        model, torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    )
    names = {n for n, _, _ in chosen}
    candidate = model.get_submodule("stages.1.1.conv1")  # 32 channels x 3x3: deep enough to be one
    assert isinstance(candidate, GemmConv2d)
    assert "stages.1.1.conv1" not in names and "stages.2.2.conv2" in names and calls


def test_no_gemm_path_without_channels_last():
    flat = deploy(make("resnet20"), compile=False, channels_last=False)
    assert not any(isinstance(m, GemmConv2d) for m in flat.model.modules())
    flat(torch.randn(1, 3, 32, 32))
    assert flat.conv_paths == []


def test_package_exports_deploy():
    assert resnets.deploy is deploy


def test_every_bn_of_a_post_activation_net_is_folded():
    fast = deploy(make("resnet50"), compile=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert all(m.bias is not None for m in fast.modules() if isinstance(m, nn.Conv2d))


def test_preact_keeps_the_bns_that_precede_convs():
    model = make("preact_resnet50")
    fast = deploy(model, compile=False)
    left = {n for n, m in fast.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # Each block's bn1 (before conv1) and the head's norm (after the last add) stay.
    assert left == {f"stages.{s}.{i}.bn1" for s, d in enumerate((3, 4, 6, 3)) for i in range(d)} | {
        "head.norm"
    }


def test_iresnet_end_block_bn_after_the_add_is_kept():
    fast = deploy(make("iresnet18"), compile=False)
    names = {n for n, m in fast.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # Stage s: block 0 is the start (bn2 folded), block 1 the end (bn2 after the add, kept).
    assert {f"stages.{s}.1.bn2" for s in range(4)} <= names
    assert not any(f"stages.{s}.0.bn2" in names for s in range(4))


def test_deploy_leaves_the_original_untouched():
    model = make("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy(model, compile=False)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.stages[0][0].bn1, nn.BatchNorm2d)


def test_fold_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(create_model("resnet20").train())


def test_folding_twice_is_harmless():
    model = make("resnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    assert fold_batchnorm(model) == len(fold_pairs(model)) > 0
    assert fold_batchnorm(model) == 0
    with torch.no_grad():
        assert (model(x) - want).abs().max().item() <= 1e-4


def test_deployed_model_is_inference_only():
    fast = deploy(make("resnet20"), compile=False)
    assert not fast.training
    assert all(not p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()
    out = fast(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert not out.requires_grad
    assert fast.spec == create_model("resnet20").spec and fast.name == "resnet20"


def test_channels_last_weights():
    fast = deploy(make("resnet20"), compile=False)
    conv = fast.model.stem.conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    flat = deploy(make("resnet20"), compile=False, channels_last=False)
    assert flat.model.stem.conv.weight.is_contiguous()


@pytest.mark.skipif(
    not low_precision_supported(torch.bfloat16, torch.device("cpu")), reason="no native bf16 on this CPU"
)
def test_bfloat16_deploy_returns_float32_logits_close_to_float32():
    model = make("resnet20")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    fast = deploy(model, dtype=torch.bfloat16, compile=False)
    assert fast.model.stem.conv.weight.dtype == torch.bfloat16
    got = fast(x)
    assert got.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: a few percent of the logit scale, not 1e-4.
    rel = (got - want).abs().max() / want.abs().max()
    assert 0 < rel.item() < 0.1


def test_unsupported_low_precision_warns_and_stays_float32(monkeypatch):
    # `resnets.deploy` is the function (the package exports it), so patch the module object.
    monkeypatch.setattr(sys.modules["resnets.deploy"], "low_precision_supported", lambda dtype, device: False)
    with pytest.warns(RuntimeWarning, match="not supported natively"):
        fast = deploy(make("resnet20"), dtype=torch.float16, compile=False)
    assert fast.dtype == torch.float32


def test_frozen_torchscript_fallback_matches():
    model = make("resnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    folded = deploy(model, compile=False).model
    with torch.no_grad():
        got = frozen_torchscript(folded, x.contiguous(memory_format=torch.channels_last))(x)
    assert (got - want).abs().max().item() <= 1e-4


def test_compile_failure_falls_back_to_torchscript(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = make("resnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    fast = deploy(model, backend="inductor")
    assert fast.backend == "pending"
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        got = fast(x)
    assert fast.backend == "torchscript"
    assert (got - want).abs().max().item() <= 1e-4


def test_each_deployment_compiles_its_own_entry_point(monkeypatch):
    # Dynamo's cache and recompile limit (8) are per code object: deployments sharing
    # ResNet.forward's would fall back to eager from the ninth on, silently.
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(fn)
        return fn  # run eagerly: only what was handed to the compiler matters here

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = torch.randn(1, 3, 32, 32)
    for name in ("resnet20", "resnet20", "preact_resnet110"):
        fast = deploy(make(name), backend="inductor")
        fast(x)
        assert fast.backend == "inductor"
    codes = [fn.__code__ for fn in seen]
    assert len(codes) == 3 and len({id(c) for c in codes}) == 3
    assert all(c is not ResNet.forward.__code__ for c in codes)


@pytest.mark.slow
def test_compiled_deploy_matches_eager():
    # Inductor compiles in tens of seconds on a small CPU, so this is a slow test.
    model = make("resnet20")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    fast = deploy(model, backend="inductor")
    got = fast(x)
    assert fast.backend == "inductor"
    assert (got - want).abs().max().item() <= 1e-4
    assert isinstance(fast, Deployed)
    # The compiled graph is filed under the deployment's own entry point, not the shared forward.
    assert len(_debug_get_cache_entry_list(ResNet.forward.__code__)) == 0


def _sleeper(ms: float, calls: list):
    import time

    def fn():
        calls.append(ms)
        time.sleep(ms / 1e3)

    return fn


def test_a_close_race_goes_to_a_runoff_of_the_two_fastest():
    d = sys.modules["resnets.deploy"]  # the package exports deploy(), the function, by that name

    calls: list = []
    fns = {"a": _sleeper(10, calls), "b": _sleeper(10.4, calls), "c": _sleeper(40, calls)}
    medians = d._race(fns, torch.device("cpu"))
    assert min(medians, key=medians.get) == "a" and medians["c"] > 3 * medians["a"]
    count = {ms: calls.count(ms) for ms in (10, 10.4, 40)}
    # Timed and settling calls: c only ran in the first race; a and b also in the runoff.
    assert count[10] == count[10.4] and count[10] >= count[40] + 2 * 3
    assert count[10] <= 2 * (d.AUTO_MAX_ROUNDS + d.AUTO_RUNOFF_ROUNDS)


def test_a_clear_race_has_no_runoff():
    d = sys.modules["resnets.deploy"]  # the package exports deploy(), the function, by that name

    calls: list = []
    fns = {"a": _sleeper(10, calls), "b": _sleeper(20, calls)}  # b is 2x slower, beyond AUTO_CLOSE
    medians = d._race(fns, torch.device("cpu"))
    assert medians["b"] > medians["a"] and calls.count(10) == calls.count(20) <= 2 * d.AUTO_MAX_ROUNDS
