"""ChestX-ray14 fine-tuning: ``run(config, context)``.

``python -m chexnet train`` fills a ``ChexnetConfig`` from its flags and checks it
(``chexnet.config.validate``) before Horovod starts; this module never reads flags. The
training loop, checkpoints and distributed prediction come from ``hooks`` (shared with
resnet_main); scoring from ``chexnet.evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import tensorflow as tf

from chexnet import batchnorm, evaluate, input_pipeline, splits
from chexnet import config as config_lib
from chexnet import model as model_lib
from chexnet.config import ChexnetConfig
from chexnet.labels import CLASS_NAMES, NUM_CLASSES
from hooks.distributed import horovod_glue
from hooks.errors import DataError
from hooks.practices import fused_optimizers, schedules
from hooks.state import checkpoints
from hooks.training import callbacks as cb
from hooks.training import evaluation, loop, runner, steps


def resolve_init(config: ChexnetConfig):
    """The pre-training checkpoint to start from, or None; ConfigError for random weights
    without --allow_random_init, ModelError for an unusable checkpoint."""
    config_lib.check_init(config)
    if config.pretrained_model_dir:
        ckpt = model_lib.find_pretrained_checkpoint(config.pretrained_model_dir,
                                                    config.init_checkpoint)
    elif config.init_checkpoint not in ("best", "latest"):
        ckpt = model_lib.find_pretrained_checkpoint("", config.init_checkpoint)
    else:
        return None
    model_lib.check_pretrained_compatible(ckpt, config.backbone)
    return ckpt


def init_kind(config: ChexnetConfig) -> str:
    """Where the backbone's weights come from: checkpoint, imagenet, weights_file, none."""
    if config.weights_file:
        return "imagenet" if config.weights_file == config_lib.IMAGENET_WEIGHTS else "weights_file"
    return "checkpoint" if config_lib.starts_from_weights(config) else "none"


def peak_learning_rate(config: ChexnetConfig, init: model_lib.InitSource) -> tuple[float, str]:
    """(peak learning rate, where it comes from). Without --learning_rate it follows the
    optimizer: Adam gets CheXNet's 1e-3 (never the checkpoint's rate: that is an SGD rate,
    e.g. 0.1 * batch / 256, which makes Adam's steps 100x too large); SGD gets the rate
    recorded in the pre-training checkpoint (the 2018 advice), else 0.1 * batch / 256."""
    if config.learning_rate is not None:
        return config.learning_rate, "--learning_rate"
    if config.optimizer == "adam":
        return config_lib.ADAM_LEARNING_RATE, "Adam default, as CheXNet"
    if init.learning_rate:
        return init.learning_rate, f"SGD: the rate recorded in {init.path}"
    base = config_lib.SGD_BASE_LEARNING_RATE
    return (schedules.scale_learning_rate(base, config.train_batch_size),
            f"SGD default {base:g} * {config.train_batch_size} / 256")


def warmup_steps(warmup_epochs: float, global_batch: int, steps_per_epoch: float) -> int:
    """Warm-up proportional to the global batch: ``warmup_epochs * global_batch / 256``
    epochs (so batch 256 warms up for warmup_epochs, batch 4096 for 16x as many)."""
    epochs = warmup_epochs * global_batch / 256.0
    return steps.to_steps(epochs=epochs, steps_per_epoch=steps_per_epoch)


def build_network(config: ChexnetConfig, pretrained):
    """(network, InitSource): --backbone at --image_size from ``pretrained`` (a resnet_main
    checkpoint, `resolve_init`) or --weights_file, with --weight_decay as an L2 loss
    (weight_decay / 2 * sum of squares) on the backbone's kernels."""
    return model_lib.build_chexnet_model(
        config.backbone, config.image_size, pretrained=pretrained,
        weights_file=config.weights_file, weight_decay=config.weight_decay,
        fused_bn=config.fused_bn, sync_bn=config.sync_bn)


