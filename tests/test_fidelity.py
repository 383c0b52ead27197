"""resnet_main against tensorflow/tpu's resnet_main.py / lars_util.py, in-process and cheap:
learning rates against the reference formulas written out in numpy here, Nesterov momentum,
label smoothing, the reference's command-line flags, chexnet's weighted BCE."""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags as absl_flags

import flags
from chexnet import splits
from chexnet import train as chexnet_train
from flags import tpu_compat
from hooks.practices import schedules
from imagenet import train
from imagenet.config import RunConfig
from tests.test_flags import _parse

IMAGENET = 1281167


def lr_at(schedule, steps):
    return np.asarray(keras.ops.convert_to_numpy(schedule(np.asarray(steps, np.int64))),
                      np.float64)


# ---------------------------------------------------------------- the reference, in numpy
def tpu_reference(steps, base_lr, batch, images, train_steps, milestones=None):
    """resnet_main.py: learning_rate_schedule(params, current_epoch) with get_lr_schedule."""
    scaled_lr = base_lr * (batch / 256.0)
    if milestones is None:
        steps_per_epoch = np.floor(images / batch)
        train_epochs = train_steps / steps_per_epoch
        milestones = [(1.0, np.floor(5 / 90 * train_epochs)),
                      (0.1, np.floor(30 / 90 * train_epochs)),
                      (0.01, np.floor(60 / 90 * train_epochs)),
                      (0.001, np.floor(80 / 90 * train_epochs))]
    current_epoch = np.asarray(steps, np.float64) / (images / batch)
    with np.errstate(divide="ignore", invalid="ignore"):
        decay_rate = scaled_lr * milestones[0][0] * current_epoch / milestones[0][1]
    for mult, start_epoch in milestones:
        decay_rate = np.where(current_epoch < start_epoch, decay_rate, scaled_lr * mult)
    return decay_rate


def lars_reference(steps, batch, images, train_steps, poly_rate=0.0):
    """lars_util.py: poly_rate_schedule(current_epoch, params), with
    tf.compat.v1.train.polynomial_decay(plr, step, decay_steps, power=2.0) and its default
    end_learning_rate=0.0001."""
    if batch < 16384:
        plr, w_epochs = 10.0, 5
    elif batch < 32768:
        plr, w_epochs = 25.0, 5
    elif batch < 65536:
        plr, w_epochs = 32.0, 14
    else:
        plr, w_epochs = 35.6, 40
    if poly_rate > 0.0:
        plr = poly_rate
    current_epoch = np.asarray(steps, np.float64) / (images / batch)
    wrate = plr * current_epoch / w_epochs
    w_steps = w_epochs * images // batch
    decay_step = np.maximum(1, np.asarray(steps) - w_steps)
    decay_steps = train_steps - w_steps + 1
    decay_step = np.minimum(decay_step, decay_steps)
    poly = (plr - 0.0001) * (1 - decay_step / decay_steps) ** 2.0 + 0.0001
    return np.where(current_epoch <= w_epochs, wrate, poly)


def _steps(total, every):
    """Every `every`-th step, each step around the reference's boundaries, and past the end."""
    return np.unique(np.concatenate([np.arange(0, total + 50, every),
                                     np.arange(total - 3, total + 3)]))


