"""hooks.practices.lars.LARS against a numpy implementation of the same update on a small model."""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root, uninstalled

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from hooks.practices import schedules as S  # noqa: E402
from hooks.practices.lars import LARS  # noqa: E402

EXCLUDED = {"net/dense/bias", "net/bn/gamma", "net/bn/beta", "net/head/bias"}


def make_model(kernel_initializer="glorot_uniform"):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, name="dense", kernel_initializer=kernel_initializer,
                           bias_initializer="ones"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(2, name="head"),
    ], name="net")


def gradients(model, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


class NumpyLARS:
    """The update written out independently, per variable path."""

    def __init__(self, lr, momentum, wd, eta, eps, nesterov=False):
        self.lr, self.m, self.wd, self.eta, self.eps, self.nesterov = (
            lr, momentum, wd, eta, eps, nesterov)
        self.velocity = {}

    def step(self, weights, grads, wd=None):
        wd = self.wd if wd is None else wd
        out = {}
        for path, w in weights.items():
            g = grads[path].astype(np.float64)
            w = w.astype(np.float64)
            if path in EXCLUDED:
                update = self.lr * g
            else:
                wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                trust = self.eta * wn / (gn + wd * wn + self.eps) if wn > 0 and gn > 0 else 1.0
                update = self.lr * trust * (g + wd * w)
            v = self.m * self.velocity.get(path, 0.0) + update
            self.velocity[path] = v
            out[path] = w - (self.m * v + update if self.nesterov else v)
        return out


def weights_of(model):
    return {v.path: v.numpy() for v in model.trainable_variables}


def assert_weights_close(model, expected):
    for path, w in weights_of(model).items():
        np.testing.assert_allclose(w, expected[path], rtol=2e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_steps_match_numpy(nesterov):
    model = make_model()
    opt = LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-3, eta=0.01, epsilon=1e-9,
               nesterov=nesterov)
    ref = NumpyLARS(0.5, 0.9, 1e-3, 0.01, 1e-9, nesterov)
    variables = model.trainable_variables
    expected = weights_of(model)
    for seed in (1, 2):
        grads = gradients(model, seed)
        expected = ref.step(expected, dict(zip([v.path for v in variables], grads)))
        opt.apply(grads, variables)
        assert_weights_close(model, expected)
    assert int(opt.iterations) == 2


def test_bn_and_bias_excluded_from_trust_ratio_and_decay():
    model = make_model()
    opt = LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-2, eta=0.01)
    variables = model.trainable_variables
    assert {v.path for v in variables if opt.is_excluded(v)} == EXCLUDED
    before = weights_of(model)
    grads = gradients(model, 3)
    opt.apply(grads, variables)
    after = weights_of(model)
    for v, g in zip(variables, grads):
        step = before[v.path] - after[v.path]
        if v.path in EXCLUDED:  # first momentum step: exactly lr * g, no decay, no ratio
            np.testing.assert_allclose(step, 0.5 * g, rtol=1e-5, atol=1e-7, err_msg=v.path)
        else:  # kernels: scaled by the trust ratio, far from lr * g
            assert not np.allclose(step, 0.5 * g, rtol=0.1), v.path


def test_exclusion_rules_are_configurable():
    model = make_model()
    by_rank_only = LARS(exclude_patterns=())
    assert {v.path for v in model.trainable_variables if by_rank_only.is_excluded(v)} == EXCLUDED
    nothing = LARS(exclude_patterns=(), exclude_rank_1=False)
    assert not any(nothing.is_excluded(v) for v in model.trainable_variables)
    heads = LARS(exclude_patterns=("HEAD",), exclude_rank_1=False)
    assert {v.path for v in model.trainable_variables if heads.is_excluded(v)} == {
        "net/head/kernel", "net/head/bias"}


