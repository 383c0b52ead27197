"""hooks.practices.schedules against independent numpy formulas, at many steps and past the end."""
import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root, uninstalled

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from hooks.practices import schedules as S  # noqa: E402

RTOL, ATOL = 1e-5, 1e-7


def lr_at(schedule, steps):
    """Vector of lrs (schedules are elementwise, so one call covers every step)."""
    return np.asarray(keras.ops.convert_to_numpy(schedule(np.asarray(steps, np.int64))),
                      np.float64)


# ---------------------------------------------------------------- numpy references
def poly_ref(steps, peak, decay_steps, power, end=0.0, start=0):
    t = np.clip(np.asarray(steps, np.float64) - start, 0, decay_steps)
    return end + (peak - end) * (1 - t / decay_steps) ** power


def step_ref(steps, peak, boundaries, factors):
    idx = np.searchsorted(np.asarray(boundaries), np.asarray(steps), side="right")
    return peak * np.asarray(factors)[idx]


def warmup_ref(steps, after_values, warmup, start_lr, after_at_warmup):
    steps = np.asarray(steps, np.float64)
    warm = start_lr + (after_at_warmup - start_lr) * steps / max(warmup, 1)
    return np.where(steps < warmup, warm, after_values)


def phased_ref(steps, phases):
    """Straight-line loop over the phases; phases are dicts with the Phase fields."""
    out = []
    for s in steps:
        start = 0
        for k, ph in enumerate(phases):
            length = ph["length"]
            if s < start + length or k == len(phases) - 1:
                t = min(s - start, length)  # past the end: the phase's final value
                w, peak = ph.get("warmup", 0), ph["peak_lr"]
                if t < w:
                    ws = ph.get("warmup_start_lr", 0.0)
                    out.append(ws + (peak - ws) * t / w)
                else:
                    end, p = ph.get("end_lr", 0.0), ph.get("power", 1.0)
                    span = (length - w) / ph.get("stop_fraction", 1.0)
                    out.append(end + (peak - end) * (1 - (t - w) / span) ** p)
                break
            start += length
    return np.asarray(out)


# ---------------------------------------------------------------- scaling and units
def test_scale_learning_rate():
    assert S.scale_learning_rate(0.1, 4096) == pytest.approx(1.6)
    assert S.scale_learning_rate(0.1, 8192, base_batch=4096) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="global_batch must be >= 1, got 0"):
        S.scale_learning_rate(0.1, 0)


def test_to_steps():
    assert S.to_steps(steps=7) == 7
    assert S.to_steps(epochs=2.5, steps_per_epoch=4) == 10
    assert S.to_steps(epochs=0.5, steps_per_epoch=3) == 2  # 1.5: halves round up
    assert S.to_steps(epochs=0.4, steps_per_epoch=3) == 1
    assert S.to_steps(examples=1000, global_batch=256) == 4  # 3.9
    assert S.to_steps(examples=1100, global_batch=256) == 4  # 4.3
    with pytest.raises(ValueError, match="exactly one of steps, epochs, examples"):
        S.to_steps()
    with pytest.raises(ValueError, match=r"exactly one.*\['steps', 'epochs'\]"):
        S.to_steps(steps=3, epochs=1, steps_per_epoch=3)
    with pytest.raises(ValueError, match="epochs need steps_per_epoch"):
        S.to_steps(epochs=3)
    with pytest.raises(ValueError, match="examples need global_batch"):
        S.to_steps(examples=300)
    with pytest.raises(ValueError, match="epochs must be >= 0.0, got -1.0"):
        S.to_steps(epochs=-1, steps_per_epoch=3)
    with pytest.raises(ValueError, match="steps must be an integer, got 2.5"):
        S.to_steps(steps=2.5)


# ---------------------------------------------------------------- elementary schedules
@pytest.mark.parametrize("power,end,start", [(1.0, 0.0, 0), (2.0, 0.01, 0), (0.5, 0.0, 7)])
def test_polynomial_decay_matches_numpy(power, end, start):
    steps = np.arange(0, start + 100 + 50)
    sched = S.PolynomialDecay(1.5, 100, power=power, end_lr=end, start_step=start)
    np.testing.assert_allclose(lr_at(sched, steps), poly_ref(steps, 1.5, 100, power, end, start),
                               rtol=RTOL, atol=ATOL)
    assert float(sched(start + 100)) == pytest.approx(end)
    assert float(sched(10**6)) == pytest.approx(end)


