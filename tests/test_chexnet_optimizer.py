"""`chexnet train`'s optimizer by value (issue #19): its flags are parsed, turned into the
config, and the learning-rate schedule, optimizer and network are built by the functions
`chexnet.train.run` builds them with; known gradients are applied to a known variable and
the weights compared with the published update rules written out in numpy here. In-process
and cheap."""
import keras
import numpy as np
import pytest
from absl import flags as absl_flags

from chexnet import __main__ as chexnet_main
from chexnet import config as config_lib
from chexnet import train
from chexnet.model import HEAD_NAME, InitSource
from hooks.errors import ConfigError

W0 = np.array([0.03, -0.02, 0.01, 0.005])  # small: float32 resolves Adam's ~1e-3 steps
# Step t's gradient. The last component is tiny, so Adam's epsilon decides its step; the
# first is 0 in the last step, so Adam's v decreases there (AMSGrad would keep its maximum).
GRADS = np.array([[0.5, -1.0, 0.25, 1e-7], [-0.3, 0.8, 0.6, 2e-7], [1.2, 0.1, -0.4, -1e-7],
                  [0.2, 0.2, 0.2, 1e-7], [0.0, 0.5, 0.9, 3e-7]])
STEPS_PER_EPOCH = 8.0  # e.g. 128 training images at --train_batch_size=16
TOTAL_STEPS = 100


def _config(*argv) -> config_lib.ChexnetConfig:
    """The config `python -m chexnet train ARGV` runs with."""
    fv = absl_flags.FlagValues()
    chexnet_main.define_flags(fv)
    fv(["prog", *argv])
    return chexnet_main.config_from_flags("train", fv)


def reference_learning_rates(peak, warmup_epochs, batch, steps, plateau=None):
    """docs/chexnet.md: linear warm-up from 0 over warmup_epochs * batch / 256 epochs, then
    the peak; after a plateau (factor, min_lr) the rate is max(lr * factor, min(min_lr, lr))."""
    warm = round(warmup_epochs * batch / 256 * STEPS_PER_EPOCH)
    rates = [peak * min(t / warm, 1.0) if warm else peak for t in range(steps)]
    if plateau is not None:
        factor, min_lr = plateau
        rates[-1] = max(rates[-1] * factor, min(min_lr, rates[-1]))
    return rates


def sgd_reference(rates, momentum, nesterov=False):
    """Keras SGD (Sutskever et al. 2013 form): v = m v - lr g; w += v, or with Nesterov
    w += m v - lr g."""
    w, v, out = W0.copy(), np.zeros_like(W0), []
    for lr, g in zip(rates, GRADS):
        v = momentum * v - lr * g
        w = w + (momentum * v - lr * g if nesterov else v)
        out.append(w)
    return out


def adam_reference(rates, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Kingma & Ba 2015, Algorithm 1 with the reordering of their section 2 (as Keras does
    it): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; w -= lr sqrt(1 - b2^t) /
    (1 - b1^t) m / (sqrt(v) + epsilon), t counted from 1; Keras' epsilon 1e-7."""
    w, m, v, out = W0.copy(), np.zeros_like(W0), np.zeros_like(W0), []
    for t, (lr, g) in enumerate(zip(rates, GRADS), start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        w = w - lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t) * m / (np.sqrt(v) + epsilon)
        out.append(w)
    return out


def _train_steps(config, plateau_before_last=False):
    """Weights after each step of `chexnet train`'s optimizer on variable W0 (a random-init
    backbone: the peak rate is chexnet's own rule); with `plateau_before_last`,
    ReduceOnPlateau's decay (the schedule's factor) comes before the last step."""
    peak, _ = train.peak_learning_rate(config, InitSource("none"))
    schedule, _ = train.learning_rate_schedule(config, peak, STEPS_PER_EPOCH, TOTAL_STEPS)
    optimizer = train.build_optimizer(config, schedule)
    w = keras.Variable(W0.astype(np.float32))
    out = []
    for t, g in enumerate(GRADS):
        if plateau_before_last and t == len(GRADS) - 1:
            schedule.factor.assign(config.plateau_factor)
        optimizer.apply([g.astype(np.float32)], [w])
        out.append(w.numpy().astype(np.float64))
    return out


def _assert_steps(got, expected):
    # float32 arithmetic on weights of order 0.01-0.1: agreement to a few float32 ulps
    for t, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8, err_msg=f"after step {t + 1}")


