"""chexnet learns (issue #14): defaults that suit each other, initialisation said loudly, a
guard against collapsed predictions, batch-norm statistics that fit the weights, Grad-CAM
that points where it should, and predict's output names.

The overfit check on the 50 real X-rays and the Grad-CAM pointing test train networks:
marked slow. The rest is in-process and cheap.
"""

import dataclasses

import keras
import numpy as np
import pytest

from chexnet import batchnorm, evaluate, metrics, predict, reports, train
from chexnet import config as config_lib
from chexnet import model as model_lib
from chexnet.config import ChexnetConfig
from chexnet.model import InitSource
from hooks.distributed.horovod_glue import Context
from hooks.errors import ConfigError
from tests.conftest import SHARED_DATA, shared_data

CX = SHARED_DATA / "chestxray14"
QUIET = dict(log=lambda *a, **k: None)

# ----------------------------------------------------------------- learning-rate rule


def test_default_learning_rate_follows_the_optimizer():
    checkpoint = InitSource("checkpoint", "/pre/ckpt-1", learning_rate=0.025)
    adam = ChexnetConfig(train_batch_size=64)
    sgd = dataclasses.replace(adam, optimizer="sgd")
    # Adam never inherits the checkpoint's SGD rate: CheXNet's 1e-3.
    assert train.peak_learning_rate(adam, checkpoint)[0] == 1e-3
    assert train.peak_learning_rate(adam, InitSource("none"))[0] == 1e-3
    # SGD: the 2018 advice (the checkpoint's rate), else linear scaling 0.1 * B / 256.
    assert train.peak_learning_rate(sgd, checkpoint)[0] == 0.025
    assert train.peak_learning_rate(sgd, InitSource("none"))[0] == pytest.approx(0.1 * 64 / 256)
    given = dataclasses.replace(adam, learning_rate=3e-4)
    assert train.peak_learning_rate(given, checkpoint) == (3e-4, "--learning_rate")


def test_adam_rate_far_outside_its_range_is_refused_or_warned():
    with pytest.raises(ConfigError, match=r"--learning_rate=0\.025 is far above Adam"):
        config_lib.check_learning_rate(ChexnetConfig(learning_rate=0.025))
    config_lib.check_learning_rate(ChexnetConfig(learning_rate=0.025, optimizer="sgd"))
    assert "outside its usual range" in config_lib.learning_rate_warning("adam", 5e-3)
    assert "outside its usual range" in config_lib.learning_rate_warning("adam", 1e-7)
    assert config_lib.learning_rate_warning("adam", 1e-3) is None
    assert config_lib.learning_rate_warning("sgd", 1.6) is None


# ----------------------------------------------------------------- initialisation


def test_random_initialisation_must_be_asked_for(tmp_path):
    base = ChexnetConfig(mode="train", image_dir=str(tmp_path), train_steps=1,
                         model_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="random weights.*--allow_random_init"):
        config_lib.validate(base)
    config_lib.validate(dataclasses.replace(base, allow_random_init=True))
    config_lib.validate(dataclasses.replace(base, weights_file="imagenet"))  # not a path
    with pytest.raises(ConfigError, match="--weights_file applies to densenet121/vgg16"):
        config_lib.validate(dataclasses.replace(base, weights_file="imagenet",
                                                backbone="resnet50"))
    with pytest.raises(ConfigError, match="--weights_file=nope.h5 does not exist"):
        config_lib.validate(dataclasses.replace(base, weights_file="nope.h5"))


@pytest.mark.slow  # builds VGG16 (a few seconds)
def test_imagenet_weights_without_internet_is_one_line_error(monkeypatch, tmp_path):
    """Keras downloads its published weights into KERAS_HOME/models; with an empty cache and
    no internet (this machine) the user gets one line saying what to do instead."""
    import keras.src.backend.config as keras_config

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # an empty cache
    try:
        network, init = model_lib.build_chexnet_model("vgg16_pooled", 32,
                                                      weights_file="imagenet")
    except model_lib.ModelError as err:
        message = str(err)
        assert "\n" not in message
        assert message.startswith("--weights_file=imagenet: cannot get Keras's ImageNet "
                                  "weights for vgg16_pooled")
        assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
        assert "--weights_file=PATH" in message
    else:  # a machine that can download
        assert init.kind == "imagenet" and network.count_params() > 14e6
    # vgg16 keeps fc1, whose ImageNet weights take 224 px images: a ConfigError before any
    # download (a failed download is a ModelError).
    with pytest.raises(ConfigError, match="--image_size=32: .*--backbone=vgg16 .*224"):
        model_lib.build_chexnet_model("vgg16", 32, weights_file="imagenet")
    with pytest.raises(ConfigError, match="--image_size=32: .*224"):
        config_lib.validate(ChexnetConfig(mode="train", image_dir=str(tmp_path), train_steps=1,
                                          model_dir=str(tmp_path / "out"), backbone="vgg16",
                                          image_size=32, weights_file="imagenet"))