@pytest.mark.parametrize("power", [0.0, -1.0])
def test_polynomial_decay_rejects_power(power):
    with pytest.raises(ValueError, match=f"power must be > 0.0, got {power}"):
        S.PolynomialDecay(1.0, 10, power=power)


def test_step_decay_matches_numpy():
    bounds, factors = [30, 60, 80], [1.0, 0.1, 0.01, 0.001]
    sched = S.StepDecay(0.4, bounds, factors)
    steps = np.arange(0, 140)
    np.testing.assert_allclose(lr_at(sched, steps), step_ref(steps, 0.4, bounds, factors),
                               rtol=RTOL, atol=ATOL)
    # The new factor applies from the boundary step on.
    assert [float(sched(s)) for s in (29, 30, 59, 60, 80)] == pytest.approx(
        [0.4, 0.04, 0.04, 0.004, 0.0004])


def test_step_decay_validation():
    with pytest.raises(ValueError, match="factors must have one entry more"):
        S.StepDecay(0.1, [10, 20], [1.0, 0.1])
    with pytest.raises(ValueError, match="strictly increasing"):
        S.StepDecay(0.1, [20, 10], [1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match=r"boundaries_steps\[0\] must be >= 0, got -1"):
        S.StepDecay(0.1, [-1], [1.0, 0.1])


def test_linear_warmup_over_step_decay_matches_numpy():
    after = S.StepDecay(0.4, [30, 60], [1.0, 0.1, 0.01])
    sched = S.LinearWarmup(after, warmup_steps=10, start_lr=0.05)
    steps = np.arange(0, 100)
    expected = warmup_ref(steps, step_ref(steps, 0.4, [30, 60], [1.0, 0.1, 0.01]),
                          10, 0.05, 0.4)
    np.testing.assert_allclose(lr_at(sched, steps), expected, rtol=RTOL, atol=ATOL)
    assert float(sched(0)) == pytest.approx(0.05)
    assert float(sched(10)) == pytest.approx(0.4)


def test_linear_warmup_over_constant_and_zero_warmup():
    sched = S.LinearWarmup(2.0, warmup_steps=4)
    assert [float(sched(s)) for s in range(7)] == pytest.approx([0, 0.5, 1, 1.5, 2, 2, 2])
    poly = S.PolynomialDecay(1.0, 20, power=2.0)
    np.testing.assert_allclose(lr_at(S.LinearWarmup(poly, 0), range(30)),
                               poly_ref(range(30), 1.0, 20, 2.0), rtol=RTOL, atol=ATOL)


def test_linear_warmup_rejects_negative_warmup():
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -3"):
        S.LinearWarmup(0.1, warmup_steps=-3)


# ---------------------------------------------------------------- phased schedules
PHASES = [
    dict(length=40, peak_lr=1.6, power=1.0, warmup=10, warmup_start_lr=0.1, weight_decay=5e-5),
    dict(length=30, peak_lr=1.0, power=2.0, end_lr=0.05, weight_decay=5e-5,
         stop_fraction=0.75, snapshot=True),
    dict(length=25, peak_lr=0.7, power=2.0, warmup=5, weight_decay=None),
    dict(length=13, peak_lr=0.2, power=0.5, weight_decay=2e-4, name="collapse", snapshot=True),
]


def test_phased_schedule_matches_numpy():
    sched = S.PhasedSchedule([S.Phase(**p) for p in PHASES], total_steps=108)
    steps = np.arange(0, 108 + 50)
    np.testing.assert_allclose(lr_at(sched, steps), phased_ref(steps, PHASES),
                               rtol=RTOL, atol=ATOL)
    assert sched.phase_boundaries() == [40, 70, 95, 108]
    assert sched.snapshot_steps() == [70, 108]
    # Boundaries: the first step of each phase starts its warm-up / peak.
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(10)) == pytest.approx(1.6)
    assert float(sched(40)) == pytest.approx(1.0)
    assert float(sched(70)) == pytest.approx(0.0)  # phase 3 warms up from 0
    assert float(sched(75)) == pytest.approx(0.7)  # 70 + 5 warm-up steps
    assert float(sched(95)) == pytest.approx(0.2)  # collapse peak
    # Past the end: the last phase's final value (power 0.5 to 0).
    assert float(sched(108)) == pytest.approx(0.0, abs=1e-7)
    assert float(sched(10**6)) == pytest.approx(0.0, abs=1e-7)


