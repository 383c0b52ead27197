"""ChestX-ray14 fine-tuning: ``run(config, context)``.

``python -m chexnet train`` fills a ``ChexnetConfig`` from its flags and checks it
(``chexnet.config.validate``) before Horovod starts; this module never reads flags. The
training loop, checkpoints and distributed prediction come from ``hooks`` (shared with
resnet_main); scoring from ``chexnet.evaluate``.
"""

from __future__ import annotations

import time

import numpy as np

from chexnet import evaluate, input_pipeline, splits
from chexnet import model as model_lib
from chexnet.config import DEFAULT_LEARNING_RATE, ChexnetConfig
from chexnet.labels import CLASS_NAMES, NUM_CLASSES
from hooks.errors import DataError


def resolve_init(config: ChexnetConfig):
    """The pre-training checkpoint to start from, or None; ModelError if unusable."""
    if config.pretrained_model_dir:
        ckpt = model_lib.find_pretrained_checkpoint(config.pretrained_model_dir,
                                                    config.init_checkpoint)
    elif config.init_checkpoint not in ("best", "latest"):
        ckpt = model_lib.find_pretrained_checkpoint("", config.init_checkpoint)
    else:
        return None
    model_lib.check_pretrained_compatible(ckpt, config.backbone)
    return ckpt


def warmup_steps(warmup_epochs: float, global_batch: int, steps_per_epoch: float) -> int:
    """Warm-up proportional to the global batch: ``warmup_epochs * global_batch / 256``
    epochs (so batch 256 warms up for warmup_epochs, batch 4096 for 16x as many)."""
    from hooks import steps

    epochs = warmup_epochs * global_batch / 256.0
    return steps.to_steps(epochs=epochs, steps_per_epoch=steps_per_epoch)


def make_loss(pos_weight: np.ndarray | None, neg_weight: np.ndarray | None):
    """Weighted BCE on probabilities, per class: -(w+ y log p + w- (1-y) log(1-p)),
    averaged over classes and images (Keras' ``class_weight`` cannot do this for 14
    sigmoid outputs). Unweighted when the weights are None."""
    import tensorflow as tf

    wp = tf.constant(pos_weight if pos_weight is not None else np.ones(NUM_CLASSES), tf.float32)
    wn = tf.constant(neg_weight if neg_weight is not None else np.ones(NUM_CLASSES), tf.float32)
    eps = 1e-7

    def weighted_bce(y_true, y_pred):
        y = tf.cast(y_true, tf.float32)
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), eps, 1 - eps)
        per = -(wp * y * tf.math.log(p) + wn * (1 - y) * tf.math.log(1 - p))
        return tf.reduce_mean(per, axis=-1)

    return weighted_bce


