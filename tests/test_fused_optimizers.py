"""The one-kernel SGD and Adam update like their published formulas (numpy here) and keep
Keras's variables, so checkpoints move between them and Keras's classes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hooks.practices import fused_optimizers

RNG = np.random.default_rng(0)
W0 = RNG.normal(size=(5, 3)).astype("float32")
GRADS = [RNG.normal(size=(5, 3)).astype("float32") for _ in range(4)]
RATES = [0.1, 0.1, 0.05, 0.01]  # a schedule: the rate read at each step


def _run(optimizer, kernel=None) -> np.ndarray:
    """The variable after the 4 steps; `kernel`: an op type the traced step must hold."""
    variable = keras.Variable(W0)
    optimizer.build([variable])

    @tf.function
    def step(g):
        optimizer.apply_gradients([(g, variable)])

    if kernel:
        graph = step.get_concrete_function(tf.TensorSpec(W0.shape)).graph
        assert kernel in {op.type for op in graph.get_operations()}
    for g, lr in zip(GRADS, RATES):
        optimizer.learning_rate = lr  # a variable the traced step reads
        step(tf.constant(g))
    return variable.numpy()


def _sgd_reference(momentum, nesterov):
    """Sutskever momentum in Keras's form (TF's MomentumOptimizer with lr inside m)."""
    w, m = W0.astype(np.float64), np.zeros_like(W0, np.float64)
    for g, lr in zip(GRADS, RATES):
        m = momentum * m - lr * g
        w = w + (momentum * m - lr * g if nesterov else m)
    return w


def _adam_reference(b1=0.9, b2=0.999, eps=1e-7):
    """Kingma & Ba (2015), Algorithm 1 with the 'epsilon hat' of section 2 (as TF/Keras)."""
    w, m, v = W0.astype(np.float64), np.zeros_like(W0, np.float64), np.zeros_like(W0, np.float64)
    for t, (g, lr) in enumerate(zip(GRADS, RATES), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    return w


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_follows_the_momentum_formula_and_keras(nesterov):
    got = _run(fused_optimizers.SGD(0.1, momentum=0.9, nesterov=nesterov),
               "ResourceApplyKerasMomentum")
    np.testing.assert_allclose(got, _sgd_reference(0.9, nesterov), rtol=1e-6, atol=1e-6)
    keras_sgd = _run(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=nesterov))
    np.testing.assert_allclose(got, keras_sgd, rtol=1e-6, atol=1e-7)


def test_fused_adam_follows_the_adam_formula_and_keras():
    got = _run(fused_optimizers.Adam(0.1), "ResourceApplyAdam")
    # float32 against a float64 reference: 4 steps of size ~0.1 round to ~1e-6
    np.testing.assert_allclose(got, _adam_reference(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _run(keras.optimizers.Adam(0.1)),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("fused, plain", [(fused_optimizers.SGD, keras.optimizers.SGD),
                                          (fused_optimizers.Adam, keras.optimizers.Adam)])
def test_same_variables_as_keras(fused, plain):
    kwargs = {"momentum": 0.9} if plain is keras.optimizers.SGD else {}
    variables = [keras.Variable(W0), keras.Variable(W0[0])]
    a, b = fused(0.1, **kwargs), plain(0.1, **kwargs)
    a.build(variables)
    b.build(variables)
    # Paths differ only by the optimizer's own numbered name (sgd_4 vs sgd_5).
    assert [(v.name, v.shape) for v in a.variables] == [(v.name, v.shape) for v in b.variables]