@pytest.mark.parametrize("momentum", [0.7, 0.0])
def test_sgd_applies_the_momentum_flag(momentum):
    """--optimizer=sgd --momentum=M: classic momentum M (not 0, not the default 0.9, not
    Nesterov), at the warm-up's learning rates (2 warm-up steps: 0, peak / 2, peak...)."""
    config = _config("--optimizer=sgd", f"--momentum={momentum}", "--learning_rate=0.05",
                     "--warmup_epochs=4", "--train_batch_size=16")
    rates = reference_learning_rates(0.05, 4, 16, len(GRADS))
    assert rates[:3] == [0.0, 0.025, 0.05]
    got = _train_steps(config)
    _assert_steps(got, sgd_reference(rates, momentum))
    if momentum:  # what the test tells apart
        for other in (sgd_reference(rates, 0.9), sgd_reference(rates, 0.0),
                      sgd_reference(rates, momentum, nesterov=True)):
            assert np.abs(other[-1] - got[-1]).max() > 1e-3


def test_sgd_default_rate_and_momentum():
    """No --learning_rate, no --momentum: 0.1 * batch / 256 (random init) and momentum 0.9;
    --warmup_epochs=0: no warm-up."""
    config = _config("--optimizer=sgd", "--train_batch_size=64", "--warmup_epochs=0")
    rates = reference_learning_rates(0.1 * 64 / 256, 0, 64, len(GRADS))
    _assert_steps(_train_steps(config), sgd_reference(rates, 0.9))


def test_plateau_decay_and_its_floor():
    """After a plateau the rate is multiplied by --plateau_factor, but not below
    --min_learning_rate: 0.05 * 0.1 = 0.005 is raised to 0.01."""
    config = _config("--optimizer=sgd", "--momentum=0.5", "--learning_rate=0.05",
                     "--warmup_epochs=0", "--plateau_factor=0.1", "--min_learning_rate=0.01")
    rates = reference_learning_rates(0.05, 0, 16, len(GRADS), plateau=(0.1, 0.01))
    assert rates[-1] == 0.01
    _assert_steps(_train_steps(config, plateau_before_last=True), sgd_reference(rates, 0.5))


@pytest.mark.parametrize("argv, peak", [([], 1e-3), (["--learning_rate=3e-4"], 3e-4)])
def test_adam_is_kingma_and_ba_with_keras_epsilon(argv, peak):
    """The default --optimizer=adam: CheXNet's Adam (beta 0.9 / 0.999) with Keras' epsilon
    1e-7 added to sqrt(v) (not to the bias-corrected sqrt(v_hat): the tiny gradient
    component's step tells the two apart), through a 2-step warm-up."""
    config = _config("--warmup_epochs=4", "--train_batch_size=16", *argv)
    rates = reference_learning_rates(peak, 4, 16, len(GRADS))
    got = _train_steps(config)
    _assert_steps(got, adam_reference(rates))
    for other in (adam_reference(rates, epsilon=1e-8), adam_reference(rates, beta_2=0.99)):
        assert np.abs(other[-1][-1] - got[-1][-1]) > 1e-5


def test_weight_decay_is_an_l2_loss_on_the_backbone_kernels():
    """--weight_decay=WD adds WD / 2 * sum(w^2) over the backbone's kernels (gradient WD *
    w, the TPU reference's weight decay); not on batch-norm parameters or the new head."""
    config = _config("--backbone=resnet18", "--image_size=32", "--weight_decay=0.003",
                     "--allow_random_init")
    network, _ = train.build_network(config, None)
    kernels = [v for v in network.trainable_variables
               if v.path.endswith("/kernel") and not v.path.startswith(HEAD_NAME + "/")]
    assert len(kernels) == 21  # ResNet-18: 17 convolutions + a projection per block group
    expected = 0.003 / 2 * sum(float(np.sum(np.square(v.numpy(), dtype=np.float64)))
                               for v in kernels)
    assert float(sum(network.losses)) == pytest.approx(expected, rel=1e-5)


def test_momentum_outside_zero_to_one_is_a_config_error():
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=rf"--momentum must be in \[0, 1\), got {bad}"):
            config_lib._validate_train(_config("--optimizer=sgd", f"--momentum={bad}",
                                               "--image_dir=/", "--train_steps=1",
                                               "--allow_random_init"))
