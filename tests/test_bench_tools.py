"""Benchmark helpers that compute numbers: summaries and Horovod timeline statistics."""
import json

import pytest

from bench import common, imagenet_input, tensor_fusion


def test_summary_median_and_spread():
    s = common.summary([4.0, 2.0, 3.0])
    assert (s["median"], s["min"], s["max"], s["rounds"]) == (3.0, 2.0, 4.0, 3)
    assert s["spread_pct"] == pytest.approx(100 * 2 / 3)
    assert common.fmt(s, 1) == "3.0 [2.0-4.0]"


def test_union_seconds_merges_overlaps():
    # [0, 10] and [5, 20] overlap -> 20 us; [30, 31] apart -> 1 us; duplicates count once.
    assert tensor_fusion.union_seconds([(5, 20), (0, 10), (30, 31), (0, 10)]) == \
        pytest.approx(21e-6)
    assert tensor_fusion.union_seconds([]) == 0


def _timeline(tmp_path):
    # Two tensors fused into one Gloo allreduce (same activity times), one reduced alone;
    # Horovod writes an unterminated JSON array.
    ev = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "grad_a"}},
          {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "grad_b"}},
          {"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "grad_c"}}]
    for pid in (1, 2):
        ev += [{"name": "NEGOTIATE_ALLREDUCE", "ph": "B", "ts": 0, "pid": pid},
               {"ph": "E", "ts": 100, "pid": pid},
               {"name": "ALLREDUCE", "ph": "B", "ts": 100, "pid": pid},
               {"name": "MEMCPY_IN_FUSION_BUFFER", "ph": "B", "ts": 100, "pid": pid},
               {"ph": "E", "ts": 110, "pid": pid},
               {"name": "GLOO_ALLREDUCE", "ph": "B", "ts": 110, "pid": pid},
               {"ph": "E", "ts": 410, "pid": pid},
               {"ph": "E", "ts": 420, "pid": pid}]
    ev += [{"name": "ALLREDUCE", "ph": "B", "ts": 1000, "pid": 3},
           {"name": "GLOO_ALLREDUCE", "ph": "X", "ts": 1000, "dur": 200, "pid": 3},
           {"ph": "E", "ts": 1200, "pid": 3}]
    path = tmp_path / "timeline.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in ev) + ",\n")
    return path


def test_timeline_stats_by_hand(tmp_path):
    stats = tensor_fusion.timeline_stats(str(_timeline(tmp_path)), steps=2)
    assert stats["allreduce_calls"] == 1.0  # 2 calls over 2 steps
    assert stats["tensors"] == 3
    assert stats["collective_s"] == pytest.approx((300 + 200) / 2 * 1e-6)
    assert stats["memcpy_s"] == pytest.approx(10 / 2 * 1e-6)
    assert stats["negotiate_s"] == pytest.approx(100 / 2 * 1e-6)


def test_fraction_of_limit_by_hand():
    # 2.5 images/CPU-s x 24 GFLOP = 60 GFLOP/CPU-s: all of a 60 limit, half of 120.
    assert common.fraction_of_limit(2.5, 24e9, 60.0) == pytest.approx(1.0)
    assert common.fraction_of_limit(2.5, 24e9, 120.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        common.fraction_of_limit(1.0, 1e9, 0.0)


def test_input_share_by_hand():
    # Training 2.5 img/CPU-s (0.4 CPU-s per image), input 10 (0.1): input takes 0.1 / 0.5.
    share = imagenet_input.input_share(2.5, 10.0)
    assert share["input_fraction"] == pytest.approx(0.2)
    assert share["combined_per_cpu_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        imagenet_input.input_share(2.5, 0.0)


def test_parse_parallel_calls():
    assert imagenet_input.parse_parallel_calls("1, 2,AUTOTUNE") == [1, 2, "autotune"]
    for bad in ("0", "two", "1,,2", ""):
        with pytest.raises(ValueError):
            imagenet_input.parse_parallel_calls(bad)


def test_link_sample_makes_copies(tmp_path):
    src = tmp_path / "images"
    (src / "n01").mkdir(parents=True)
    (src / "n01" / "a.JPEG").write_bytes(b"jpeg-a")
    (src / "n02").mkdir()
    (src / "n02" / "b.JPEG").write_bytes(b"jpeg-b")
    assert imagenet_input.link_sample(str(src), str(tmp_path / "out"), 3) == 6
    assert sorted(p.name for p in (tmp_path / "out" / "n02").iterdir()) == \
        ["b_c0.JPEG", "b_c1.JPEG", "b_c2.JPEG"]
    assert (tmp_path / "out" / "n01" / "a_c2.JPEG").read_bytes() == b"jpeg-a"


def test_forward_macs_by_hand():
    import keras
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)  # 8*8*3*3*3*4
    x = keras.layers.BatchNormalization()(x)  # not counted
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 4*4*3*3*4
    x = keras.layers.Conv2D(6, 1, groups=2)(x)  # 4*4*1*1*(4/2)*6
    x = keras.layers.GlobalAveragePooling2D()(x)
    inner = keras.Model(inputs, x)
    outer_in = keras.Input((8, 8, 3))
    out = keras.layers.Dense(5)(inner(outer_in))  # 6*5; the nested model counts too
    assert common.forward_macs(keras.Model(outer_in, out)) == \
        8 * 8 * 27 * 4 + 4 * 4 * 9 * 4 + 4 * 4 * 2 * 6 + 30


def test_best_per_cpu_second_takes_forward_cases_of_one_precision():
    from bench import gemm_peak

    def case(median):
        return {"gflop_per_cpu_s": common.summary([median])}
    result = {"matmul_fp32": case(50.0), "conv3x3_fp32": case(60.0),
              "conv3x3_bwd_input_fp32": case(70.0), "conv3x3_bf16": case(55.0)}
    assert gemm_peak.best_per_cpu_second(result, "fp32") == 60.0
    assert gemm_peak.best_per_cpu_second(result, "bf16") == 55.0

