"""The shared loop in-process (flax's train_test style): one-step runs of
`imagenet.train.run` and `chexnet.train.run` with tiny models, and unit tests of the loop's
callbacks and distributed-evaluation helpers. No launcher, no subprocess."""
import csv
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.metrics import roc_auc_score

from chexnet import evaluate as chexnet_evaluate
from chexnet import train as chexnet_train
from chexnet.config import ChexnetConfig
from chexnet.labels import CLASS_NAMES
from hooks.distributed.horovod_glue import Context, DistributedTrainer
from hooks.practices import schedules
from hooks.state import checkpoints
from hooks.training import callbacks as cb
from hooks.training import evaluation, loop
from imagenet import models
from imagenet import train as imagenet_train
from imagenet.config import RunConfig

QUIET = dict(log=lambda *a, **k: None)
TINY_RESNET = dict(use_synthetic_data=True, resnet_depth=18, image_size=32, num_label_classes=5,
                   train_batch_size=4, eval_batch_size=4, num_train_images=40,
                   num_eval_images=6, iterations_per_loop=2, steps_per_eval=2,
                   log_every_n_steps=1, warmup_epochs=0.5, seed=1)


def _state(model_dir, step):
    return json.loads((model_dir / f"ckpt-{step:09d}" / "state.json").read_text())


@pytest.mark.slow  # in-process, but 10-15 s of training and evaluation
def test_imagenet_run_trains_evaluates_and_checkpoints(tmp_path):
    config = RunConfig(mode="train_and_eval", train_steps=2, model_dir=str(tmp_path),
                       lr_schedule="tpu_2018", export_dir=str(tmp_path / "export"),
                       **TINY_RESNET)
    summary = imagenet_train.run(config, Context(), **QUIET)
    assert (summary["start_step"], summary["final_step"], summary["eval_images"]) == (0, 2, 6)
    state = _state(tmp_path, 2)
    assert state["metrics"]["top_1"] == summary["top_1"]  # the evaluation of the same loop
    # The recorded lr is the TPU schedule's at step 2: warm-up 0.5 epoch = 5 steps from 0
    # to peak 0.1 * 4 / 256.
    assert state["learning_rate"] == pytest.approx(0.1 * 4 / 256 * 2 / 5, rel=1e-6)
    # The exported .keras file (custom fused batch norm inside) reloads and gives the
    # logits of the final checkpoint's weights.
    exported = keras.models.load_model(summary["exported"])
    network = models.build_classifier("resnet", 5, 32, depth=18)
    checkpoints.restore(checkpoints.latest(str(tmp_path)), network)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    expected = network(x, training=False).numpy()
    np.testing.assert_allclose(exported(x, training=False).numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    assert np.abs(expected).max() > 1e-3  # not a trivially equal all-zero output
    # The SavedModel beside it serves the same logits through TensorFlow alone.
    loaded = tf.saved_model.load(summary["saved_model"])  # keep it: it owns the variables
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), expected, rtol=1e-5,
                               atol=1e-6)