@pytest.mark.slow  # VGG16 with its fc layers (34M parameters at 32 px) written and read back
def test_vgg16_backbone_keeps_the_fc_layers(tmp_path):
    from hooks.state import checkpoints
    from imagenet import models

    keras.utils.set_random_seed(5)
    classifier = models.build_classifier("vgg16", 10, 32)  # resnet_main's vgg16
    checkpoints.save(str(tmp_path), 1, classifier, None,
                     {"architecture": "vgg16", "num_label_classes": 10,
                      "network": checkpoints.describe(classifier)})
    pretrained = model_lib.find_pretrained_checkpoint(str(tmp_path), "latest")
    network, init = model_lib.build_chexnet_model("vgg16", 32, pretrained=pretrained)
    assert init.kind == "checkpoint"
    # The head reads fc2's 4096 features; conv blocks, fc1 and fc2 are the checkpoint's.
    assert model_lib.head_layer(network).kernel.shape == (4096, 14)
    for name in ("block1_conv1", "block5_conv3", "fc1", "fc2"):
        for ours, theirs in zip(network.get_layer(name).get_weights(),
                                classifier.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs)
    reference = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), classes=14)
    assert network.count_params() == reference.count_params()
    assert model_lib.last_conv_layer(network).name == "block5_pool"  # Grad-CAM's target
    pooled, _ = model_lib.build_chexnet_model("vgg16_pooled", 32)
    assert model_lib.head_layer(pooled).kernel.shape == (512, 14)


def test_preprocessing_follows_where_the_weights_came_from():
    table = {("vgg16", "checkpoint"): "torch",  # resnet_main trains on mean/std input
             ("vgg16", "weights_file"): "caffe", ("vgg16", "imagenet"): "caffe",
             ("vgg16_pooled", "imagenet"): "caffe", ("vgg16_pooled", "checkpoint"): "torch",
             ("densenet121", "imagenet"): "torch", ("resnet50", "checkpoint"): "torch",
             ("vgg16", "none"): "torch"}
    for (backbone, kind), expected in table.items():
        assert model_lib.preprocessing_for(backbone, kind) == expected, (backbone, kind)
    state = {"backbone": "vgg16", "image_size": 64, "preprocessing": "torch",
             "image_view": "whole"}
    options = model_lib.input_options(state, cache="memory")
    assert (options.image_size, options.preprocessing, options.view, options.cache) == (
        64, "torch", "whole", "memory")
    legacy = model_lib.input_options({"backbone": "vgg16", "image_size": 64})
    assert (legacy.preprocessing, legacy.view) == ("caffe", "crop")  # what it was trained with


# ----------------------------------------------------------------- collapse guard


def test_prediction_warnings_flag_collapse_and_saturation():
    rng = np.random.default_rng(0)
    healthy = rng.uniform(0.05, 0.95, (20, 14))
    assert metrics.prediction_warnings(healthy) == []
    flat = np.tile(rng.uniform(0.2, 0.8, 14), (20, 1)) + rng.uniform(0, 5e-4, (20, 14))
    (warning,) = metrics.prediction_warnings(flat)
    assert warning.startswith("predictions do not depend on the image: for every class the "
                              "20 images' probabilities differ by less than 0.001")
    one_class_moves = flat.copy()
    one_class_moves[:, 3] = rng.uniform(0, 1, 20)
    assert metrics.prediction_warnings(one_class_moves) == []
    saturated = healthy.copy()
    saturated[:, :8] = np.where(rng.random((20, 8)) < 0.5, 1e-5, 1 - 1e-5)
    saturated[:, 13] = 1.0
    (warning,) = metrics.prediction_warnings(saturated)
    assert warning.startswith("64% of the probabilities are within 0.001 of 0 or 1")
    assert "; on every image: Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, " \
        "Nodule, Pneumonia, Pneumothorax, Hernia (" in warning
    # The demo: the same saturated column for every image -> both warnings.
    column = np.where(np.arange(14) % 2 == 0, 0.0, 1.0)
    assert len(metrics.prediction_warnings(np.tile(column, (3, 1)))) == 2
    assert len(metrics.prediction_warnings(column[None])) == 1  # one image: no spread