def test_zero_weights_give_trust_ratio_one():
    model = make_model(kernel_initializer="zeros")
    opt = LARS(learning_rate=0.1, momentum=0.0, weight_decay=1e-3, eta=0.001)
    kernel = model.get_layer("dense").kernel
    assert model.trainable_variables[0] is kernel
    grads = gradients(model, 4)
    g = grads[0]
    opt.apply(grads, model.trainable_variables)
    # ||w|| = 0: ratio 1 and wd * w = 0, so the step is plain lr * g (momentum 0: no slots).
    np.testing.assert_allclose(kernel.numpy(), -0.1 * g, rtol=1e-5, atol=1e-8)
    assert opt.momentums == []


def test_weight_decay_schedule_and_setter():
    wd = S.PiecewiseConstant([1], [0.0, 0.05])  # step 0: no decay, from step 1: 0.05
    model = make_model()
    opt = LARS(learning_rate=0.3, momentum=0.9, weight_decay=wd, eta=0.02)
    ref = NumpyLARS(0.3, 0.9, None, 0.02, 1e-9)
    paths = [v.path for v in model.trainable_variables]
    expected = weights_of(model)
    for seed, decay in ((5, 0.0), (6, 0.05)):
        grads = gradients(model, seed)
        expected = ref.step(expected, dict(zip(paths, grads)), wd=decay)
        opt.apply(grads, model.trainable_variables)
        assert_weights_close(model, expected)
    with pytest.raises(TypeError, match="schedule"):
        opt.set_weight_decay(1e-4)

    fixed = LARS(weight_decay=1e-4)
    fixed.set_weight_decay(2e-4)  # e.g. from PhasedSchedule.weight_decay_at(step)
    assert float(fixed.current_weight_decay) == pytest.approx(2e-4)
    assert fixed.get_config()["weight_decay"] == pytest.approx(2e-4)


def test_get_config_round_trips():
    lr = S.LinearWarmup(S.PolynomialDecay(34.0, 100, power=2.0, start_step=10), 10)
    wd = S.PhasedSchedule([S.Phase(50, 1.0, weight_decay=5e-5),
                           S.Phase(60, 0.1, weight_decay=2e-4)]).weight_decay_schedule()
    for opt in (LARS(learning_rate=lr, weight_decay=wd, momentum=0.8, eta=0.002, epsilon=0.0,
                     nesterov=True, exclude_patterns=("bn",), exclude_rank_1=False),
                LARS(learning_rate=0.2, weight_decay=3e-4)):
        config = opt.get_config()
        again = LARS.from_config(config)
        assert again.get_config() == config
        revived = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert isinstance(revived, LARS) and revived.get_config() == config
    assert float(again.current_weight_decay) == pytest.approx(3e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(momentum=1.5), r"momentum must be in \[0.0, 1.0\), got 1.5"),
    (dict(momentum=1.0), r"momentum must be in \[0.0, 1.0\), got 1.0"),
    (dict(eta=0.0), r"eta must be in \(0.0, inf\), got 0.0"),
    (dict(weight_decay=-1e-4), r"weight_decay must be in \[0.0, inf\), got -0.0001"),
    (dict(epsilon=-1.0), r"epsilon must be in \[0.0, inf\), got -1.0"),
    (dict(exclude_patterns="bn"), "exclude_patterns must be a sequence of strings"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LARS(**kwargs)


def test_fit_with_schedule_in_compiled_train_step():
    model = make_model()
    preset = S.preset("lars_32k", global_batch=32768, steps_per_epoch=2, epochs=2)
    model.compile(optimizer=LARS(learning_rate=preset.learning_rate,
                                 weight_decay=preset.weight_decay), loss="mse")
    before = weights_of(model)
    x = np.random.default_rng(7).normal(size=(16, 4)).astype("float32")
    history = model.fit(x, x[:, :2], batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert int(model.optimizer.iterations) == 2
    assert not np.allclose(weights_of(model)["net/dense/kernel"], before["net/dense/kernel"])
