"""ImageNet training and evaluation as a library: `run(config, context)`.

resnet_main.py fills an `imagenet.config.RunConfig` from its flags and checks it
(`imagenet.config.validate`) before Horovod starts; this module never reads flags. The
loop, checkpoints and evaluation come from `hooks`, shared with chexnet.
"""
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time

import keras
import tensorflow as tf

from hooks.distributed import horovod_glue
from hooks.errors import UserError
from hooks.practices import fused_optimizers, schedules, snapshots, weight_decay
from hooks.practices.lars import LARS
from hooks.practices.time_to_accuracy import TimeToAccuracy
from hooks.state import safe_files
from hooks.training import evaluation, loop, runner
from imagenet import config as config_lib
from imagenet import input_pipeline, models
from imagenet.config import RunConfig


# ---------------------------------------------------------------- pieces
def build_learning_rate(config: RunConfig):
    """(learning-rate schedule, preset or None), as tensorflow/tpu's resnet_main.py:

    * `--enable_lars`: lars_util.py's schedule; peak `--poly_rate` (0: 10 / 25 / 32 / 35.6
      by global batch) reached linearly from 0 over 5 / 5 / 14 / 40 epochs (or
      `--warmup_epochs`), then power-2 polynomial decay to 1e-4 at the end of the run;
    * `tpu`: peak base_learning_rate * batch / 256, warm-up from 0, then x0.1 / x0.01 /
      x0.001 at epochs 30 / 60 / 80 of 90, stretched to the run length and floored to
      whole epochs (warm-up 5 of 90 the same way, unless `--warmup_epochs`);
    * `tpu_2018`: the same at fixed epochs 5 (or `--warmup_epochs`) / 30 / 60 / 80;
    * another name: that preset rescaled to this batch and run length (a preset also brings
      weight decay per phase and snapshot steps)."""
    spe = config.steps_per_epoch
    total = config.total_steps
    if config.enable_lars:
        peak, warmup = schedules.lars_defaults(config.train_batch_size)
        if config.poly_rate > 0:
            peak = config.poly_rate
        if config.warmup_epochs is not None:
            warmup = config.warmup_epochs
        warmup_steps = int(warmup * config.num_train_images // config.train_batch_size)
        return schedules.TPULarsSchedule(peak, spe, warmup, warmup_steps, total), None
    if config.lr_schedule in ("tpu", "tpu_2018"):
        peak = schedules.scale_learning_rate(config.base_learning_rate, config.train_batch_size)
        if config.lr_schedule == "tpu":
            milestones = schedules.tpu_milestones(total, config.num_train_images,
                                                  config.train_batch_size)
        else:
            milestones = [(1.0, 5.0), (0.1, 30.0), (0.01, 60.0), (0.001, 80.0)]
        if config.warmup_epochs is not None:
            milestones[0] = (1.0, config.warmup_epochs)
        return schedules.TPUStepSchedule(peak, spe, milestones), None
    preset = schedules.preset(config.lr_schedule, global_batch=config.train_batch_size,
                              steps_per_epoch=max(1, round(spe)), epochs=total / spe)
    return preset.learning_rate, preset


def uses_lars(config: RunConfig, preset) -> bool:
    return config.enable_lars or (preset is not None and preset.optimizer == "lars")


def build_optimizer(config: RunConfig, learning_rate, lars: bool = False):
    if lars:
        return LARS(learning_rate=learning_rate, momentum=config.momentum,
                    weight_decay=config.weight_decay)
    # The reference: tf.train.MomentumOptimizer(use_nesterov=True); LARS keeps classic
    # momentum, as tf.contrib's LARSOptimizer.
    # Keras's SGD with its update in one kernel per variable (hooks.practices.fused_optimizers).
    return fused_optimizers.SGD(learning_rate=learning_rate, momentum=config.momentum,
                                nesterov=config.nesterov)


def practice_callbacks(config: RunConfig, preset, network, optimizer, context, eval_data):
    """The large-batch practices a preset asks for: weight decay per phase, snapshots at
    the collapses, collapsed-ensemble evaluation; and time-to-accuracy when asked. Each
    reports into the run summary through its `summary()`."""
    callbacks = []
    if preset is not None:
        # LARS applies weight decay itself; SGD gets it as an L2 whose factor can change.
        target = (optimizer if isinstance(optimizer, LARS) else
                  weight_decay.attach_scheduled_l2(network, preset.weight_decay_at(0)))
        callbacks.append(weight_decay.WeightDecayScheduler(preset.weight_decay_at, target))
        steps = [s for s in preset.snapshot_steps if s <= config.total_steps]
        folder = config.snapshot_dir or (config.model_dir and
                                         os.path.join(config.model_dir, "snapshots"))
        if steps and folder:
            saver = snapshots.SnapshotSaver(steps, folder, context, network)
            callbacks.append(saver)
            if config.collapsed_ensemble:
                callbacks.append(snapshots.CollapsedEnsembleEvaluator(
                    saver.paths(), network, eval_data(), context))
    if config.target_top_1 is not None:
        callbacks.append(TimeToAccuracy(
            "val_top_1", config.target_top_1, stop=config.stop_at_target,
            steps_per_epoch=config.steps_per_epoch))
    return callbacks


def build_loss(label_smoothing: float, num_classes: int):
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                    label_smoothing=label_smoothing)

    def loss(y_true, y_pred):
        y = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes)
        return smoothed(y, y_pred)
    return loss


