"""Checkpoints written with Keras's BatchNormalization (the format of every DenseNet
checkpoint before fused batch norm became the default) load into the fused default, and the
other way round. The old-format checkpoints are written here by the code of that time: the
model built with ``fused_bn=False`` and saved by `hooks.state.checkpoints.save`; the reference
values are that model's own outputs and weights."""

import h5py
import keras
import numpy as np
import pytest

from chexnet import model as model_lib
from chexnet import train
from chexnet.config import ChexnetConfig
from hooks.distributed.horovod_glue import Context
from hooks.state import bn_weights, checkpoints
from imagenet import models
from tests.conftest import SHARED_DATA, shared_data

CX = SHARED_DATA / "chestxray14"


def _bn_classes(network) -> set:
    return {type(layer) for layer in network.layers
            if isinstance(layer, keras.layers.BatchNormalization)}


def _distinct_bn_statistics(network, seed=0):
    """Give every batch norm its own gamma/beta/moving statistics, so that a layer loaded
    from another layer's entry (of the same shape) changes the outputs."""
    rng = np.random.default_rng(seed)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.3, 0.3, n),
                               rng.uniform(-0.3, 0.3, n), rng.uniform(0.5, 1.5, n)])


def _save(network, folder, step=1) -> checkpoints.Checkpoint:
    path = checkpoints.save(str(folder), step, network, None,
                            {"network": checkpoints.describe(network)})
    return checkpoints.read(path)


@pytest.mark.parametrize("written_fused", [False, True])
def test_densenet_checkpoint_loads_across_batch_norm_classes(tmp_path, written_fused):
    """written_fused=False: today's old format into the fused default (the upgrade path);
    True: a fused checkpoint into --fused_bn=false."""
    keras.utils.set_random_seed(0)
    old, _ = model_lib.build_chexnet_model("densenet121", 32, fused_bn=written_fused)
    _distinct_bn_statistics(old)
    ckpt = _save(old, tmp_path / "run")
    key = "fused_batch_normalization_7" if written_fused else "batch_normalization_7"
    with h5py.File(f"{ckpt.path}/{checkpoints.WEIGHTS}") as f:
        assert f"layers/{key}/vars/3" in f  # the format Keras writes for that class

    keras.utils.set_random_seed(1)  # other random weights: only the load can make them equal
    new, _ = model_lib.build_chexnet_model("densenet121", 32, fused_bn=not written_fused)
    assert _bn_classes(new) == {keras.layers.BatchNormalization if written_fused
                                else models.FusedBatchNormalization}
    lines = []
    checkpoints.restore(ckpt, new, log=lines.append)

    count = sum(isinstance(x, keras.layers.BatchNormalization) for x in old.layers)
    assert count == 121  # DenseNet-121's batch norms
    assert len(lines) == 1 and f"converted {count} batch-norm entries" in lines[0]
    assert f"{ckpt.path}/{checkpoints.WEIGHTS}" in lines[0]
    want = {w.path: np.asarray(w) for w in old.weights}
    assert {w.path for w in new.weights} == set(want)
    for w in new.weights:
        np.testing.assert_array_equal(np.asarray(w), want[w.path], err_msg=w.path)
    x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(new(x, training=False), old(x, training=False), atol=1e-5)


def test_a_checkpoint_of_the_same_class_loads_without_converting(tmp_path):
    keras.utils.set_random_seed(0)
    net = _small(models.FusedBatchNormalization)
    _distinct_bn_statistics(net)
    ckpt = _save(net, tmp_path / "run")
    lines = []
    again = _small(models.FusedBatchNormalization)
    checkpoints.restore(ckpt, again, log=lines.append)
    assert lines == []
    for a, b in zip(again.get_weights(), net.get_weights()):
        np.testing.assert_array_equal(a, b)


def _small(bn_class, channels=(4, 8)):
    inputs = keras.Input((6, 6, 3), name="image")
    x = inputs
    for i, c in enumerate(channels):
        x = keras.layers.Conv2D(c, 3, padding="same", name=f"conv{i}")(x)
        x = bn_class(name=f"bn{i}")(x)
    return keras.Model(inputs, x, name="small")


@pytest.mark.parametrize("channels", [(4, 9), (4, 8, 8)])
def test_entries_that_do_not_line_up_fail_naming_the_file(tmp_path, channels):
    """Another shape at a position, or another number of layers: one line naming the
    weights file, and nothing of the model changed."""
    old = _small(keras.layers.BatchNormalization)
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    new = _small(models.FusedBatchNormalization, channels)
    before = new.get_weights()
    with pytest.raises(bn_weights.WeightsMismatch) as err:
        bn_weights.load_weights(new, path)
    assert path in str(err.value) and "\n" not in str(err.value)
    for a, b in zip(new.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    # Through a checkpoint: a CheckpointError (another model), not a damaged checkpoint.
    ckpt = _save(old, tmp_path / "run")
    with pytest.raises(checkpoints.CheckpointError, match="does not fit model small"):
        checkpoints.restore(ckpt._replace(state={}), new)


@pytest.mark.slow  # two short DenseNet-121 chexnet runs on the shared X-rays (~1-3 min)
def test_chexnet_resumes_an_old_format_run_with_the_fused_default(tmp_path):
    """A run written with Keras's batch norm (--fused_bn=false, today's checkpoints) is
    resumed by the default: it continues from step 1 (its weights, not a fresh start) and
    says it converted the checkpoint."""
    data = dict(csv=str(shared_data(CX / "Data_Entry_2017.csv.gz")),
                image_dir=str(shared_data(CX / "images")), only_present_images=True,
                split_fractions=(0.6, 0.2, 0.2), backbone="densenet121", image_size=32,
                cache="memory", model_dir=str(tmp_path / "run"), allow_random_init=True,
                train_batch_size=4, eval_batch_size=8, bn_stats_images=0, steps_per_loop=1,
                learning_rate=1e-5)
    train.run(ChexnetConfig(mode="train", train_steps=1, seed=0, fused_bn=False, **data),
              Context(), log=lambda *a, **k: None)
    first = checkpoints.latest(data["model_dir"])
    assert first.step == 1
    reference = model_lib.build_chexnet_model("densenet121", 32, fused_bn=False)[0]
    reference.load_weights(f"{first.path}/{checkpoints.WEIGHTS}")  # Keras's own loader

    lines = []
    train.run(ChexnetConfig(mode="train", train_steps=2, seed=1, **data), Context(),
              log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert sum("converted 121 batch-norm entries" in line for line in lines) == 1
    last = checkpoints.latest(data["model_dir"])
    assert last.step == 2
    with np.load(f"{last.path}/{checkpoints.OPTIMIZER}") as opt:
        assert int(opt["arr_0"]) == 2  # the optimizer's step count: restored 1, + 1
    resumed = model_lib.build_chexnet_model("densenet121", 32)[0]
    resumed.load_weights(f"{last.path}/{checkpoints.WEIGHTS}")
    # One more step at lr <= 1e-5 moves no weight by more than ~1e-5; a fresh start from
    # seed 1 would differ by the scale of the random initialisation.
    for a, b in zip(resumed.trainable_weights, reference.trainable_weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=a.path)
