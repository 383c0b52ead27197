"""Scaling model (imagenet/scaling.py): formulas against hand computations, the 2018 points."""
import dataclasses
import json

import pytest

from imagenet import scaling
from tests.conftest import python_cmd, run_cmd


def test_resnet50_counts_match_the_published_ones():
    counts = scaling.resnet50_counts()
    # torchvision's resnet50 is the same v1.5 network (no conv biases, BN gamma/beta, fc):
    # 25,557,032 parameters and 4.09 GMACs ("GFLOPS") at 224 px in its model table.
    assert counts["parameters"] == 25_557_032
    assert counts["forward_macs"] == pytest.approx(4.09e9, rel=0.005)
    assert counts["tensors"] == 53 * 3 + 2  # 53 convs, each with BN gamma and beta; fc W, b
    assert scaling.RESNET50_GRADIENT_BYTES == 4 * 25_557_032
    assert scaling.RESNET50_TRAIN_FLOP_PER_IMAGE == pytest.approx(24.5e9, rel=0.005)
    assert scaling.RESNET50_FORWARD_FLOP_PER_IMAGE == pytest.approx(8.18e9, rel=0.005)


def test_ring_allreduce_by_hand():
    bw, lat = scaling.ring_allreduce(100e6, 4, 10e9, 2e-6, 3)
    assert bw == pytest.approx(2 * 3 / 4 * 100e6 / 10e9)  # 0.015 s
    assert lat == pytest.approx(2 * 3 * 3 * 2e-6)  # 6 steps x 3 messages x 2 us
    assert scaling.ring_allreduce(100e6, 1, 10e9, 2e-6, 3) == (0.0, 0.0)


def _system(**kw):
    base = dict(name="t", node_images_per_sec=50.0, ranks_per_node=2, link_bytes_per_sec=5e9,
                latency_sec=10e-6, messages_per_step=4, coordination_sec_per_rank=20e-6,
                overlap=0.5, local_bytes_per_sec=20e9, local_latency_sec=1e-6,
                gradient_bytes=80e6, backward_fraction=0.6)
    base.update(kw)
    return scaling.System(**base)


def test_step_flat_ring_by_hand():
    s = scaling.step(_system(), nodes=8, global_batch=800)
    compute = 100 / 50.0  # 2 s
    p = 16
    bandwidth = 2 * (p - 1) / p * 80e6 / 5e9  # 0.03 s
    latency = 2 * (p - 1) * 4 * 10e-6  # 1.2 ms
    coordination = p * 20e-6
    hidden = 0.5 * 0.6 * compute  # 0.6 s > bandwidth: all hidden
    total = compute + latency + coordination
    assert (s.compute, s.bandwidth, s.latency, s.coordination) == pytest.approx(
        (compute, bandwidth, latency, coordination))
    assert hidden > bandwidth and s.exposed == pytest.approx(latency)
    assert s.total == pytest.approx(total)
    assert s.images_per_sec == pytest.approx(800 / total)
    assert s.efficiency == pytest.approx(800 / total / (8 * 50.0))


def test_step_without_overlap_exposes_the_bandwidth_time():
    s = scaling.step(_system(overlap=0.0), nodes=8, global_batch=800)
    assert s.exposed == pytest.approx(s.latency + s.bandwidth)
    # Partly hidden: phi * f_bwd * t_compute smaller than the bandwidth time.
    tiny = scaling.step(_system(overlap=0.01, gradient_bytes=8e9), nodes=8, global_batch=800)
    assert tiny.exposed == pytest.approx(tiny.latency + tiny.bandwidth - 0.01 * 0.6 * 2.0)


def test_step_hierarchical_by_hand():
    s = scaling.step(_system(hierarchical=True, ranks_per_node=4), nodes=8, global_batch=800)
    local_bw = 2 * 3 / 4 * 80e6 / 20e9
    net_bw = 2 * 7 / 8 * 80e6 / 5e9
    assert s.bandwidth == pytest.approx(local_bw + net_bw)
    assert s.latency == pytest.approx(2 * 3 * 4 * 1e-6 + 2 * 7 * 4 * 10e-6)
    flat = scaling.step(_system(ranks_per_node=4), nodes=8, global_batch=800)
    assert flat.latency == pytest.approx(2 * 31 * 4 * 10e-6) and flat.latency > s.latency


def test_one_node_uses_shared_memory_and_no_negotiation_for_one_rank():
    s = scaling.step(_system(), nodes=1, global_batch=100)
    assert s.bandwidth == pytest.approx(2 * 1 / 2 * 80e6 / 20e9)
    assert s.latency == pytest.approx(2 * 1 * 4 * 1e-6)
    alone = scaling.step(_system(ranks_per_node=1), nodes=1, global_batch=100)
    assert (alone.bandwidth, alone.latency, alone.coordination) == (0, 0, 0)
    assert alone.images_per_sec == pytest.approx(50.0) and alone.efficiency == pytest.approx(1)
    with pytest.raises(ValueError, match="nodes"):
        scaling.step(_system(), nodes=0, global_batch=100)


