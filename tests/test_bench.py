"""`resnets bench`: the reported numbers agree with each other and with the counts; no timing thresholds."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from resnets import count_params_macs
from resnets.bench import (
    BenchError,
    Peer,
    bench_model,
    build_peer,
    count_work,
    format_report,
    peak_memory_mb,
    peer_of,
    plot_report,
    quartiles,
    resolve_names,
    spread,
    summarize,
    time_interleaved,
)
from resnets.cli import main
from resnets.registry import create_model

FAST = dict(min_repeats=3, max_seconds=0.5)


def check_consistent(row: dict) -> None:
    """What any row must satisfy, whatever the timings were."""
    seconds = row["latency_ms"] / 1e3
    assert row["latency_min_ms"] <= row["latency_q1_ms"] <= row["latency_ms"] <= row["latency_q3_ms"]
    assert row["latency_iqr_ms"] == pytest.approx(row["latency_q3_ms"] - row["latency_q1_ms"])
    assert row["images_per_s"] == pytest.approx(row["batch_size"] / seconds)
    assert row["gflops_per_s"] == pytest.approx(row["flops_per_step"] / seconds / 1e9)
    assert row["gmacs"] == pytest.approx(row["macs_per_image"] / 1e9)
    assert row["peak_mem_mb"] >= 0
    if row.get("peer_latency_ms") is not None:
        assert row["ratio"] == pytest.approx(row["latency_ms"] / row["peer_latency_ms"])
        assert row["ratio_paired_median"] > 0


def test_eval_row_matches_the_counts():
    row = bench_model("resnet20", batch_size=3, input_size=16, **FAST)
    check_consistent(row)
    params, macs = count_params_macs("resnet20", 16)
    assert row["params"] == params
    assert row["macs_per_image"] == macs
    assert row["flops_per_step"] == 2 * macs * 3
    # RegNet's activations: every conv output. resnet20 at 16x16 (option A: no shortcut convs):
    # stem 16x16x16, then 6 convs each at 16x16x16, 32x8x8 and 64x4x4.
    assert row["activations_per_image"] == 16 * 256 + 6 * (16 * 256 + 32 * 64 + 64 * 16)
    assert row["repeats"] >= 3
    assert (row["mode"], row["dtype"], row["deploy"], row["input_size"]) == ("eval", "float32", False, 16)


def test_training_step_counts_the_backward_pass():
    row = bench_model("resnet20", batch_size=2, input_size=16, mode="train", **FAST)
    check_consistent(row)
    forward = 2 * row["macs_per_image"] * 2
    # Backward is about twice the forward; the first conv needs no input gradient, so a bit under 3x.
    assert 2.5 < row["flops_per_step"] / forward < 3.0


def test_count_work_matches_complexity_and_leaves_weights_alone():
    model = create_model("resnet18")
    before = model.stem.conv.weight.clone()
    flops, acts = count_work(model, torch.zeros(1, 3, 32, 32), train=False)
    assert flops == 2 * count_params_macs(model, 32)[1]
    assert acts > 0
    assert torch.equal(model.stem.conv.weight, before)


def test_peer_runs_with_the_same_weights():
    row = bench_model("resnet18", input_size=32, peers=True, **FAST)
    check_consistent(row)
    assert row["peer"] == "torchvision.resnet18"
    assert row["same_weights"] is True
    assert row["peer_max_abs_diff"] < 1e-4
    assert row["peer_dtype"] == "float32"


def test_preact_peer_is_timm_resnetv2_with_the_same_weights():
    row = bench_model("preact_resnet50", input_size=32, peers=True, **FAST)
    assert row["peer"] == "timm.resnetv2_50"
    assert row["same_weights"] is True
    assert row["peer_max_abs_diff"] < 1e-4


def test_model_without_peer_has_no_ratio():
    row = bench_model("resnet20", input_size=16, peers=True, **FAST)
    assert row["peer"] is None
    assert "ratio" not in row


@pytest.mark.parametrize(
    ("name", "peer"),
    [
        ("resnet50", Peer("torchvision", "resnet50", "torchvision")),
        ("resnext50_32x4d", Peer("torchvision", "resnext50_32x4d", "torchvision")),
        ("wide_resnet50_2", Peer("torchvision", "wide_resnet50_2", "torchvision")),
        ("res2net50_26w_4s", Peer("timm", "res2net50_26w_4s", "timm")),
        ("res2next50", Peer("timm", "res2next50", "timm")),
        ("res2net50_v1b_26w_4s", Peer("timm", "res2net50d", "timm")),
        ("preact_resnet50", Peer("timm", "resnetv2_50", "timm_resnetv2")),
        ("resnet56", None),
        ("resnet50_v1", None),
        ("iresnet50", None),
    ],
)
def test_peer_map(name, peer):
    assert peer_of(name) == peer


def test_missing_peer_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(BenchError, match="pip install timm"):
        build_peer(Peer("timm", "res2net50_26w_4s", "timm"))


def test_bench_deploy_row(monkeypatch):
    # The compile itself is tested in test_deploy; here a failing compile takes the fast fallback.
    def broken_compile(*args, **kwargs):
        raise RuntimeError("compile unavailable")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="compile unavailable"):
        row = bench_model("resnet20", batch_size=2, input_size=16, deploy=True, backend="inductor", **FAST)
    check_consistent(row)
    assert row["deploy"] is True and row["backend"] == "torchscript" and row["compile_s"] > 0
    assert row["deploy_report"]["requested"] == "inductor"
    assert row["deploy_report"]["choices"]["2x3x16x16"]["backend"] == "inductor"
    assert row["deployed_dtype"] == "float32"
    # resnet20 has 11 convs with >= 256 inputs per output; at 16x16, batch 2, each is timed both ways.
    assert row["convs_timed"] == 11 and 0 <= row["convs_as_gemm"] <= 11


def test_interleaving_alternates_the_order_and_respects_min_repeats():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    samples = time_interleaved(fns, torch.device("cpu"), min_repeats=4, rel_spread=math.inf)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(s) for s in samples] == [4, 4]


def test_settling_calls_run_before_each_timed_call_and_are_not_timed():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    samples = time_interleaved(fns, torch.device("cpu"), min_repeats=2, rel_spread=math.inf, settle=2)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert [len(s) for s in samples] == [2, 2]


def test_a_settled_call_is_timed_without_its_settling_calls():
    import time

    slow_first = {"n": 0}

    def fn():  # the first call of each turn (a settling one) is slow, the timed one fast
        slow_first["n"] += 1
        if slow_first["n"] % 2 == 1:
            time.sleep(0.2)

    samples = time_interleaved([fn], torch.device("cpu"), min_repeats=3, max_repeats=3, settle=1)
    assert max(samples[0]) < 0.1  # a timed call that included its settling call would take >= 0.2 s


def test_interleaving_stops_at_max_repeats():
    samples = time_interleaved([lambda: None], torch.device("cpu"), max_repeats=7, rel_spread=-1.0)
    assert len(samples[0]) == 7


def test_statistics():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)
    assert spread([1.0]) == math.inf
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.005])
    assert s["latency_ms"] == pytest.approx(3.0)
    assert s["latency_iqr_ms"] == pytest.approx(2.0)
    assert s["latency_min_ms"] == pytest.approx(1.0)
    assert s["repeats"] == 5


def test_peak_memory_sees_a_large_temporary():
    # 64 MiB written (so resident) and freed inside the call.
    assert peak_memory_mb(lambda: torch.ones(16 * 2**20), torch.device("cpu")) >= 60


def test_resolve_names_patterns_and_order():
    assert resolve_names(["resnet20", "resnet2*", "resnet20"]) == ["resnet20", "resnet200"]
    with pytest.raises(BenchError, match="no model matches"):
        resolve_names(["nosuchnet*"])


def fake_report(with_peer: bool) -> dict:
    row = {
        "name": "resnet20",
        "params": 270_000,
        "gmacs": 0.041,
        "activations_per_image": 190_000,
        "latency_ms": 2.0,
        "latency_iqr_ms": 0.1,
        "images_per_s": 500.0,
        "gflops_per_s": 41.0,
        "peak_mem_mb": 3.0,
    }
    if with_peer:
        row.update(peer="torchvision.resnet18", peer_latency_ms=4.0, ratio=0.5)
    machine = {"cpu": "test cpu", "torch_threads": 2, "gpu": None, "torch": "x", "load_avg_1m": 0.1}
    return {"machine": machine, "settings": {"batch_size": 1}, "results": [row]}


def test_format_report_shows_the_ratio_column_only_with_peers():
    plain = format_report(fake_report(False))
    assert "resnet20" in plain and "ours/peer" not in plain and "test cpu" in plain
    peered = format_report(fake_report(True))
    assert "ours/peer" in peered and "0.500" in peered


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "speed.png"
    plot_report(fake_report(True), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json(capsys):
    assert (
        main(
            ["bench", "resnet20", "--input-size", "16", "--batch-size", "2", "--max-seconds", "0.3", "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert {"cpu", "torch_threads", "torch", "gpu", "load_avg_1m"} <= report["machine"].keys()
    assert report["settings"]["dtype"] == "float32"
    (row,) = report["results"]
    check_consistent(row)
    assert row["batch_size"] == 2


def test_cli_table_and_plot(capsys, tmp_path):
    path = tmp_path / "p.png"
    args = ["bench", "resnet20", "--input-size", "16", "--max-seconds", "0.3", "--plot", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "GFLOP/s" in out
    assert path.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench"], "name at least one model"),
        (["bench", "resnet20", "--device", "cuda"] if not torch.cuda.is_available() else ["bench"], ""),
        (["bench", "resnt20"], "did you mean"),
        (["bench", "resnet20", "--deploy", "--mode", "train"], "inference-only"),
        (["bench", "resnet20", "--input-size", "0"], "--input-size must be positive"),
        (["bench", "resnet20", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["bench", "resnet20", "--plot", "x.pdf"], "PNG"),
        (["bench", "nothing*"], "no model matches"),
    ],
)
def test_cli_user_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert message in err


def test_time_rounds_runs_exactly_that_many_rounds():
    from resnets.bench import time_rounds

    calls = []
    samples = time_rounds(
        [lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"), 4, settle=1
    )
    assert [len(s) for s in samples] == [4, 4] and calls.count("a") == calls.count("b") == 8


@pytest.mark.parametrize("groups", [1, 32])
def test_a_training_step_counts_three_forward_passes_of_a_conv_grouped_or_not(groups):
    from resnets.bench import count_work

    class Two(torch.nn.Module):  # the first conv gets no input gradient (its input needs none)
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
            self.b = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)

        def forward(self, x):
            return self.b(self.a(x))

    x = torch.randn(2, 64, 8, 8)
    forward, _ = count_work(Two(), x, train=False)
    step, _ = count_work(Two(), x, train=True)
    one = 2 * 2 * 64 * 8 * 8 * 64 // groups * 9  # FLOPs of one conv's forward
    assert forward == 2 * one and step == forward + one + 2 * one  # a: weight grad; b: both