# ---------------------------------------------------------------- step schedule
@pytest.mark.parametrize("batch, train_steps", [
    (1024, 112590),  # the reference's 90-epoch default
    (1024, 56295),  # 45 epochs: milestones 2, 15, 30, 40
    (8192, 14075),  # the 2018 SURFsara command line
    (256, 333),  # a few epochs: some milestones fall on the same epoch
])
def test_tpu_schedule_follows_the_reference(batch, train_steps):
    config = RunConfig(train_batch_size=batch, train_steps=train_steps, base_learning_rate=0.1)
    schedule, preset = train.build_learning_rate(config)
    assert preset is None
    steps = _steps(train_steps, max(1, train_steps // 3000))
    expected = tpu_reference(steps, 0.1, batch, IMAGENET, train_steps)
    np.testing.assert_allclose(lr_at(schedule, steps), expected, rtol=1e-5, atol=1e-9)


def test_a_45_epoch_run_ends_at_a_thousandth_of_the_peak():
    peak = 0.1 * 1024 / 256
    stretched = RunConfig(train_epochs=45)
    fixed = RunConfig(train_epochs=45, lr_schedule="tpu_2018")
    last = stretched.total_steps - 1
    assert float(train.build_learning_rate(stretched)[0](last)) == pytest.approx(0.001 * peak)
    # The 2018 fixed-epoch schedule stays at x0.1 until epoch 60, after this run's end.
    assert float(train.build_learning_rate(fixed)[0](last)) == pytest.approx(0.1 * peak)


def test_tpu_2018_keeps_fixed_epochs_and_warmup_epochs_overrides():
    steps = _steps(1251 * 95, 97)
    config = RunConfig(lr_schedule="tpu_2018", train_epochs=45)
    fixed = [(1.0, 5), (0.1, 30), (0.01, 60), (0.001, 80)]
    np.testing.assert_allclose(lr_at(train.build_learning_rate(config)[0], steps),
                               tpu_reference(steps, 0.1, 1024, IMAGENET, None, fixed),
                               rtol=1e-5, atol=1e-9)
    config = RunConfig(train_epochs=45, warmup_epochs=3.5)
    stretched = [(1.0, 3.5), (0.1, 15), (0.01, 30), (0.001, 40)]
    np.testing.assert_allclose(lr_at(train.build_learning_rate(config)[0], steps),
                               tpu_reference(steps, 0.1, 1024, IMAGENET, None, stretched),
                               rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- LARS
@pytest.mark.parametrize("batch, poly_rate", [
    (8192, 0.0), (16384, 0.0), (32768, 0.0), (65536, 0.0), (32768, 29.0), (4096, 3.0)])
def test_lars_schedule_follows_lars_util(batch, poly_rate):
    train_steps = round(90 * IMAGENET / batch)
    config = RunConfig(enable_lars=True, poly_rate=poly_rate, train_batch_size=batch,
                       train_steps=train_steps)
    schedule, _ = train.build_learning_rate(config)
    steps = _steps(train_steps, 7)
    expected = lars_reference(steps, batch, IMAGENET, train_steps, poly_rate)
    np.testing.assert_allclose(lr_at(schedule, steps), expected, rtol=2e-5, atol=1e-7)
    assert isinstance(train.build_optimizer(config, schedule, lars=True), train.LARS)


def test_lars_defaults_by_global_batch():
    table = {1024: (10.0, 5), 16383: (10.0, 5), 16384: (25.0, 5), 32767: (25.0, 5),
             32768: (32.0, 14), 65535: (32.0, 14), 65536: (35.6, 40), 131072: (35.6, 40)}
    assert {b: schedules.lars_defaults(b) for b in table} == table


def test_new_schedules_round_trip_their_config():
    for schedule in (schedules.TPUStepSchedule(0.4, 1251.1, [(1.0, 5), (0.1, 30)]),
                     schedules.TPULarsSchedule(25.0, 39.1, 5, 195, 3519)):
        again = keras.optimizers.schedules.deserialize(
            keras.optimizers.schedules.serialize(schedule))
        assert again.get_config() == schedule.get_config()
        np.testing.assert_array_equal(lr_at(again, range(0, 4000, 37)),
                                      lr_at(schedule, range(0, 4000, 37)))


# ---------------------------------------------------------------- optimizer and loss
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_momentum_is_the_references(nesterov):
    """tf.compat.v1.train.MomentumOptimizer: accum = m * accum + g; w -= lr * accum, or with
    use_nesterov w -= lr * g + lr * m * accum (constant lr: Keras' form is the same)."""
    optimizer = train.build_optimizer(RunConfig(momentum=0.9, nesterov=nesterov), 0.1)
    w = keras.Variable(np.array([1.0, -2.0], np.float32))
    expected, accum = np.array([1.0, -2.0]), np.zeros(2)
    for g in ([0.5, 0.25], [-1.0, 2.0], [0.3, 0.3]):
        g = np.asarray(g)
        optimizer.apply([g.astype(np.float32)], [w])
        accum = 0.9 * accum + g
        expected = expected - (0.1 * g + 0.1 * 0.9 * accum if nesterov else 0.1 * accum)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_nesterov_is_the_default_as_in_the_reference():
    """The reference builds MomentumOptimizer(use_nesterov=True): so do the flag default and
    the optimizer an unflagged run gets (classic momentum only with --nonesterov)."""
    assert train.build_optimizer(RunConfig(momentum=0.9), 0.1).nesterov is True
    assert train.build_optimizer(RunConfig(momentum=0.9, nesterov=False), 0.1).nesterov is False


def test_label_smoothing_loss_is_the_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2, 1, 3])
    z = logits - logits.max(1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(1, keepdims=True))
    for smoothing in (0.0, 0.1, 0.3):
        target = np.eye(5)[labels] * (1 - smoothing) + smoothing / 5
        expected = -(target * log_softmax).sum(1).mean()
        loss = train.build_loss(smoothing, 5)(labels, logits)
        assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_chexnet_loss_is_the_weighted_bce_formula():
    rng = np.random.default_rng(1)
    labels = (rng.random((40, 14)) < 0.3).astype(np.float32)
    labels[:, 13] = 0  # a class without positives
    probs = rng.uniform(0.01, 0.99, size=(40, 14)).astype(np.float32)
    pos, neg = splits.class_weights(labels)
    p_count, n_count = labels.sum(0), (1 - labels).sum(0)
    np.testing.assert_allclose(pos, n_count / (p_count + n_count), rtol=1e-6)
    np.testing.assert_allclose(neg, p_count / (p_count + n_count), rtol=1e-6)
    per_element = -(pos * labels * np.log(probs) + neg * (1 - labels) * np.log(1 - probs))
    loss = chexnet_train.make_loss(pos, neg)(labels, probs)
    np.testing.assert_allclose(loss, per_element.mean(1), rtol=1e-5)


# ---------------------------------------------------------------- the reference's flags
# Every flag resnet_main.py defines or reads from hyperparameters/common_tpu_flags.py and
# common_hparams_flags.py (tensorflow/tpu master), with a value a TPU user might pass.
REFERENCE_ARGV = [
    "--tpu=grpc://10.0.0.2:8470", "--gcp_project=p", "--tpu_zone=us-central1-b",
    "--eval_master=m", "--use_tpu=false", "--data_dir=/d", "--model_dir=/m",
    "--train_batch_size=1024", "--train_steps=112590", "--eval_batch_size=1024",
    "--skip_host_call", "--iterations_per_loop=1251", "--precision=bfloat16",
    "--config_file=", "--params_override=", "--eval_after_training", "--resnet_depth=50",
    "--num_train_images=1281167", "--num_eval_images=50000", "--num_label_classes=1001",
    "--data_format=channels_last", "--transpose_input", "--use_cache", "--image_size=224",
    "--dropblock_groups=", "--dropblock_keep_prob=0.9", "--dropblock_size=7",
    "--pre_activation=false", "--norm_act_layer=bn_relu", "--profile_every_n_steps=100",
    "--mode=train", "--steps_per_eval=1251", "--eval_timeout=600", "--num_parallel_calls=8",
    "--num_cores=8", "--bigtable_project=bp", "--bigtable_instance=",
    "--bigtable_table=imagenet", "--bigtable_train_prefix=train_",
    "--bigtable_eval_prefix=validation_", "--bigtable_column_family=tfexample",
    "--bigtable_column_qualifier=example", "--export_dir=/e", "--export_to_tpu",
    "--base_learning_rate=0.1", "--momentum=0.9", "--weight_decay=1e-4",
    "--label_smoothing=0.1", "--enable_lars", "--poly_rate=25", "--use_async_checkpointing",
    "--log_step_count_steps=64", "--augment_name=", "--randaug_num_layers=2",
    "--randaug_magnitude=10", "--add_warmup_requests", "--model_name=resnet",
    "--inference_batch_sizes=8", "--export_moving_average",
]


def test_a_tpu_command_line_runs_unchanged():
    fv = _parse(REFERENCE_ARGV)
    assert {a[2:].split("=")[0] for a in REFERENCE_ARGV} <= set(fv)
    config = flags.fill(RunConfig, fv)
    assert (config.num_label_classes, config.include_background_label) == (1001, True)
    assert (config.enable_lars, config.poly_rate, config.log_every_n_steps) == (True, 25.0, 64)
    assert (config.num_parallel_calls, config.use_cache, config.eval_after_training) == (
        8, True, True)
    warned = [line.split("=")[0].removeprefix("warning: --")
              for line in tpu_compat.ignored_warnings(fv)]
    assert warned == [name for name in tpu_compat.IGNORED
                      if any(a.startswith(f"--{name}") for a in REFERENCE_ARGV)]
    assert "tpu" in warned and "bigtable_table" in warned and "use_tpu" not in warned


def test_ignored_flags_warn_once_on_rank_0(capsys):
    fv = _parse(["--tpu=t", "--num_cores=8"])
    tpu_compat.warn_ignored("resnet_main", fv, environ={"OMPI_COMM_WORLD_RANK": "1"})
    assert capsys.readouterr().err == ""
    tpu_compat.warn_ignored("resnet_main", fv, environ={})
    assert capsys.readouterr().err.splitlines() == [
        "resnet_main: warning: --tpu=t ignored: a Cloud TPU setting",
        "resnet_main: warning: --num_cores=8 ignored: a Cloud TPU setting (ranks come from "
        "the launcher)"]


@pytest.mark.parametrize("arg", [
    "--dropblock_groups=3,4", "--augment_name=randaugment", "--pre_activation",
    "--norm_act_layer=evonorm_b0", "--bigtable_instance=i", "--config_file=c.yaml",
    "--params_override=train_steps: 10", "--use_tpu", "--data_format=channels_first"])
def test_reference_flags_this_version_cannot_honour_are_one_line_errors(arg):
    name = arg[2:].split("=")[0]
    with pytest.raises(absl_flags.IllegalFlagValueError) as err:
        _parse([arg])
    message = str(err.value)
    assert f"--{name} is not supported: " in message and "\n" not in message


@pytest.mark.slow
def test_the_recipe_registry_imports_no_keras():
    """Flag checks run before TensorFlow starts: importing the recipe registry and both
    configs (chexnet's names its backbones without chexnet.model) loads no Keras or TF."""
    code = ("import sys, hooks.practices.recipes, imagenet.config, chexnet.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('keras', 'tensorflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]"
    from imagenet import config as config_lib

    assert set(config_lib.PRESET_NAMES) == set(schedules.PRESETS) - {"tpu"}