def learning_rate_schedule(config: ChexnetConfig, peak_lr: float, steps_per_epoch: float,
                           total_steps: int):
    """(schedule, warm-up steps): lr rises linearly from 0 at step 0 to ``peak_lr`` at the
    end of the warm-up (`warmup_steps`, at most the run), then stays there; times the
    plateau factor (`ScaledSchedule.factor`, lowered by ReduceOnPlateau) but never below
    min(--min_learning_rate, the unscaled rate)."""
    warm = min(warmup_steps(config.warmup_epochs, config.train_batch_size, steps_per_epoch),
               total_steps)
    schedule = schedules.ScaledSchedule(schedules.LinearWarmup(peak_lr, warm),
                                        config.min_learning_rate)
    return schedule, warm


def build_optimizer(config: ChexnetConfig, learning_rate):
    """--optimizer: Adam with Keras' defaults (beta 0.9 / 0.999, epsilon 1e-7: CheXNet's
    "standard parameters"), or SGD with classic (not Nesterov) momentum --momentum; each
    with Keras's update in one kernel per variable (hooks.practices.fused_optimizers)."""
    if config.optimizer == "adam":
        return fused_optimizers.Adam(learning_rate=learning_rate)
    return fused_optimizers.SGD(learning_rate=learning_rate, momentum=config.momentum)


def make_loss(pos_weight: np.ndarray | None, neg_weight: np.ndarray | None):
    """Weighted BCE on probabilities, per class: -(w+ y log p + w- (1-y) log(1-p)),
    averaged over classes and images (Keras' ``class_weight`` cannot do this for 14
    sigmoid outputs). Unweighted when the weights are None."""
    wp = tf.constant(pos_weight if pos_weight is not None else np.ones(NUM_CLASSES), tf.float32)
    wn = tf.constant(neg_weight if neg_weight is not None else np.ones(NUM_CLASSES), tf.float32)
    eps = 1e-7

    def weighted_bce(y_true, y_pred):
        y = tf.cast(y_true, tf.float32)
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), eps, 1 - eps)
        per = -(wp * y * tf.math.log(p) + wn * (1 - y) * tf.math.log(1 - p))
        return tf.reduce_mean(per, axis=-1)

    return weighted_bce