def test_phased_schedule_partial_collapse_and_end_value():
    ph = S.Phase(length=20, peak_lr=1.0, power=2.0, stop_fraction=0.5, end_lr=0.0)
    sched = S.PhasedSchedule([ph])
    assert ph.final_lr == pytest.approx(0.25)
    assert float(sched(19)) == pytest.approx((1 - 19 / 40) ** 2)
    assert float(sched(20)) == pytest.approx(0.25)
    assert float(sched(500)) == pytest.approx(0.25)


def test_phase_index_and_weight_decay_at():
    sched = S.PhasedSchedule(PHASES)
    assert [sched.phase_index(s) for s in (0, 39, 40, 69, 70, 94, 95, 107, 108, 999)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert sched.weight_decay_at(0) == 5e-5
    assert sched.weight_decay_at(80) is None
    assert sched.weight_decay_at(95) == 2e-4
    assert sched.weight_decay_at(5000) == 2e-4
    wd = sched.weight_decay_schedule(default=1e-4)
    steps = np.arange(0, 130)
    expected = np.select([steps < 70, steps < 95], [5e-5, 1e-4], 2e-4)
    np.testing.assert_allclose(lr_at(wd, steps), expected, rtol=RTOL)
    assert [wd.value_at(s) for s in (69, 70, 95)] == [5e-5, 1e-4, 2e-4]
    with pytest.raises(ValueError, match="default"):
        sched.weight_decay_schedule()
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        sched.phase_index(-1)


@pytest.mark.parametrize("change,message", [
    (dict(length=0), "phase 'bad': length must be >= 1, got 0"),
    (dict(length=-5), "phase 'bad': length must be >= 1, got -5"),
    (dict(power=0.0), "phase 'bad': power must be > 0.0, got 0.0"),
    (dict(power=-2.0), "phase 'bad': power must be > 0.0, got -2.0"),
    (dict(warmup=-1), "phase 'bad': warmup must be >= 0, got -1"),
    (dict(warmup=10), "phase 'bad': warmup must be shorter than the phase length 10, got 10"),
    (dict(warmup=12), "warmup must be shorter than the phase length 10, got 12"),
    (dict(stop_fraction=0.0), "stop_fraction must be > 0.0, got 0.0"),
    (dict(stop_fraction=1.5), "stop_fraction must be <= 1.0, got 1.5"),
    (dict(peak_lr=-0.1), "peak_lr must be >= 0.0, got -0.1"),
])
def test_phase_validation(change, message):
    args = dict(length=10, peak_lr=0.5, name="bad")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        S.Phase(**args)


def test_phased_schedule_validation():
    with pytest.raises(ValueError, match="phases must not be empty"):
        S.PhasedSchedule([])
    with pytest.raises(ValueError, match="phases must be a sequence of Phase"):
        S.PhasedSchedule(S.Phase(10, 0.1))
    with pytest.raises(ValueError, match="phases cover 108 steps but total_steps is 200"):
        S.PhasedSchedule(PHASES, total_steps=200)
    with pytest.raises(ValueError, match="phases cover 108 steps but total_steps is 100"):
        S.PhasedSchedule(PHASES, total_steps=100)


def test_phases_from_epochs_rounds_cumulatively():
    specs = [dict(epochs=1 / 3, peak_lr=1.0, warmup_epochs=0.1, name=n) for n in "abc"]
    phases = S.phases_from_epochs(specs, steps_per_epoch=10)
    assert [p.length for p in phases] == [3, 4, 3]
    assert [p.warmup for p in phases] == [1, 1, 1]
    assert [p.name for p in phases] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="phase 'x': epochs must be > 0.0, got 0.0"):
        S.phases_from_epochs([dict(epochs=0, peak_lr=1.0, name="x")], 10)
    with pytest.raises(ValueError, match="length must be >= 1, got 0"):
        S.phases_from_epochs([dict(epochs=0.01, peak_lr=1.0)], 10)  # rounds to 0 steps