def _inputs(config: ChexnetConfig, data: splits.Data):
    """(train(context, first_step), val(context)): this rank's training and validation
    pipelines (and their DatasetInfo) in a given world."""
    from hooks import horovod_glue

    options = input_pipeline.InputOptions(
        config.image_size, model_lib.preprocessing_for(config.backbone), config.cache,
        config.on_corrupt)
    train_split, val_split = data.splits["train"], data.splits["val"]

    def train(context, first_step=0):
        return input_pipeline.train_dataset(
            data.paths["train"], train_split.labels, options,
            batch_size=horovod_glue.rank_batch(config.train_batch_size, context),
            rank=context.rank,
            size=context.size, seed=config.seed or 0, first_step=first_step)

    def val(context):
        return input_pipeline.eval_dataset(
            data.paths["val"], val_split.labels, options,
            batch_size=max(1, config.eval_batch_size // context.size), rank=context.rank,
            size=context.size)
    return train, val


def run(config: ChexnetConfig, context, log=print) -> dict:
    """Fine-tune as configured; returns (and rank 0 prints) a summary, writes reports."""
    import keras

    from hooks import callbacks as cb
    from hooks import checkpoints, evaluation, horovod_glue, loop, runtime, schedules

    chief_log = log if context.is_chief else (lambda *a, **k: None)
    if not config.elastic:  # elastic: any world size (uneven shares, weighted gradients)
        horovod_glue.check_global_batches(context, train_batch_size=config.train_batch_size,
                                          eval_batch_size=config.eval_batch_size)
    data = splits.load_data(config)
    chief_log("chexnet splits (patient-wise):\n" + data.summary)
    pretrained = resolve_init(config)  # ModelError before any model is built
    train_split, val_split = data.splits["train"], data.splits["val"]
    if len(train_split) == 0 or len(val_split) == 0:
        raise DataError(f"train/val splits have {len(train_split)}/{len(val_split)} images; "
                        "need both > 0")
    pos_w, neg_w = splits.class_weights(train_split.labels) if config.weighted_loss else (None,
                                                                                          None)
    # Datasets first: missing/corrupt files fail here (on every rank), before the model and
    # any output. Elastic: the loop makes them for each world (no collective before it).
    train_input, val_input = _inputs(config, data)
    val_for = [None, None]  # (context, validation pipeline)
    if not config.elastic:
        (train_ds, train_info), (val_ds, val_info) = horovod_glue.all_ranks_ok(
            lambda: (train_input(context), val_input(context)), context)
        val_for = [context, val_ds]
        for info in (train_info, val_info):
            if info.skipped:
                chief_log(f"rank {context.rank}: skipped {len(info.skipped)} corrupt images")

    runtime.set_precision(config.precision)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    network, init = model_lib.build_chexnet_model(
        config.backbone, config.image_size, pretrained=pretrained,
        weights_file=config.weights_file, weight_decay=config.weight_decay)
    steps_per_epoch = max(len(train_split) / config.train_batch_size, 1e-9)
    total_steps = schedules.run_steps(config.train_steps, config.train_epochs, steps_per_epoch)
    peak_lr, lr_source = config.learning_rate, "--learning_rate"
    if peak_lr is None and init.learning_rate:
        peak_lr, lr_source = init.learning_rate, f"recorded in {init.path}"
    if peak_lr is None:
        peak_lr, lr_source = DEFAULT_LEARNING_RATE, "default"
    warm = min(warmup_steps(config.warmup_epochs, config.train_batch_size, steps_per_epoch),
               total_steps)
    schedule = schedules.ScaledSchedule(schedules.LinearWarmup(peak_lr, warm),
                                        config.min_learning_rate)
    optimizer = (keras.optimizers.Adam(learning_rate=schedule) if config.optimizer == "adam"
                 else keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum))
    trainer = horovod_glue.DistributedTrainer(network, context,
                                              fp16_allreduce=config.fp16_allreduce)
    trainer.compile(optimizer=optimizer, loss=make_loss(pos_w, neg_w), jit_compile=False)
    # From here on the world is trainer.context: an elastic reset replaces it.
    chief_log = horovod_glue.chief_logger(log, lambda: trainer.context)
    resumed = loop.restore_and_sync(config.model_dir, trainer, optimizer, context,
                                     log=chief_log, elastic=config.elastic)
    if resumed is not None:
        schedule.factor.assign(float(resumed.state.get("lr_factor", 1.0)))
    start = int(optimizer.iterations.numpy())
    chief_log(f"chexnet: {network.name} ({network.count_params():,} parameters) from "
              f"{init.describe()}; {context.size} rank(s), global batch "
              f"{config.train_batch_size}, {total_steps} steps, peak lr {peak_lr:.3g} "
              f"({lr_source}), warm-up {warm} steps, {config.optimizer}, "
              f"{'weighted' if config.weighted_loss else 'unweighted'} BCE"
              + (f"; resuming at step {start}" if resumed else ""))

    def validate() -> evaluation.Evaluation:
        world = trainer.context
        if val_for[0] != world:
            val_for[:] = [world, horovod_glue.all_ranks_ok(lambda: val_input(world), world)[0]]
        scored = evaluate.score(*evaluate.gather(network, val_for[1], len(val_split), world),
                                pos_w, neg_w)
        step = int(optimizer.iterations.numpy())
        chief_log(f"eval at step {step}: mean AUROC {scored.auroc.mean_auroc:.4f} over "
                  f"{scored.auroc.num_defined} classes, loss {scored.values['loss']:.4f} "
                  f"({len(scored.labels)} images)")
        return evaluation.Evaluation(scored.values, len(scored.labels), step, scored)

    steps_per_loop = min(config.steps_per_loop or max(1, round(steps_per_epoch)), total_steps)
    state = lambda: {  # noqa: E731 - recorded in every checkpoint
        "task": "chexnet", "backbone": config.backbone, "image_size": config.image_size,
        "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES),
        "global_batch": config.train_batch_size, "init": init.describe(),
        "lr_factor": float(schedule.factor.numpy())}
    t0 = time.perf_counter()
    result = loop.train(
        trainer, None if config.elastic else train_ds, context=context,
        make_dataset=(lambda world, step: train_input(world, step)[0]) if config.elastic
        else None,
        elastic_commit_steps=config.elastic_commit_steps if config.elastic else None,
        state_variables=[schedule.factor], total_steps=total_steps,
        steps_per_loop=steps_per_loop, global_batch=config.train_batch_size,
        steps_per_epoch=steps_per_epoch, evaluate=validate, eval_every_steps=steps_per_loop,
        model_dir=config.model_dir, checkpoint_state=state,
        keep_checkpoints=config.keep_checkpoints, best_metric="mean_auroc", best_mode="max",
        log_every_n_steps=config.log_every_n_steps,
        extra_callbacks=[cb.ReduceOnPlateau(schedule, config.plateau_patience,
                                            config.plateau_factor)], log=chief_log,
        faults_policy=loop.FaultPolicy(config.on_nonfinite, config.max_rollbacks))
    scored = result.last_eval.details
    context = result.context
    summary = {"mode": "train", "ranks": context.size, "global_batch": config.train_batch_size,
               "model": network.name, "init": init.describe(), "peak_learning_rate": peak_lr,
               "final_step": result.final_step, "train_seconds": time.perf_counter() - t0,
               "images_per_sec": result.images_per_sec, "val_images": len(scored.labels),
               "mean_auroc": scored.auroc.mean_auroc}
    summary.update({k: v for k, v in result.practices.items()
                    if k in ("world_size_changes", "elastic_seconds_lost")})
    best = checkpoints.best(config.model_dir, "mean_auroc", "max") if config.model_dir else None
    if best is not None:
        summary["best_checkpoint"] = best.path
    title = f"{network.name} fine-tuned, val split, step {result.final_step}"
    evaluate.report(config.reports_to, scored, title, summary, context, chief_log)
    return summary