def _inputs(config: ChexnetConfig, data: splits.Data, options):
    """(train(context, first_step, statistics), val(context)): this rank's training and
    validation pipelines and their DatasetInfo in a given world (val: (None, None) for an
    empty split). `statistics`: the training images in one fixed order, for the batch-norm
    statistics pass (files already checked by the training pipeline; not cached: a second
    writer of the training pipeline's cache file would fail)."""
    train_split, val_split = data.splits["train"], data.splits["val"]

    def train(context, first_step=0, statistics=False):
        return input_pipeline.train_dataset(
            data.paths["train"], train_split.labels,
            dataclasses.replace(options, verify=False, cache=None) if statistics else options,
            batch_size=horovod_glue.rank_batch(config.train_batch_size, context),
            rank=context.rank, size=context.size, seed=config.seed or 0,
            first_step=first_step, reshuffle=not statistics)

    def val(context):
        if not len(val_split):
            return None, None
        return input_pipeline.eval_dataset(
            data.paths["val"], val_split.labels, options,
            batch_size=max(1, config.eval_batch_size // context.size), rank=context.rank,
            size=context.size, split="val")
    return train, val


class ChexnetTask(runner.Task):
    """Fine-tuning on ChestX-ray14 (14 labels, weighted BCE, per-class AUROC), for
    `hooks.training.runner.run`. Its data are checked, and its pipelines made, before any model."""

    def __init__(self, config: ChexnetConfig):
        self.config = config
        self.pipelines = {}  # this world's {"context", "train", "val", "statistics"}

    def batch_sizes(self) -> dict:
        return {"train_batch_size": self.config.train_batch_size,
                "eval_batch_size": self.config.eval_batch_size}

    def check_input(self, context, log) -> None:
        """Splits, starting weights and every training/validation file (elastic: the
        pipelines are made in the loop for each world, with no collective before it)."""
        config = self.config
        self.data = splits.load_data(config)
        log("chexnet splits (patient-wise):\n" + self.data.summary)
        config_lib.check_learning_rate(config)
        self.pretrained = resolve_init(config)  # ModelError before any model is built
        self.train_split, self.val_split = self.data.splits["train"], self.data.splits["val"]
        if len(self.train_split) == 0:
            raise DataError("the train split is empty")
        self.weights = (splits.class_weights(self.train_split.labels) if config.weighted_loss
                        else (None, None))
        self.options = input_pipeline.InputOptions(
            config.image_size, model_lib.preprocessing_for(config.backbone, init_kind(config)),
            config.cache, config.on_corrupt, view=config.image_view)
        self.inputs = _inputs(config, self.data, self.options)
        if not config.elastic:
            self._pipelines_for(context, log)

    def _pipelines_for(self, world, log) -> dict:
        """This rank's pipelines in `world`, made once per world (bad input fails on every
        rank)."""
        if self.pipelines.get("context") != world:
            train_input, val_input = self.inputs
            (train, train_info), (val, val_info) = horovod_glue.all_ranks_ok(
                lambda: (train_input(world), val_input(world)), world)
            self.pipelines.update(context=world, train=train, val=val,
                                  statistics=train_input(world, statistics=True)[0])
            for info in (train_info, val_info):
                if info is not None and info.skipped:
                    log(f"rank {world.rank}: skipped {len(info.skipped)} corrupt images")
        return self.pipelines

    def build(self, context, log):
        config = self.config
        network, self.init = build_network(config, self.pretrained)
        self.steps_per_epoch = max(len(self.train_split) / config.train_batch_size, 1e-9)
        self.total_steps = schedules.run_steps(config.train_steps, config.train_epochs,
                                               self.steps_per_epoch)
        self.peak_lr, self.lr_source = peak_learning_rate(config, self.init)
        self.warnings = [w for w in [config_lib.learning_rate_warning(config.optimizer,
                                                                      self.peak_lr)] if w]
        if self.init.kind == "none":
            self.warnings.append("the backbone starts from RANDOM weights "
                                 "(--allow_random_init); CheXNet starts from ImageNet weights")
        self.bn_batches = math.ceil(min(config.bn_stats_images, len(self.train_split))
                                    / config.train_batch_size)
        self.schedule, self.warm = learning_rate_schedule(config, self.peak_lr,
                                                          self.steps_per_epoch, self.total_steps)
        self.plateau = cb.ReduceOnPlateau(self.schedule, config.plateau_patience,
                                          config.plateau_factor)
        self.network, self.optimizer = network, build_optimizer(config, self.schedule)
        return runner.Model(network, self.optimizer, make_loss(*self.weights),
                            callbacks=[self.plateau], state_variables=[self.schedule.factor])

    def restore(self, checkpoint) -> None:
        self.schedule.factor.assign(float(checkpoint.state.get("lr_factor", 1.0)))
        if "plateau" in checkpoint.state:  # older checkpoints: the counters start afresh
            self.plateau.load_state_dict(checkpoint.state["plateau"])

    def start_lines(self, trainer, context, start, resumed) -> list[str]:
        config, options = self.config, self.options
        bn_images = self.bn_batches * config.train_batch_size
        line = (f"chexnet: {self.network.name} ({self.network.count_params():,} parameters) "
                f"from {self.init.describe()}; {context.size} rank(s), global batch "
                f"{config.train_batch_size}, {self.total_steps} steps, peak lr "
                f"{self.peak_lr:.3g} ({self.lr_source}), warm-up {self.warm} steps, "
                f"{config.optimizer}, {'weighted' if config.weighted_loss else 'unweighted'} "
                f"BCE; input {options.view} {config.image_size} px, {options.preprocessing} "
                "normalisation; "
                + (f"batch-norm statistics recomputed from {bn_images} training images before "
                   "each evaluation and checkpoint" if self.bn_batches else
                   "batch-norm moving averages as trained (--bn_stats_images=0)")
                + (f"; resuming at step {start}" if resumed else ""))
        lines = [line] + [f"WARNING: {warning}" for warning in self.warnings]
        if not len(self.val_split):
            lines.append("no validation images: no evaluation during training, no report; "
                         "the last checkpoint is the result (run evaluate on it)")
        return lines

    def plan(self):
        steps_per_loop = min(self.config.steps_per_loop or max(1, round(self.steps_per_epoch)),
                             self.total_steps)
        return loop.Plan(self.total_steps, steps_per_loop, self.config.train_batch_size,
                         self.steps_per_epoch)

    def train_input(self, context, start):
        train_input = self.inputs[0]
        if self.config.elastic:
            return loop.Input(make=lambda world, step: train_input(world, step)[0])
        if start:
            # Resumed: the batches the uninterrupted run read next. Made again (the step is
            # known only now) with the same file check, so the shard, and so the order, is
            # the one the first attempt had even when --on_corrupt=skip dropped images.
            self.pipelines["train"] = train_input(context, start)[0]
        return loop.Input(self.pipelines["train"])

    def validation(self, trainer, log):
        return loop.Validation(lambda: self.validate(trainer, log), self.plan().steps_per_loop)

    def validate(self, trainer, log):
        """Batch-norm statistics recomputed, then AUROC on the validation split."""
        world = trainer.context
        inputs = self._pipelines_for(world, log)
        # Its own pipeline: the training iterator's prefetching must not change which
        # images the statistics see (a seeded run gives the same weights every time).
        batchnorm.recompute(self.network, inputs["statistics"], self.bn_batches, world)
        step = int(self.optimizer.iterations.numpy())
        if inputs["val"] is None:
            return evaluation.Evaluation({}, 0, step)
        scored = evaluate.score(*evaluate.gather(self.network, inputs["val"],
                                                 len(self.val_split), world), *self.weights)
        log(f"eval at step {step}: mean AUROC {scored.auroc.mean_auroc:.4f} over "
            f"{scored.auroc.num_defined} classes, loss {scored.values['loss']:.4f} "
            f"({len(scored.labels)} images)")
        for warning in scored.warnings:
            log(f"WARNING at step {step}: {warning}")
        return evaluation.Evaluation(scored.values, len(scored.labels), step, scored)

    def saving(self):
        saving = super().saving()
        return saving and dataclasses.replace(saving, best_metric="mean_auroc")

    def checkpoint_state(self) -> dict:
        """Recorded in every checkpoint: what rebuilds the model and resumes the run."""
        config = self.config
        return {"task": "chexnet", "backbone": config.backbone,
                "image_size": config.image_size, "num_classes": NUM_CLASSES,
                "class_names": list(CLASS_NAMES), "global_batch": config.train_batch_size,
                "init": self.init.describe(), "preprocessing": self.options.preprocessing,
                "image_view": self.options.view,
                "lr_factor": float(self.schedule.factor.numpy()),
                "plateau": self.plateau.state_dict()}

    def finish(self, trainer, outcome, log) -> dict:
        config, result, context = self.config, outcome.result, outcome.context
        scored = result.last_eval.details
        summary = {"mode": "train", "ranks": context.size,
                   "global_batch": config.train_batch_size, "model": self.network.name,
                   "init": self.init.describe(), "peak_learning_rate": self.peak_lr,
                   "learning_rate_source": self.lr_source, "optimizer": config.optimizer,
                   "final_step": result.final_step,
                   "train_seconds": time.perf_counter() - outcome.started,
                   "images_per_sec": result.images_per_sec,
                   "val_images": len(scored.labels) if scored else 0,
                   "mean_auroc": scored.auroc.mean_auroc if scored else None}
        summary.update({k: v for k, v in result.practices.items()
                        if k in ("world_size_changes", "elastic_seconds_lost")})
        best = (checkpoints.best(config.model_dir, "mean_auroc", "max") if config.model_dir
                else None)
        if best is not None:
            summary["best_checkpoint"] = best.path
        elif config.model_dir:
            last = checkpoints.latest(config.model_dir)
            summary["last_checkpoint"] = last.path if last else None
        if scored is None:
            summary["warnings"] = self.warnings
            log("SUMMARY " + json.dumps(summary, sort_keys=True, default=float))
            return summary
        scored.warnings[:0] = self.warnings  # the run's own warnings head the report's
        title = f"{self.network.name} fine-tuned, val split, step {result.final_step}"
        if context.is_chief:
            evaluate.add_intervals(scored, self.val_split.patient_ids[scored.index], config,
                                   log)
        evaluate.report(config.reports_to, scored, title, summary, context, log,
                        outcome.environment)
        return summary


def run(config: ChexnetConfig, context, log=print) -> dict:
    """Fine-tune as configured; returns (and rank 0 prints) a summary, writes reports."""
    return runner.run(ChexnetTask(config), context, log)