# ---------------------------------------------------------------- serialisation, tracing
def _all_schedules():
    return [
        S.PolynomialDecay(1.5, 100, power=2.0, end_lr=0.01, start_step=7),
        S.PiecewiseConstant([10, 20], [1e-4, 2e-4, 4e-4]),
        S.StepDecay(0.4, [30, 60, 80], [1.0, 0.1, 0.01, 0.001]),
        S.LinearWarmup(S.StepDecay(0.4, [30, 60], [1.0, 0.1, 0.01]), 10, 0.05),
        S.LinearWarmup(0.3, 5),
        S.PhasedSchedule(PHASES, total_steps=108),
    ]


@pytest.mark.parametrize("sched", _all_schedules(), ids=lambda s: type(s).__name__)
def test_get_config_round_trips(sched):
    steps = np.arange(0, 160)
    config = json.loads(json.dumps(sched.get_config()))  # must be plain JSON
    again = type(sched).from_config(config)
    np.testing.assert_array_equal(lr_at(again, steps), lr_at(sched, steps))
    assert again.get_config() == sched.get_config()
    # Through Keras' generic serialisation too (what model/optimizer saving uses).
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    np.testing.assert_array_equal(lr_at(revived, steps), lr_at(sched, steps))


@pytest.mark.parametrize("sched", _all_schedules(), ids=lambda s: type(s).__name__)
def test_tf_function_int64_step_equals_python_int(sched):
    traced = tf.function(lambda step: sched(step))
    for step in (0, 1, 9, 10, 30, 40, 69, 70, 95, 107, 108, 500):
        got = float(traced(tf.constant(step, tf.int64)))
        assert got == pytest.approx(float(sched(step)), rel=RTOL, abs=ATOL), step


def test_optimizer_accepts_schedule_and_uses_its_step():
    sched = S.PhasedSchedule(PHASES)
    opt = keras.optimizers.SGD(learning_rate=sched)
    opt.iterations.assign(95)
    assert float(opt.learning_rate) == pytest.approx(0.2)


# ---------------------------------------------------------------- presets
SPE = 10  # steps per epoch: small so whole runs are a few hundred steps

SURFSARA_4096 = [  # Codreanu et al. 2017, 4096 solver, in steps at SPE, by hand
    dict(length=250, peak_lr=1.6, power=1.0, warmup=50, warmup_start_lr=0.1),
    dict(length=150, peak_lr=1.02, power=2.0),
    dict(length=150, peak_lr=0.764, power=2.0, warmup=30),
    dict(length=120, peak_lr=0.572, power=2.0, warmup=30),
    dict(length=50, peak_lr=0.143, power=2.0),
]


def test_preset_names():
    assert S.PRESETS == ("tpu", "goyal", "surfsara_4096", "surfsara_14336", "lars_32k")
    with pytest.raises(ValueError, match="name must be one of"):
        S.preset("cosine", global_batch=256, steps_per_epoch=SPE)
    with pytest.raises(ValueError, match="global_batch must be >= 1, got 0"):
        S.preset("tpu", global_batch=0, steps_per_epoch=SPE)
    with pytest.raises(ValueError, match="epochs must be > 0.0, got 0.0"):
        S.preset("tpu", global_batch=256, steps_per_epoch=SPE, epochs=0)