def eval_metrics(num_classes: int):
    return [keras.metrics.SparseCategoricalAccuracy(name="top_1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top_5"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="loss")]


def _dtype(config):
    return tf.bfloat16 if config.precision == "bfloat16" else tf.float32


def _source_kwargs(config: RunConfig, context: horovod_glue.Context) -> dict:
    """What the TFRecord and TFDS pipelines take from the config, for both splits."""
    return dict(image_size=config.image_size, rank=context.rank, size=context.size,
                dtype=_dtype(config), include_background_label=config.include_background_label,
                num_parallel_calls=config.num_parallel_calls or input_pipeline.AUTOTUNE)


def _splits_read(config: RunConfig) -> tuple[str, ...]:
    evaluates = config.mode != "train" or config.eval_after_training
    return (("train",) if config.mode != "eval" else ()) + (("validation",) if evaluates
                                                            else ())


def tfrecord_files(config: RunConfig, context: horovod_glue.Context) -> list[str]:
    """The TFRecord files this rank reads (none for synthetic or TFDS data)."""
    if config.use_synthetic_data or config.tfds_data_dir:
        return []
    return [f for split in _splits_read(config)
            for f in input_pipeline.rank_files(config.data_dir, split, context.rank,
                                               context.size)]


def train_dataset(config: RunConfig, context: horovod_glue.Context, first_step: int = 0):
    """This rank's training batches (its share of the global batch) from `first_step` on
    (a resumed run, an elastic restart): with a seed, the batches the uninterrupted run
    read from that step; each rank skips, undecoded, its share of the epoch already done.
    A rank's epoch is num_train_images / size records (see `input_pipeline`)."""
    per_rank = horovod_glue.rank_batch(config.train_batch_size, context)
    if config.use_synthetic_data:
        return input_pipeline.synthetic_dataset(
            per_rank_batch=per_rank, image_size=config.image_size,
            num_classes=config.num_label_classes, dtype=_dtype(config),
            seed=context.rank + (config.seed or 0))
    shard = max(1, config.num_train_images // context.size)
    kwargs = dict(_source_kwargs(config, context), is_training=True, per_rank_batch=per_rank,
                  seed=None if config.seed is None else config.seed,
                  first_position=first_step * per_rank, epoch_size=shard)
    if config.tfds_data_dir:
        return input_pipeline.tfds_dataset(config.tfds_data_dir, **kwargs)
    return input_pipeline.tfrecord_dataset(config.data_dir, cache=config.use_cache, **kwargs)


def eval_dataset(config: RunConfig, context: horovod_glue.Context):
    per_rank = max(1, config.eval_batch_size // context.size)
    if config.use_synthetic_data:
        # This rank's share of num_eval_images, so the global count is exact.
        share = (config.num_eval_images // context.size
                 + (context.rank < config.num_eval_images % context.size))
        return input_pipeline.synthetic_dataset(
            per_rank_batch=per_rank, image_size=config.image_size,
            num_classes=config.num_label_classes, dtype=_dtype(config),
            seed=1000 + context.rank).unbatch().take(share).batch(per_rank)
    kwargs = dict(_source_kwargs(config, context), is_training=False, per_rank_batch=per_rank)
    if config.tfds_data_dir:
        return input_pipeline.tfds_dataset(config.tfds_data_dir, **kwargs)
    return input_pipeline.tfrecord_dataset(config.data_dir, **kwargs)


def model_description(config: RunConfig) -> dict:
    """What a checkpoint records about its model, so others can rebuild or reject it."""
    return {"architecture": config.architecture, "resnet_depth": config.resnet_depth,
            "num_label_classes": config.num_label_classes, "image_size": config.image_size}


# ---------------------------------------------------------------- the task
class ImagenetTask(runner.Task):
    """ResNet (or another --architecture) on ImageNet, as tensorflow/tpu's resnet_main.py:
    train and/or evaluate as `config.mode` says."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.files, self.preset, self.network, self.optimizer = [], None, None, None

    def batch_sizes(self) -> dict:
        config = self.config
        used = {"train": ("train_batch_size",), "eval": ("eval_batch_size",),
                "train_and_eval": ("train_batch_size", "eval_batch_size")}[config.mode]
        if config.mode == "train" and config.eval_after_training:
            used += ("eval_batch_size",)
        return {n: getattr(config, n) for n in used}

    def check_input(self, context, log) -> None:
        """Every rank checks the head of its own shards."""
        self.files = tfrecord_files(self.config, context)
        input_pipeline.check_records(self.files, self.config.num_label_classes,
                                     self.config.include_background_label)

    def build(self, context, log) -> runner.Model:
        config = self.config
        learning_rate, self.preset = build_learning_rate(config)
        lars = uses_lars(config, self.preset)
        self.network = models.build_classifier(config.architecture, config.num_label_classes,
                                               config.image_size, config.resnet_depth,
                                               0.0 if lars else config.weight_decay,
                                               config.weights_file, fused_bn=config.fused_bn,
                                               sync_bn=config.sync_bn)
        self.optimizer = build_optimizer(config, learning_rate, lars)
        extra = practice_callbacks(config, self.preset, self.network, self.optimizer,
                                   context, lambda: eval_dataset(config, context))
        return runner.Model(
            self.network, self.optimizer,
            build_loss(config.label_smoothing, config.num_label_classes),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="top_1")], callbacks=extra)

    def start_lines(self, trainer, context, start, resumed) -> list[str]:
        config = self.config
        return [f"resnet_main: {self.network.name} ({self.network.count_params():,} "
                f"parameters), {context.size} rank(s), global batch {config.train_batch_size}"
                f" ({horovod_glue.rank_batch(config.train_batch_size, context)} per rank), "
                f"precision {config.precision}, "
                + (f"resuming from {resumed.path} at step {start}" if resumed
                   else "starting from step 0")]

    def plan(self) -> loop.Plan | None:
        config = self.config
        if config.mode == "eval":
            return None
        return loop.Plan(config.total_steps, min(config.iterations_per_loop, config.total_steps),
                         config.train_batch_size, config.steps_per_epoch)

    def train_input(self, context, start) -> loop.Input:
        if self.config.elastic:
            return loop.Input(make=lambda world, step: train_dataset(self.config, world, step))
        return loop.Input(train_dataset(self.config, context, start))

    def validation(self, trainer, log) -> loop.Validation | None:
        if self.config.mode != "train_and_eval":
            return None
        return loop.Validation(lambda: self.evaluate(trainer, log), self.config.steps_per_eval)

    def saving(self) -> loop.Saving | None:
        saving = super().saving()
        return saving and dataclasses.replace(saving, best_metric="top_1")

    def checkpoint_state(self) -> dict:
        return dict(model_description(self.config), global_batch=self.config.train_batch_size)

    def evaluate(self, trainer, log) -> evaluation.Evaluation:
        """Top-1/top-5 and loss over the whole validation set, in the current world."""
        world = trainer.context
        values, count = evaluation.evaluate(self.network, eval_dataset(self.config, world),
                                            eval_metrics(self.config.num_label_classes),
                                            world)
        step = int(self.optimizer.iterations.numpy())
        log(f"eval at step {step}: top_1 {values['top_1']:.4f} top_5 {values['top_5']:.4f} "
            f"loss {values['loss']:.4f} ({count} images)")
        return evaluation.Evaluation(values, count, step)

    def read_error(self, err, context) -> Exception | None:
        return input_pipeline.read_error(err, self.files, context.rank)

    def finish(self, trainer, outcome: runner.Outcome, log) -> dict:
        config, context, result = self.config, outcome.context, outcome.result
        summary = {"ranks": context.size, "global_batch": config.train_batch_size,
                   "model": self.network.name, "precision": config.precision,
                   "start_step": outcome.start_step}
        last_eval = None
        if result is None:
            last_eval = self.evaluate(trainer, log)
        else:
            last_eval = result.last_eval
            summary.update(_training_figures(config, result))
            if config.mode == "train" and config.eval_after_training:
                last_eval = self.evaluate(trainer, log)  # the reference's --eval_after_training
        if last_eval is not None:
            summary.update(last_eval.metrics)
            summary["eval_images"] = last_eval.count
        summary["wall_seconds"] = time.perf_counter() - outcome.started
        if config.export_dir:
            path = os.path.join(config.export_dir, f"{self.network.name}.keras")
            horovod_glue.write_atomically(path, self.network.save, context)
            summary["exported"] = path
            summary["saved_model"] = export_saved_model(self.network, config.export_dir,
                                                        context)
        _report(summary, config, context, log, outcome.environment)
        return summary


def export_saved_model(network: keras.Model, export_dir: str, context) -> str:
    """Rank 0 writes `network` as a TensorFlow SavedModel in EXPORT_DIR/saved_model
    (Keras's `export`: signature `serve`, float32 [N, size, size, 3] images normalised as
    the input pipeline does -> logits), in a private temporary folder renamed into place.
    Loads with `tf.saved_model.load` alone (TF Serving, other programs)."""
    target = os.path.join(export_dir, config_lib.SAVED_MODEL)
    if not context.is_chief:
        return target
    os.makedirs(export_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=export_dir, prefix=".tmp-saved_model-")
    try:
        network.export(tmp, verbose=False)
        safe_files.follow_umask(tmp)  # mkdtemp made it 0700
        os.rename(tmp, target)  # fails, not merges, if one appeared meanwhile
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {target}: {err.strerror or err}") from None
    return target


def _training_figures(config: RunConfig, result: loop.LoopResult) -> dict:
    size = result.context.size
    figures = dict(ranks=size, final_step=result.final_step, train_seconds=result.wall_seconds,
                   images_per_sec=result.images_per_sec,
                   images_per_sec_per_rank=result.images_per_sec / size, **result.practices)
    if config.reference_images_per_sec and math.isfinite(result.images_per_sec):
        figures["scaling_efficiency"] = result.images_per_sec / (
            size * config.reference_images_per_sec)
    return figures


def run(config: RunConfig, context: horovod_glue.Context, log=print) -> dict:
    """Train and/or evaluate as `config.mode` says; returns (and rank 0 prints) a summary.

    Expects a config that passed `imagenet.config.validate` (the entry point checks it
    before Horovod starts)."""
    return runner.run(ImagenetTask(config), context, log)


def _report(summary: dict, config: RunConfig, context, chief_log, environment: dict) -> None:
    """Rank 0 prints the summary (a table and a SUMMARY line) and writes it, with the run's
    environment (`hooks.state.run_record`), to MODEL_DIR/summary.json."""
    lines = [f"  {k:<26} {v:.4f}" if isinstance(v, float) else f"  {k:<26} {v}"
             for k, v in summary.items()]
    chief_log("resnet_main summary:\n" + "\n".join(lines))
    chief_log("SUMMARY " + json.dumps(summary, sort_keys=True))
    if config.model_dir:
        def write(path):
            with open(path, "w") as f:
                json.dump(dict(summary, environment=environment), f, indent=1, sort_keys=True)
        horovod_glue.write_atomically(os.path.join(config.model_dir, "summary.json"), write,
                                      context)