def test_collapse_warning_reaches_log_report_and_summary():
    rng = np.random.default_rng(1)
    labels = (rng.random((12, 14)) < 0.3).astype(np.float32)
    labels[0], labels[1] = 1, 0
    scored = evaluate.score(np.full((12, 14), 0.37), labels, np.arange(12))
    assert len(scored.warnings) == 1
    lines, summary = [], {"mode": "evaluate"}
    evaluate.report(None, scored, "t", summary, Context(), lines.append)
    assert "WARNING: " + scored.warnings[0] in lines  # a log line of its own
    assert "**WARNING**: " + scored.warnings[0] in lines[0]  # auroc.md's text
    assert summary["warnings"] == scored.warnings  # summary.json, SUMMARY line
    assert '"warnings": ["predictions do not depend' in lines[-1]


# ----------------------------------------------------------------- batch norm


def _bn_network():
    from imagenet.models import FusedBatchNormalization

    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = keras.layers.ReLU()(FusedBatchNormalization(momentum=0.9, epsilon=1e-5, name="bn1")(x))
    x = keras.layers.Conv2D(5, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.99, name="bn2")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(14, activation="sigmoid")(x))


def test_recomputed_bn_statistics_are_the_mean_batch_statistics():
    import tensorflow as tf

    network = _bn_network()
    rng = np.random.default_rng(0)
    batches = [(rng.normal(2.0, 3.0, (6, 8, 8, 3)).astype(np.float32), np.zeros((6, 14)))
               for _ in range(3)]
    ds = tf.data.Dataset.from_tensor_slices(
        tuple(np.concatenate(c) for c in zip(*batches))).batch(6)
    assert batchnorm.recompute(network, ds, 3, Context()) == 3
    # Reference: each layer's input in training mode, numpy moments per batch, averaged.
    for name in ("bn1", "bn2"):
        layer = network.get_layer(name)
        probe = keras.Model(network.input, layer.input)
        stats = [(a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2)))
                 for a in (probe(x, training=True).numpy().astype(np.float64)
                           for x, _ in batches)]
        np.testing.assert_allclose(layer.moving_mean.numpy(),
                                   np.mean([m for m, _ in stats], axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(),
                                   np.mean([v for _, v in stats], axis=0), rtol=1e-4)
    assert batchnorm.recompute(network, ds, 0, Context()) == 0


def test_recomputed_bn_makes_inference_mode_match_training_mode():
    """What a short fine-tune leaves: moving averages far from the weights' statistics.
    After recomputing them on a batch, inference mode gives that batch's training-mode
    outputs (same normalisation), which the stale averages do not."""
    import tensorflow as tf

    network = _bn_network()
    x = np.random.default_rng(1).normal(2.0, 3.0, (8, 8, 8, 3)).astype(np.float32)
    stale = network(x, training=False).numpy()
    ds = tf.data.Dataset.from_tensors((x, np.zeros((8, 14))))
    batchnorm.recompute(network, ds, 1, Context())
    inference = network(x, training=False).numpy()
    training = network(x, training=True).numpy()
    assert np.abs(stale - training).max() > 0.05
    np.testing.assert_allclose(inference, training, atol=2e-4)


# ----------------------------------------------------------------- Grad-CAM


def test_overlay_keeps_the_grey_levels_and_shows_nothing_for_a_flat_map():
    view = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8)[None, :, None], (64, 1, 3))
    cam = np.zeros((8, 8))
    cam[2:4, 2:4] = 1.0
    image = predict.overlay(view, cam)
    heat = predict.upsample(cam, view.shape)
    untouched = heat == 0
    assert untouched.mean() > 0.5
    np.testing.assert_array_equal(image[untouched], view[untouched])  # grey levels as they are
    hot = heat > 0.9
    assert np.abs(image[hot].astype(int) - view[hot]).max() > 60  # coloured where it points
    for flat in (np.zeros((8, 8)), np.ones((8, 8)), np.full((1, 1), 0.7)):
        assert predict.is_flat(flat)
        np.testing.assert_array_equal(predict.overlay(view, flat), view)
    assert not predict.is_flat(cam)
    assert predict.cam_title("x.png", "Edema", 0.5, flat=True).endswith(
        "Grad-CAM flat: no region stands out")
    assert "flat" not in predict.cam_title("x.png", "Edema", 0.5, flat=False)