def test_preset_surfsara_4096_reproduces_design_numbers():
    p = S.preset("surfsara_4096", global_batch=4096, steps_per_epoch=SPE)
    sched = p.learning_rate
    assert p.total_steps == 720 and p.optimizer == "sgd" and p.epochs == 72
    assert sched.phase_boundaries() == [250, 400, 550, 670, 720]
    assert p.snapshot_steps == (400, 550, 670, 720)
    lr = lambda s: float(sched(s))
    assert lr(0) == pytest.approx(0.1)
    assert lr(50) == pytest.approx(1.6)  # end of the 5 warm-up epochs
    assert lr(250) == pytest.approx(1.02)  # cycle 1, no warm-up
    assert lr(400 + 30) == pytest.approx(0.764)  # cycle 2 after 3 warm-up epochs
    assert lr(550 + 30) == pytest.approx(0.572)  # cycle 3 after 3 warm-up epochs
    assert lr(670) == pytest.approx(0.143)  # collapse
    assert p.weight_decay_at(670) == 2e-4 and p.weight_decay_at(719) == 2e-4
    assert p.weight_decay_at(9999) == 2e-4
    assert all(p.weight_decay_at(s) == 5e-5 for s in (0, 249, 250, 430, 669))
    steps = np.arange(0, 770)
    np.testing.assert_allclose(lr_at(sched, steps), phased_ref(steps, SURFSARA_4096),
                               rtol=RTOL, atol=ATOL)


def test_preset_rescales_with_batch_and_epochs():
    base = S.preset("surfsara_4096", global_batch=4096, steps_per_epoch=SPE)
    double = S.preset("surfsara_4096", global_batch=8192, steps_per_epoch=SPE)
    steps = np.arange(0, 770)
    np.testing.assert_allclose(lr_at(double.learning_rate, steps),
                               2 * lr_at(base.learning_rate, steps), rtol=RTOL, atol=ATOL)
    half = S.preset("surfsara_4096", global_batch=4096, steps_per_epoch=SPE, epochs=36)
    assert half.total_steps == 360
    assert half.learning_rate.phase_boundaries() == [125, 200, 275, 335, 360]
    assert float(half.learning_rate(25)) == pytest.approx(1.6)  # warm-up halved too
    assert half.snapshot_steps == (200, 275, 335, 360)


@pytest.mark.parametrize("name,start", [("tpu", 0.0), ("goyal", 0.1)])
def test_preset_step_decay_matches_numpy(name, start):
    p = S.preset(name, global_batch=1024, steps_per_epoch=SPE)
    peak = 0.1 * 1024 / 256
    steps = np.arange(0, 950)
    after = step_ref(steps, peak, [300, 600, 800], [1, 0.1, 0.01, 0.001])
    np.testing.assert_allclose(lr_at(p.learning_rate, steps),
                               warmup_ref(steps, after, 50, start, peak), rtol=RTOL, atol=ATOL)
    assert p.total_steps == 900 and p.snapshot_steps == ()
    assert p.weight_decay_at(0) == 1e-4 and p.weight_decay_at(899) == 1e-4


def test_preset_surfsara_14336():
    p = S.preset("surfsara_14336", global_batch=14336, steps_per_epoch=SPE)
    sched = p.learning_rate
    assert p.total_steps == 900 and sched.phase_boundaries() == [850, 900]
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(50)) == pytest.approx(4.8)
    # Linear decay laid out over epochs 5..90, cut at 85, then a power-2 collapse.
    steps = np.arange(0, 950)
    expected = np.where(steps < 850, poly_ref(steps, 4.8, 850, 1.0, start=50), 0.0)
    warm = steps < 50
    expected[warm] = 0.1 + (4.8 - 0.1) * steps[warm] / 50
    collapse_peak = 4.8 * 50 / 850
    tail = steps >= 850
    expected[tail] = poly_ref(steps[tail] - 850, collapse_peak, 50, 2.0)
    np.testing.assert_allclose(lr_at(sched, steps), expected, rtol=RTOL, atol=ATOL)
    assert p.weight_decay_at(849) == 5e-5 and p.weight_decay_at(850) == 2e-4
    assert p.snapshot_steps == (900,)


def test_preset_lars_32k():
    p = S.preset("lars_32k", global_batch=32768, steps_per_epoch=SPE)
    assert p.optimizer == "lars" and p.total_steps == 900
    steps = np.arange(0, 950)
    expected = np.where(steps < 120, 34.0 * steps / 120, poly_ref(steps, 34.0, 780, 2.0,
                                                                  start=120))
    np.testing.assert_allclose(lr_at(p.learning_rate, steps), expected, rtol=RTOL, atol=ATOL)
    half = S.preset("lars_32k", global_batch=16384, steps_per_epoch=SPE)
    assert float(half.learning_rate(120)) == pytest.approx(17.0)
