"""ImageNet training and evaluation as a library: `run(config, context)`.

resnet_main.py fills an `imagenet.config.RunConfig` from its flags and checks it
(`imagenet.config.validate`) before Horovod starts; this module never reads flags. The
loop, checkpoints and evaluation come from `hooks`, shared with chexnet.
"""
import json
import math
import os
import time

import keras
import tensorflow as tf

from hooks import evaluation, fused_optimizers, horovod_glue, loop, practices, runtime, schedules
from hooks.lars import LARS
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
    # Keras's SGD with its update in one kernel per variable (hooks.fused_optimizers).
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
                  practices.attach_scheduled_l2(network, preset.weight_decay_at(0)))
        callbacks.append(practices.WeightDecayScheduler(preset.weight_decay_at, target))
        steps = [s for s in preset.snapshot_steps if s <= config.total_steps]
        folder = config.snapshot_dir or (config.model_dir and
                                         os.path.join(config.model_dir, "snapshots"))
        if steps and folder:
            saver = practices.SnapshotSaver(steps, folder, context, network)
            callbacks.append(saver)
            if config.collapsed_ensemble:
                callbacks.append(practices.CollapsedEnsembleEvaluator(
                    saver.paths(), network, eval_data(), context))
    if config.target_top_1 is not None:
        callbacks.append(practices.TimeToAccuracy(
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


# ---------------------------------------------------------------- run
def run(config: RunConfig, context: horovod_glue.Context, log=print) -> dict:
    """Train and/or evaluate as `config.mode` says; returns (and rank 0 prints) a summary.

    Expects a config that passed `imagenet.config.validate` (the entry point checks it
    before Horovod starts)."""
    used = {"train": ("train_batch_size",), "eval": ("eval_batch_size",),
            "train_and_eval": ("train_batch_size", "eval_batch_size")}[config.mode]
    if config.mode == "train" and config.eval_after_training:
        used += ("eval_batch_size",)
    if not config.elastic:  # elastic: any world size (uneven shares, weighted gradients)
        horovod_glue.check_global_batches(context, **{n: getattr(config, n) for n in used})
    files = tfrecord_files(config, context)
    check = lambda: input_pipeline.check_records(  # noqa: E731
        files, config.num_label_classes, config.include_background_label)
    # Every rank checks the head of its own shards; one bad shard stops every rank
    # (elastic: no collective before the loop, so each rank stops on its own).
    horovod_glue.all_ranks_ok(check, context) if not config.elastic else check()
    runtime.set_precision(config.precision)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    chief_log = horovod_glue.chief_logger(log, lambda: context)
    if (warning := runtime.precision_warning(config.precision)) is not None:
        chief_log(f"WARNING: {warning}")

    learning_rate, preset = build_learning_rate(config)
    lars = uses_lars(config, preset)
    network = models.build_classifier(config.architecture, config.num_label_classes,
                                      config.image_size, config.resnet_depth,
                                      0.0 if lars else config.weight_decay,
                                      config.weights_file, fused_bn=config.fused_bn)
    optimizer = build_optimizer(config, learning_rate, lars)
    extra_callbacks = practice_callbacks(config, preset, network, optimizer, context,
                                         lambda: eval_dataset(config, context))
    trainer = horovod_glue.DistributedTrainer(
        network, context, metrics=[keras.metrics.SparseCategoricalAccuracy(name="top_1")],
        fp16_allreduce=config.fp16_allreduce)
    trainer.compile(optimizer=optimizer,
                    loss=build_loss(config.label_smoothing, config.num_label_classes),
                    jit_compile=False)  # Horovod ops cannot be XLA-compiled
    # From here on the world is trainer.context: an elastic reset replaces it.
    chief_log = horovod_glue.chief_logger(log, lambda: trainer.context)
    resumed = loop.restore_and_sync(config.model_dir, trainer, optimizer, context,
                                     log=chief_log, elastic=config.elastic)
    start = int(optimizer.iterations.numpy())
    chief_log(f"resnet_main: {network.name} ({network.count_params():,} parameters), "
              f"{context.size} rank(s), global batch {config.train_batch_size} "
              f"({horovod_glue.rank_batch(config.train_batch_size, context)} per rank), "
              f"precision {config.precision}, "
              + (f"resuming from {resumed.path} at step {start}" if resumed
                 else "starting from step 0"))

    metrics = eval_metrics(config.num_label_classes)

    def evaluate() -> evaluation.Evaluation:
        world = trainer.context
        values, count = evaluation.evaluate(network, eval_dataset(config, world), metrics,
                                            world)
        step = int(optimizer.iterations.numpy())
        chief_log(f"eval at step {step}: top_1 {values['top_1']:.4f} top_5 "
                  f"{values['top_5']:.4f} loss {values['loss']:.4f} ({count} images)")
        return evaluation.Evaluation(values, count, step)

    t0 = time.perf_counter()
    summary = {"ranks": context.size, "global_batch": config.train_batch_size,
               "model": network.name, "precision": config.precision, "start_step": start}
    try:
        last_eval = _train_or_evaluate(config, context, trainer, evaluate, extra_callbacks,
                                       summary, chief_log)
    except tf.errors.OpError as err:
        problem = input_pipeline.read_error(err, files, context.rank)
        if problem is None:
            raise
        raise problem from err
    if last_eval is not None:
        summary.update(last_eval.metrics)
        summary["eval_images"] = last_eval.count
    summary["wall_seconds"] = time.perf_counter() - t0
    if config.export_dir:
        path = os.path.join(config.export_dir, f"{network.name}.keras")
        horovod_glue.write_atomically(path, network.save, context)
        summary["exported"] = path
    _report(summary, config, context, chief_log)
    return summary


def _train_or_evaluate(config: RunConfig, context, trainer, evaluate, extra_callbacks,
                       summary: dict, chief_log) -> evaluation.Evaluation | None:
    """The mode's work; adds the training figures to `summary`, returns the last
    evaluation (None when nothing was evaluated)."""
    if config.mode == "eval":
        last_eval = evaluate()
    else:
        result = loop.train(
            trainer, None if config.elastic else train_dataset(
                config, context, int(trainer.optimizer.iterations.numpy())),
            make_dataset=(lambda world, step: train_dataset(config, world, step))
            if config.elastic else None,
            elastic_commit_steps=config.elastic_commit_steps if config.elastic else None,
            context=context,
            total_steps=config.total_steps,
            steps_per_loop=min(config.iterations_per_loop, config.total_steps),
            global_batch=config.train_batch_size, steps_per_epoch=config.steps_per_epoch,
            evaluate=evaluate if config.mode == "train_and_eval" else None,
            eval_every_steps=config.steps_per_eval, model_dir=config.model_dir,
            checkpoint_state=lambda: dict(model_description(config),
                                          global_batch=config.train_batch_size),
            keep_checkpoints=config.keep_checkpoints, best_metric="top_1",
            log_every_n_steps=config.log_every_n_steps, json_progress=config.json_progress,
            extra_callbacks=extra_callbacks, log=chief_log,
            faults_policy=loop.FaultPolicy(config.on_nonfinite, config.max_rollbacks))
        last_eval = result.last_eval
        context = result.context
        summary.update(ranks=context.size, final_step=result.final_step,
                       train_seconds=result.wall_seconds, images_per_sec=result.images_per_sec,
                       images_per_sec_per_rank=result.images_per_sec / context.size)
        summary.update(result.practices)
        if config.reference_images_per_sec and math.isfinite(result.images_per_sec):
            summary["scaling_efficiency"] = result.images_per_sec / (
                context.size * config.reference_images_per_sec)
        if config.mode == "train" and config.eval_after_training:
            last_eval = evaluate()  # the reference's --eval_after_training
    return last_eval


def _report(summary: dict, config: RunConfig, context, chief_log) -> None:
    lines = [f"  {k:<26} {v:.4f}" if isinstance(v, float) else f"  {k:<26} {v}"
             for k, v in summary.items()]
    chief_log("resnet_main summary:\n" + "\n".join(lines))
    chief_log("SUMMARY " + json.dumps(summary, sort_keys=True))
    if config.model_dir:
        def write(path):
            with open(path, "w") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
        horovod_glue.write_atomically(os.path.join(config.model_dir, "summary.json"), write,
                                      context)