def _xray_sample(folder, n=12):
    """n PNGs with ChestX-ray14 names and a 2017-format label CSV; patient i has image i.
    Effusion images carry a bright band, so the labels are learnable."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rows = [["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
             "Patient Gender", "View Position", ""]]
    for i in range(n):
        pixels = rng.integers(0, 120, (40, 40), dtype=np.uint8)
        findings = "Effusion|Mass" if i % 2 else "No Finding"
        if i % 2:
            pixels[25:35] = 250
        name = f"{i + 1:08d}_000.png"
        Image.fromarray(pixels, "L").save(folder / name)
        rows.append([name, findings, "0", str(i + 1), "050Y", "M", "PA", ""])
    path = folder / "Data_Entry_2017.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.mark.slow  # in-process, but 20-30 s: fine-tune, statistics pass, two evaluations
def test_chexnet_run_finetunes_and_reports(tmp_path):
    csv_path = _xray_sample(tmp_path / "x")
    common = dict(csv=str(csv_path), image_dir=str(tmp_path / "x"), backbone="resnet18",
                  image_size=32, allow_random_init=True, split_fractions=(0.5, 0.5, 0.0),
                  eval_batch_size=4, model_dir=str(tmp_path / "run"), seed=0)
    summary = chexnet_train.run(ChexnetConfig(mode="train", train_batch_size=2, train_steps=2,
                                              bn_stats_images=4, **common), Context(), **QUIET)
    assert (summary["final_step"], summary["val_images"]) == (2, 6)
    assert _state(tmp_path / "run", 2)["task"] == "chexnet"
    report = tmp_path / "run" / "report"
    assert (report / "auroc.csv").is_file() and (report / "roc_curves.png").is_file()

    rows = {r[0]: r[1] for r in csv.reader(open(report / "auroc.csv"))}
    # Effusion and Mass have positives and negatives among the 6 validation images: defined.
    assert rows["Hernia"] == "n/a"
    # The same weights' predictions, gathered by `evaluate`, scored by sklearn. Evaluate is
    # given the flags' default backbone and size: it builds what the checkpoint records, and
    # writes its report beside training's, not over it.
    trained_report = (report / "auroc.csv").read_bytes()
    flags = {k: v for k, v in common.items() if k not in ("backbone", "image_size")}
    scored = chexnet_evaluate.run(ChexnetConfig(
        mode="evaluate", eval_split="val", checkpoint=str(tmp_path / "run" / "ckpt-000000002"),
        **flags), Context(), **QUIET)
    assert (report / "auroc.csv").read_bytes() == trained_report
    table = list(csv.reader(open(tmp_path / "run" / "report-val" / "predictions.csv")))
    names = [r[0] for r in table[1:]]
    probs = np.asarray([r[1:] for r in table[1:]], float)
    sick = np.asarray([int(n[:8]) % 2 == 0 for n in names])  # image i + 1, i odd: findings
    aurocs = {c: roc_auc_score(sick, probs[:, CLASS_NAMES.index(c)]) for c in ("Effusion",
                                                                                "Mass")}
    assert len(names) == 6 and 0 < sick.sum() < 6
    for name, value in aurocs.items():
        assert float(rows[name]) == pytest.approx(value, abs=1e-4), name
    assert summary["mean_auroc"] == pytest.approx(np.mean(list(aurocs.values())), abs=1e-5)
    assert scored["mean_auroc"] == pytest.approx(summary["mean_auroc"], abs=1e-5)


# ---------------------------------------------------------------- loop pieces


def _tiny_trainer(lr=0.1):
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    trainer = DistributedTrainer(net, Context())
    trainer.compile(optimizer=keras.optimizers.SGD(lr),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return trainer


def _data(n=8):
    rng = np.random.default_rng(0)
    import tensorflow as tf

    x = rng.normal(size=(n, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype("int32"))).batch(2)


def test_loop_evaluates_every_n_steps_and_at_the_end(tmp_path):
    trainer = _tiny_trainer()
    seen = []

    def evaluate():
        step = int(trainer.optimizer.iterations.numpy())
        seen.append(step)
        return evaluation.Evaluation({"score": float(step)}, 8, step)

    result = loop.train(trainer, loop.Input(_data().repeat()), loop.Plan(7, 2, 2, 4),
                        context=Context(), validation=loop.Validation(evaluate, 4),
                        saving=loop.Saving(str(tmp_path)))
    assert seen == [4, 7] and result.final_step == 7
    assert result.last_eval.metrics == {"score": 7.0} and result.last_eval.count == 8
    assert result.history["val_score"] == [4.0, 7.0]  # in the logs of evaluating loops
    # checkpoints at every loop end record the newest evaluation, unprefixed
    recorded = {s: _state(tmp_path, s)["metrics"] for s in (2, 4, 6, 7)}
    assert recorded == {2: {}, 4: {"score": 4.0}, 6: {"score": 4.0}, 7: {"score": 7.0}}


def test_loop_collects_practice_summaries():
    class Reports(keras.callbacks.Callback):
        def summary(self):
            return {"practice": 42}

    result = loop.train(_tiny_trainer(), loop.Input(_data().repeat()), loop.Plan(2, 2, 2, 4),
                        context=Context(),
                        extra_callbacks=[Reports(), keras.callbacks.Callback()])
    assert result.practices == {"practice": 42} and result.last_eval is None


def test_loop_with_nothing_left_to_train_still_evaluates():
    trainer = _tiny_trainer()
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.optimizer.iterations.assign(5)
    result = loop.train(trainer, loop.Input(_data().repeat()), loop.Plan(5, 2, 2, 4),
                        context=Context(), validation=loop.Validation(
                            lambda: evaluation.Evaluation({"score": 1.0}, 8, 5)))
    assert (result.first_step, result.final_step, result.history) == (5, 5, {})
    assert result.last_eval.metrics == {"score": 1.0}


def test_reduce_on_plateau_follows_val_loss_only():
    schedule = schedules.ScaledSchedule(schedules.LinearWarmup(0.01, 0), min_lr=1e-6)
    callback = cb.ReduceOnPlateau(schedule, patience=2, factor=0.1)
    factors = []
    for loss in (1.0, 0.9, 0.95, 0.91, 0.8, 0.85, 0.86):
        logs = {"val_loss": loss}
        callback.on_epoch_end(0, logs)
        factors.append(logs["lr_factor"])
    assert factors == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    assert float(schedule(5)) == pytest.approx(0.01 * 0.01)
    schedule.factor.assign(1e-9)  # never below min_lr once warmed up
    assert float(schedule(5)) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="patience"):
        cb.ReduceOnPlateau(schedule, patience=0, factor=0.1)


def test_predict_gathers_every_column_in_order():
    import tensorflow as tf

    inputs = keras.Input((2,))
    net = keras.Model(inputs, keras.layers.Dense(1, use_bias=False)(inputs))
    net.layers[1].kernel.assign([[1.0], [10.0]])
    x = np.arange(10, dtype="float32").reshape(5, 2)
    y = np.arange(5, dtype="float32")
    w = np.asarray([1, 1, 0, 1, 0], "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(2)
    probs, labels, weights = evaluation.predict(net, ds, Context())
    np.testing.assert_allclose(probs[:, 0], x @ [1.0, 10.0])
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(weights, w)
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(2)
    p0, y0 = evaluation.predict(net, empty, Context())
    assert p0.shape == (0, 1) and y0.shape == (0,)