@pytest.mark.parametrize("field, value", [("latency_sec", 3e-6),
                                          ("coordination_sec_per_rank", 400e-6)])
def test_solve_linear_recovers_a_parameter(field, value):
    truth = _system(**{field: value})
    rate = scaling.step(truth, 64, 64 * 32).images_per_sec
    found = scaling.solve_linear(_system(**{field: 0.0}), field, 64, 64 * 32, rate)
    assert getattr(found, field) == pytest.approx(value, rel=1e-9)
    with pytest.raises(ValueError, match=field):
        scaling.solve_linear(truth, field, 64, 64 * 32, rate * 10)


def test_calibration_by_hand():
    systems = scaling.calibrated_2018()
    mn4, s2 = systems["marenostrum4_caffe"], systems["stampede2_tf_horovod"]
    assert mn4.node_images_per_sec == pytest.approx(15170 / (256 * 0.90))
    assert s2.node_images_per_sec == pytest.approx(16400 / (256 * 0.81))
    # MareNostrum 4 at 256 nodes: the step beyond compute is 2 (p-1) m alpha (bandwidth hidden).
    t_step, t_compute = 32 / (15170 / 256), 32 / mn4.node_images_per_sec
    assert mn4.latency_sec == pytest.approx((t_step - t_compute) / (2 * 255 * 161))
    assert 0.3e-6 < mn4.latency_sec < 2e-6  # the order of an MPI message on Omni-Path
    # Stampede2: same alpha; the rest of its 256-node step is 512 ranks x gamma.
    t_step, t_compute = 128 / (16400 / 256), 128 / s2.node_images_per_sec
    latency = 2 * 511 * 161 * mn4.latency_sec
    assert s2.latency_sec == mn4.latency_sec
    assert s2.coordination_sec_per_rank == pytest.approx((t_step - t_compute - latency) / 512)


def test_published_points_within_ten_percent():
    rows = scaling.check_published()
    assert [(r["system"], r["nodes"], r["published"]) for r in rows] == [
        ("marenostrum4_caffe", 256, 15170), ("marenostrum4_caffe", 400, 19047),
        ("marenostrum4_caffe", 512, 24240), ("stampede2_tf_horovod", 256, 16400),
        ("stampede2_tf_horovod", 512, 26700)]
    for r in rows:
        assert abs(r["predicted"] / r["published"] - 1) < 0.10, r
        if r["role"] == "calibration":
            assert r["predicted"] == pytest.approx(r["published"], rel=1e-6)
    assert sum(r["role"] == "check" for r in rows) == 3
    # The published efficiencies come back at the calibration points.
    assert rows[0]["efficiency"] == pytest.approx(0.90) and rows[3]["efficiency"] == \
        pytest.approx(0.81)


def test_zenith_relative_efficiency_within_five_percent():
    for row in scaling.check_zenith(scaling.calibrated_2018()["marenostrum4_caffe"]):
        assert abs(row["predicted"] / row["published"] - 1) < 0.05, row


def test_time_to_train():
    assert scaling.time_to_train_sec(24240, 90) == pytest.approx(90 * 1_281_167 / 24240)
    # The published 44 minutes at 24,240 img/s is about 50 epochs.
    assert 44 * 60 * 24240 / 1_281_167 == pytest.approx(49.9, abs=0.1)


def _cli(*args):
    return run_cmd(python_cmd("-m", "imagenet.scaling", *args), check=False)


def test_cli_check_published_summary_and_plot(tmp_path):
    png = tmp_path / "scaling.png"
    proc = _cli("--check_published", f"--plot={png}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("SUMMARY "))
    points = summary["points"]
    assert [(p["system"], p["nodes"], p["published"]) for p in points] == [
        (r["system"], r["nodes"], r["published"]) for r in scaling.check_published()]
    assert all(abs(p["predicted"] / p["published"] - 1) < 0.10 for p in points)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prediction_uses_the_flags():
    proc = _cli("--system=this_machine", "--nodes=1,4", "--node_images_per_sec=10",
                "--bandwidth_gbps=8", "--per_node_batch=32")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("SUMMARY "))
    system = scaling.System(**out["system"])
    assert system.link_bytes_per_sec == pytest.approx(1e9)
    assert [s["nodes"] for s in out["steps"]] == [1, 4]
    expected = scaling.step(dataclasses.replace(scaling.this_machine(), node_images_per_sec=10,
                                                link_bytes_per_sec=1e9), 4, 128)
    assert out["steps"][1]["images_per_sec"] == pytest.approx(expected.images_per_sec)


@pytest.mark.parametrize("flag", ["--overlap=1.5", "--nodes=0,2", "--bandwidth_gbps=-1",
                                  "--ranks_per_node=0", "--plot=x.png"])
def test_cli_bad_flag_is_one_line_naming_it(flag):
    proc = _cli(flag)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert flag.split("=")[0] in first