def _squares(n, rng, size=32, side=6):
    """Uniform noise images; every other one has a bright side x side square somewhere."""
    x = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    y = np.zeros((n, 1), np.float32)
    boxes = []
    for i in range(n):
        if i % 2:
            boxes.append(None)
            continue
        r, c = rng.integers(0, size - side + 1, 2)
        x[i, r:r + side, c:c + side] += 1.5
        y[i] = 1
        boxes.append((r, c))
    return x, y, boxes


@pytest.mark.slow  # trains a tiny network (10-20 s)
def test_grad_cam_points_at_the_bright_square():
    """A known answer: a small CNN learns "is there a bright square"; on held-out images the
    Grad-CAM maximum (upsampled to the image, as in the overlay) lies inside the square."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x, y, _ = _squares(512, rng)
    inputs = keras.Input(x.shape[1:])
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)  # 16x16 map
    probs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(h))
    network = keras.Model(inputs, probs)
    network.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    network.fit(x, y, batch_size=32, epochs=8, verbose=0)
    held_out, _, boxes = _squares(100, rng)
    hits = []
    for image, box in zip(held_out, boxes):
        if box is None:
            continue
        cam = predict.upsample(predict.grad_cam(network, image, 0), image.shape)
        r, c = np.unravel_index(np.argmax(cam), cam.shape)
        hits.append(box[0] <= r < box[0] + 6 and box[1] <= c < box[1] + 6)
    assert len(hits) == 50 and np.mean(hits) >= 0.9, np.mean(hits)


# ----------------------------------------------------------------- predict's names


def test_output_names_are_unique_per_input_path(tmp_path):
    names, heat = predict.output_names(["d/x.png", "d/y.png"])
    assert names == ["x.png", "y.png"] and heat == ["x_gradcam.png", "y_gradcam.png"]
    names, heat = predict.output_names(["a/x.png", "b/x.png"])
    assert names == ["a/x.png", "b/x.png"] and heat == ["a_x_gradcam.png", "b_x_gradcam.png"]
    names, heat = predict.output_names(["r/a/c/x.png", "s/a/c/x.png", "r/b/x.png"])
    assert names == ["r/a/c/x.png", "s/a/c/x.png", "b/x.png"]
    assert heat == ["r_a_c_x_gradcam.png", "s_a_c_x_gradcam.png", "b_x_gradcam.png"]
    names, heat = predict.output_names(["d/x.png", "d/x.jpg"])
    assert heat == ["x_png_gradcam.png", "x_jpg_gradcam.png"]
    with pytest.raises(ConfigError, match="given twice"):
        predict.output_names(["d/x.png", "d/../d/x.png"])


# ----------------------------------------------------------------- overfit (real X-rays)


@pytest.mark.slow  # trains a ResNet-18 on 50 real X-rays (about 1-3 minutes on 2 cores)
def test_finetune_can_fit_the_50_real_xrays(tmp_path):
    """All 50 shared X-rays as training data, default optimizer and learning rate (Adam
    1e-3), tiny backbone: in inference mode on the same images every class with >= 3
    positives reaches AUROC >= 0.95 (a network that cannot fit 50 images cannot learn)."""
    from sklearn.metrics import roc_auc_score

    data = dict(csv=str(shared_data(CX / "Data_Entry_2017.csv.gz")),
                image_dir=str(shared_data(CX / "images")),
                only_present_images=True, split_fractions=(1.0, 0.0, 0.0), backbone="resnet18",
                image_size=32, cache="memory", model_dir=str(tmp_path / "run"))
    summary = train.run(ChexnetConfig(mode="train", allow_random_init=True, train_batch_size=16,
                                      train_steps=40, seed=0, **data), Context(), **QUIET)
    assert summary["peak_learning_rate"] == 1e-3 and summary["val_images"] == 0
    result = evaluate.run(ChexnetConfig(mode="evaluate", eval_split="all", eval_batch_size=25,
                                        report_dir=str(tmp_path / "eval"), **data),
                          Context(), **QUIET)
    assert result["images"] == 50 and result["warnings"] == []
    names, probs = reports.read_predictions_csv(str(tmp_path / "eval" / "predictions.csv"))
    labels = _labels_of(names)
    for k in np.flatnonzero(labels.sum(axis=0) >= 3):
        assert roc_auc_score(labels[:, k], probs[:, k]) >= 0.95, k


def _labels_of(names):
    from chexnet import splits

    table = splits.read_data_entry(CX / "Data_Entry_2017.csv.gz")
    row = {n: i for i, n in enumerate(table.image_index)}
    return table.labels[[row[n] for n in names]]
