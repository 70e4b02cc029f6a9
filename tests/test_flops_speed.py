"""benchmarks/flops_speed.py: its records agree with the counts and with the engines file it reads,
and a gap is called beyond the noise exactly when the two IQRs do not overlap. No timing thresholds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from resnets import count_params_macs

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "flops_speed.py"
spec = importlib.util.spec_from_file_location("flops_speed", SCRIPT)
flops_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flops_speed)

NETS = ["resnet50", "res2net50_26w_4s"]
# A made-up engines file: ms per batch as [q1, median, q3] for (net, batch, engine).
FAKE = {
    ("resnet50", 1, "ours_eager"): (90.0, 100.0, 110.0),
    ("resnet50", 1, "auto"): (55.0, 60.0, 66.0),
    ("resnet50", 16, "ours_eager"): (1800.0, 1900.0, 2000.0),
    ("resnet50", 16, "auto"): (900.0, 960.0, 1000.0),
    # batch 1 eager: no overlap with resnet50 (120 > 110); batch 16 deployed: overlapping.
    ("res2net50_26w_4s", 1, "ours_eager"): (120.0, 125.0, 130.0),
    ("res2net50_26w_4s", 1, "auto"): (60.0, 70.0, 80.0),
    ("res2net50_26w_4s", 16, "ours_eager"): (2300.0, 2400.0, 2500.0),
    ("res2net50_26w_4s", 16, "auto"): (950.0, 1000.0, 1100.0),
}
GMACS = {"resnet50": 4.0, "res2net50_26w_4s": 4.25}


def fake_engines(path: Path) -> None:
    rows = []
    for name in NETS:
        for batch in (1, 16):
            engines = {}
            for engine in ("ours_eager", "auto"):
                q1, med, q3 = FAKE[(name, batch, engine)]
                engines[engine] = {"ms": med, "ms_iqr": [q1, q3], "rounds": 5}
            engines["auto"]["backend"] = "openvino"
            rows.append(
                {
                    "name": name,
                    "batch": batch,
                    "input_size": 224,
                    "gmacs_per_image": GMACS[name],
                    "engines": engines,
                }
            )
    path.write_text(json.dumps({"date": "d", "command": "c", "machine": {"cpu": "x"}, "rows": rows}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flops_speed")
    fake_engines(tmp / "engines.json")
    argv = ["--nets", *NETS, "--size", "32", "--batch", "2", "--rounds", "3", "--settle", "0"]
    argv += ["--engines-json", str(tmp / "engines.json"), "--out", str(tmp / "out.json")]
    argv += ["--figure", str(tmp / "fig.png")]
    result = flops_speed.main(argv)
    return result, tmp


def test_one_row_per_net_with_consistent_training_numbers(run):
    result, tmp = run
    written = json.loads((tmp / "out.json").read_text())
    assert [r["name"] for r in written["rows"]] == NETS
    assert {"date", "command", "machine", "settings", "engines_json"} <= written.keys()
    for row in written["rows"]:
        t = row["train"]
        assert t["rounds"] == 3 == len(t["step_s_per_round"])
        assert t["images_per_s"] > 0
        q1, q3 = t["images_per_s_iqr"]
        assert q1 <= t["images_per_s"] <= q3
        m1, m3 = t["ms_per_image_iqr"]
        assert m1 <= t["ms_per_image"] <= m3
        # The MACs of one forward pass at the training size, as resnets counts them.
        assert row["gmacs_per_image"] == pytest.approx(count_params_macs(row["name"], 32)[1] / 1e9, rel=0.01)
        # A training step is forward + backward: about three forward passes of FLOPs (2 per MAC).
        assert 4 < row["train_step_gflop_per_image"] / row["gmacs_per_image"] < 7
        assert written["panels"]["train"]["points"][row["name"]]["ms_per_image"] == t["ms_per_image"]


def test_figure_is_a_png(run):
    _, tmp = run
    assert (tmp / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_panels_come_from_the_engines_file(run):
    result, _ = run
    panels = result["panels"]
    assert set(panels) == {"batch1_eager", "batch1_deployed", "batch16_eager", "batch16_deployed", "train"}
    p = panels["batch16_eager"]["points"]["res2net50_26w_4s"]
    assert p["ms_per_image"] == pytest.approx(2400 / 16)
    assert p["ms_per_image_iqr"] == pytest.approx([2300 / 16, 2500 / 16])
    assert panels["batch1_deployed"]["points"]["resnet50"]["backend"] == "openvino"
    # GMAC/s over resnet50's: (4.25 / 125) / (4.0 / 100) at batch 1 eager.
    rel = panels["batch1_eager"]["gmacs_per_s_vs_reference"]
    assert rel["resnet50"] == 1.0
    assert rel["res2net50_26w_4s"] == pytest.approx((4.25 / 125) / (4.0 / 100))
    # Non-overlapping IQRs at batch 1 eager; overlapping at batch 16 deployed.
    (gap,) = panels["batch1_eager"]["gaps_exceeding_noise"]
    assert (gap["faster"], gap["slower"]) == ("resnet50", "res2net50_26w_4s")
    assert gap["ratio"] == pytest.approx(1.25)
    assert panels["batch16_deployed"]["gaps_exceeding_noise"] == []
    assert len(panels["batch16_deployed"]["gaps_within_noise"]) == 1
    # Training nets run interleaved: the round-by-round ratio of the reference to itself is 1.
    paired = panels["train"]["gmacs_per_s_vs_reference_paired"]
    assert paired["resnet50"] == {"median": 1.0, "iqr": [1.0, 1.0]}
    assert paired["res2net50_26w_4s"]["iqr"][0] <= paired["res2net50_26w_4s"]["median"]


def test_noise_gaps_on_known_intervals():
    points = {
        "a": (1.0, 2.0, 3.0),
        "b": (4.0, 5.0, 6.0),  # clear of a: the gap exceeds the noise
        "c": (2.5, 3.5, 4.5),  # overlaps both
        "d": (3.0, 3.2, 3.9),  # touches a at 3.0: overlapping, not a gap
    }
    got = {(p["faster"], p["slower"]): p for p in flops_speed.noise_gaps(points)}
    assert len(got) == 6
    exceed = {k for k, p in got.items() if p["exceeds_noise"]}
    assert exceed == {("a", "b"), ("d", "b")}
    assert got[("a", "b")]["ratio"] == pytest.approx(2.5)
    assert got[("c", "b")]["ratio"] == pytest.approx(5.0 / 3.5)  # faster first, whichever order given
    ratios = [p["ratio"] for p in flops_speed.noise_gaps(points)]
    assert ratios == sorted(ratios, reverse=True)


def test_labels_are_spread_apart_and_stay_in_the_axes():
    fracs = [0.50, 0.51, 0.52, 0.95, 0.96]
    out = flops_speed._spread_labels(fracs, 0.05)
    ordered = sorted(out)
    assert all(b - a >= 0.05 - 1e-12 for a, b in zip(ordered, ordered[1:]))
    assert max(out) <= 0.97
    assert flops_speed._spread_labels([0.2, 0.8], 0.05) == [0.2, 0.8]  # far apart: left where they are
