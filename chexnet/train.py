"""ChestX-ray14 fine-tuning and evaluation as a library: ``run(config, context)``.

``python -m chexnet`` turns flags into a ``ChexnetConfig``; this module never reads
flags. The training loop, checkpoints and distributed prediction come from ``hooks``
(shared with resnet_main). Every user mistake we can see cheaply (files, columns,
labels, checkpoint architecture) raises ``ConfigError`` / ``DataError`` / ``ModelError``
before a model is built or a file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Optional

import numpy as np

from chexnet import data, metrics, reports
from chexnet.data import DataError
from chexnet.labels import CLASS_NAMES, NUM_CLASSES
from chexnet.model import ModelError
from hooks.errors import ConfigError

MODES = ("train", "evaluate")
OPTIMIZERS = ("adam", "sgd")
EVAL_SPLITS = ("val", "test", "all")


@dataclasses.dataclass(frozen=True)
class ChexnetConfig:
    mode: str = "train"
    # data
    csv: Optional[str] = None
    image_dir: Optional[str] = None
    split_dir: Optional[str] = None
    train_val_list: Optional[str] = None
    test_list: Optional[str] = None
    split_fractions: tuple = (0.7, 0.1, 0.2)
    split_seed: int = 0
    val_fraction: float = 0.1
    only_present_images: bool = False
    max_images: Optional[int] = None
    on_corrupt: str = "fail"
    cache: Optional[str] = None
    eval_split: str = "val"
    # model
    backbone: str = "densenet121"
    image_size: int = 224
    pretrained_model_dir: Optional[str] = None
    init_checkpoint: str = "best"
    weights_file: Optional[str] = None
    weight_decay: float = 0.0
    # training
    train_batch_size: int = 16
    eval_batch_size: int = 16
    train_steps: Optional[int] = None
    train_epochs: Optional[float] = None
    learning_rate: Optional[float] = None
    default_learning_rate: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weighted_loss: bool = True
    warmup_epochs: float = 1.0
    plateau_patience: int = 1
    plateau_factor: float = 0.1
    min_learning_rate: float = 1e-6
    steps_per_loop: Optional[int] = None
    keep_checkpoints: int = 3
    log_every_n_steps: int = 10
    fp16_allreduce: bool = False
    seed: Optional[int] = None
    # outputs
    model_dir: Optional[str] = None
    report_dir: Optional[str] = None
    checkpoint: Optional[str] = None  # evaluate: chexnet checkpoint folder or model_dir
    predictions_csv: Optional[str] = None  # evaluate: score this file, no model

    @property
    def reports_to(self) -> Optional[str]:
        if self.report_dir:
            return self.report_dir
        return os.path.join(self.model_dir, "report") if self.model_dir else None


# ---------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class Data:
    splits: dict  # name -> data.Split
    paths: dict  # name -> list of image paths ([] when images are not needed)
    summary: str


def _restrict(table: data.Table, rows: np.ndarray) -> data.Table:
    return data.Table(
        image_index=[table.image_index[i] for i in rows], patient_id=table.patient_id[rows],
        labels=table.labels[rows], age=table.age[rows], gender=table.gender[rows],
        view_position=table.view_position[rows])


def _restrict_split(split: data.Split, keep: Sequence[bool]) -> data.Split:
    keep = np.asarray(keep, bool)
    return data.Split(split.name, [n for n, k in zip(split.names, keep) if k],
                      split.labels[keep], split.patient_ids[keep])


def load_data(config: ChexnetConfig, need_images: bool = True) -> Data:
    """Label table -> patient-wise splits -> image paths; raises DataError/ConfigError.

    Split source, first that applies: ``split_dir`` (CheXNet lists), the official
    ``train_val_list``/``test_list`` (+ patient-wise ``val_fraction`` carve-out), else
    ``split_fractions``/``split_seed`` by patient over the CSV. With
    ``only_present_images`` the CSV is first restricted to the images in ``image_dir``
    (the 50-image shared sample, demos); otherwise a listed image that is missing is an
    error. ``max_images`` keeps the first N rows (sorted by name) for quick runs.
    """
    images = data.find_images(config.image_dir) if need_images else {}
    if config.split_dir:
        splits = data.load_split_lists(config.split_dir)
        if config.only_present_images:
            splits = {k: _restrict_split(s, [n in images for n in s.names]) for k, s in splits.items()}
    else:
        if not config.csv:
            raise ConfigError("--csv (Data_Entry_2017.csv) is required unless --split_dir is given")
        table = data.read_data_entry(config.csv)
        if config.only_present_images and need_images:
            rows = np.flatnonzero([n in images for n in table.image_index])
            if not len(rows):
                raise DataError(f"none of the {len(table)} images of {config.csv} are in {config.image_dir}")
            table = _restrict(table, rows)
        if config.max_images:
            rows = np.argsort(np.asarray(table.image_index))[: config.max_images]
            table = _restrict(table, np.sort(rows))
        if config.train_val_list or config.test_list:
            if not (config.train_val_list and config.test_list):
                raise ConfigError("--train_val_list and --test_list go together")
            splits = data.split_official(table, config.train_val_list, config.test_list,
                                         config.val_fraction, config.split_seed)
        else:
            fractions = tuple(float(f) for f in config.split_fractions)
            if len(fractions) != 3:
                raise ConfigError(f"--split_fractions needs 3 values (train,val,test), got {fractions}")
            try:
                splits = data.split_by_patient(table, fractions, config.split_seed)
            except ValueError as err:
                raise ConfigError(f"--split_fractions: {err}") from None
    if config.max_images and config.split_dir:
        splits = {k: data.Split(s.name, s.names[: config.max_images], s.labels[: config.max_images],
                                s.patient_ids[: config.max_images]) for k, s in splits.items()}
    if config.mode == "evaluate" and config.eval_split == "all":
        parts = list(splits.values())
        splits = dict(splits)
        splits["all"] = data.Split("all", [n for s in parts for n in s.names],
                                   np.concatenate([s.labels for s in parts]),
                                   np.concatenate([s.patient_ids for s in parts]))
    data.check_patient_disjoint({k: v for k, v in splits.items() if k != "all"})
    paths = {}
    if need_images:
        wanted = ("train", "val") if config.mode == "train" else (config.eval_split,)
        for name in wanted:
            paths[name] = data.resolve_paths(splits[name].names, images)
    return Data(splits, paths, data.split_summary([s for k, s in splits.items() if k != "all"]))


# ---------------------------------------------------------------- checks
def validate(config: ChexnetConfig) -> None:
    """Cheap checks of everything a user can get wrong, before any model is built."""
    from chexnet import model as model_lib

    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    model_lib.parse_backbone(config.backbone)
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer={config.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    if config.eval_split not in EVAL_SPLITS:
        raise ConfigError(f"--eval_split={config.eval_split} is not one of {', '.join(EVAL_SPLITS)}")
    if config.on_corrupt not in ("fail", "skip"):
        raise ConfigError(f"--on_corrupt={config.on_corrupt} must be fail or skip")
    for name in ("csv", "weights_file", "predictions_csv"):
        path = getattr(config, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"--{name}={path} does not exist")
    for name in ("image_dir", "split_dir"):
        path = getattr(config, name)
        if path and not os.path.isdir(path):
            raise ConfigError(f"--{name}={path} is not a directory")
    if config.mode == "train":
        if not config.image_dir:
            raise ConfigError("--image_dir is required for train")
        if not (config.train_steps or config.train_epochs):
            raise ConfigError("give --train_steps or --train_epochs")
        if config.pretrained_model_dir and config.weights_file:
            raise ConfigError("give --pretrained_model_dir or --weights_file, not both")
        if config.init_checkpoint not in ("best", "latest") and not config.pretrained_model_dir \
                and not os.path.isdir(config.init_checkpoint):
            raise ConfigError(f"--init_checkpoint={config.init_checkpoint} is not a checkpoint folder")
        if config.learning_rate is not None and config.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {config.learning_rate}")
    else:
        if not config.predictions_csv and not config.image_dir:
            raise ConfigError("--image_dir is required for evaluate (or --predictions_csv to score a file)")
        if not config.predictions_csv and not (config.checkpoint or config.model_dir):
            raise ConfigError("evaluate needs --checkpoint or --model_dir with a chexnet checkpoint")
    if config.mode == "train" or not config.predictions_csv:
        if not config.reports_to:
            raise ConfigError("--model_dir or --report_dir is required")


def resolve_init(config: ChexnetConfig):
    """The pre-training checkpoint to start from, or None; ModelError if unusable."""
    from chexnet import model as model_lib

    if config.pretrained_model_dir:
        ckpt = model_lib.find_pretrained_checkpoint(config.pretrained_model_dir, config.init_checkpoint)
    elif config.init_checkpoint not in ("best", "latest"):
        ckpt = model_lib.find_pretrained_checkpoint("", config.init_checkpoint)
    else:
        return None
    model_lib.check_pretrained_compatible(ckpt, config.backbone)
    return ckpt


def find_chexnet_checkpoint(path: str):
    """A fine-tuned checkpoint: a ckpt-* folder, or a model_dir (best by val mean_auroc,
    else the newest)."""
    from hooks import checkpoints

    state = checkpoints._read_state(path) if os.path.isdir(path) else None
    if state is not None:
        return checkpoints.Checkpoint(int(state.get("step", 0)), path, state)
    found = checkpoints.best(path, "mean_auroc", "max") or checkpoints.latest(path)
    if found is None:
        raise ConfigError(f"{path} is neither a checkpoint folder nor a directory holding ckpt-* checkpoints")
    if found.state.get("task") != "chexnet":
        raise ConfigError(f"{found.path} is not a chexnet checkpoint (a resnet_main one? fine-tune it first)")
    return found


# ---------------------------------------------------------------- training pieces
def warmup_steps(warmup_epochs: float, global_batch: int, steps_per_epoch: float) -> int:
    """Warm-up proportional to the global batch: ``warmup_epochs * global_batch / 256``
    epochs (so batch 256 warms up for warmup_epochs, batch 4096 for 16x as many)."""
    from hooks import schedules

    epochs = warmup_epochs * global_batch / 256.0
    return schedules.to_steps(epochs=epochs, steps_per_epoch=steps_per_epoch)


def _make_plateau_schedule(peak_lr: float, warmup: int, min_lr: float):
    import keras

    from hooks import schedules

    class PlateauScaled(keras.optimizers.schedules.LearningRateSchedule):
        """``LinearWarmup(peak) * factor``; ``factor`` is set by ``PlateauDecay``."""

        def __init__(self):
            self.base = schedules.LinearWarmup(peak_lr, warmup)
            self.factor = keras.Variable(1.0, trainable=False, dtype="float32", name="lr_factor")

        def __call__(self, step):
            return keras.ops.maximum(self.base(step) * self.factor,
                                     keras.ops.minimum(min_lr, self.base(step)))

        def get_config(self):
            return {"peak_lr": peak_lr, "warmup": warmup, "min_lr": min_lr}

    return PlateauScaled()


def make_plateau_callback(schedule, patience: int, factor: float, min_delta: float = 1e-4):
    """Multiplies the schedule's factor by ``factor`` after ``patience`` evaluations without
    a lower ``val_loss``. Every rank sees the same exact global val_loss (computed from the
    gathered predictions), so every rank makes the same decision: no communication."""
    import keras

    class PlateauDecay(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = math.inf
            self.wait = 0

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            loss = logs.get("val_loss")
            if loss is None or not math.isfinite(loss):
                return
            if loss < self.best - min_delta:
                self.best, self.wait = loss, 0
            else:
                self.wait += 1
                if self.wait >= patience:
                    schedule.factor.assign(float(schedule.factor.numpy()) * factor)
                    self.wait = 0
            logs["lr_factor"] = float(schedule.factor.numpy())

    return PlateauDecay()


def make_loss(pos_weight: Optional[np.ndarray], neg_weight: Optional[np.ndarray]):
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


def _label_weight_dataset(ds):
    """(x, y, w) -> (x, concat(y, w)) so hooks.evaluation.predict gathers the mask too."""
    import tensorflow as tf

    return ds.map(lambda x, y, w: (x, tf.concat([y, w[:, None]], axis=1)))


def _gather(network, dataset, n: int, context):
    from hooks import evaluation

    probs, yw = evaluation.predict(network, dataset, context)
    slots = -(-n // context.size)
    if len(probs) != slots * context.size:
        raise RuntimeError(f"gathered {len(probs)} predictions, expected {slots * context.size}")
    # Rank r holds original indices r, r+size, ... then padding: undo the interleave.
    index = (np.arange(context.size)[:, None] + context.size * np.arange(slots)[None, :]).ravel()
    keep = (yw[:, -1] > 0) & (index < n)
    order = np.argsort(index[keep], kind="stable")
    return probs[keep][order], yw[keep][order, :-1], index[keep][order]


def _preprocessing(config: ChexnetConfig) -> str:
    from chexnet.model import preprocessing_for

    return preprocessing_for(config.backbone)


def score(probs, labels, pos_weight=None, neg_weight=None) -> tuple[dict, metrics.AurocResult]:
    result = metrics.per_class_auroc(labels, probs)
    values = {"mean_auroc": result.mean_auroc,
              "loss": metrics.weighted_bce(labels, probs, pos_weight, neg_weight),
              "images": float(len(labels))}
    values.update({f"auroc_{k}": v for k, v in result.as_dict().items()})
    return values, result


def all_ranks_ok(build, context):
    """Run ``build()`` on every rank; if it raises on any rank, raise on every rank (the
    failing rank its own error, the others a pointer to it) instead of leaving the healthy
    ranks waiting in a collective. Each rank checks only its own shard of the images."""
    from hooks import horovod_glue

    error = None
    try:
        result = build()
    except (DataError, ValueError, OSError) as err:
        error = err
    failed = horovod_glue.allreduce_sum([np.int64(error is not None)], context)[0]
    if error is not None:
        raise error
    if failed:
        raise DataError(f"{int(failed)} other rank(s) found bad input (their error names it)")
    return result


# ---------------------------------------------------------------- run
def run(config: ChexnetConfig, context, log=print) -> dict:
    """Train (fine-tune) or evaluate as ``config.mode`` says; returns a summary dict."""
    validate(config)
    chief_log = log if context.is_chief else (lambda *a, **k: None)
    if config.mode == "evaluate" and config.predictions_csv:
        return score_predictions_file(config, context, chief_log)
    from hooks import horovod_glue

    batches = {"eval_batch_size": config.eval_batch_size}
    if config.mode == "train":
        batches["train_batch_size"] = config.train_batch_size
    horovod_glue.check_global_batches(context, **batches)
    dataset = load_data(config)
    chief_log("chexnet splits (patient-wise):\n" + dataset.summary)
    if config.mode == "train":
        return _train(config, context, dataset, chief_log)
    return _evaluate(config, context, dataset, chief_log)


def _train(config: ChexnetConfig, context, dataset: Data, chief_log) -> dict:
    import keras

    from chexnet import model as model_lib
    from hooks import checkpoints, horovod_glue, loop, schedules

    pretrained = resolve_init(config)  # ModelError before any model is built
    train_split, val_split = dataset.splits["train"], dataset.splits["val"]
    if len(train_split) == 0 or len(val_split) == 0:
        raise DataError(f"train/val splits have {len(train_split)}/{len(val_split)} images; need both > 0")
    if config.weighted_loss:
        pos_w, neg_w = data.class_weights(train_split.labels)
    else:
        pos_w = neg_w = None
    # Datasets first: missing/corrupt files fail here, before the model and any output.
    per_rank = config.train_batch_size // context.size
    (train_ds, train_info), (eval_ds, eval_info) = all_ranks_ok(lambda: (data.make_dataset(
        dataset.paths["train"], train_split.labels, image_size=config.image_size,
        batch_size=per_rank, training=True, rank=context.rank, size=context.size,
        shuffle_seed=config.seed or 0, preprocessing=_preprocessing(config), cache=config.cache,
        on_corrupt=config.on_corrupt, with_info=True), data.make_dataset(
        dataset.paths["val"], val_split.labels, image_size=config.image_size,
        batch_size=max(1, config.eval_batch_size // context.size), training=False,
        rank=context.rank, size=context.size, preprocessing=_preprocessing(config),
        cache=config.cache, on_corrupt=config.on_corrupt, pad=True, with_info=True)), context)
    eval_ds = _label_weight_dataset(eval_ds)

    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    network, init = model_lib.build_chexnet_model(
        config.backbone, config.image_size, pretrained=pretrained,
        weights_file=config.weights_file, weight_decay=config.weight_decay)
    steps_per_epoch = max(len(train_split) / config.train_batch_size, 1e-9)
    total_steps = config.train_steps or schedules.to_steps(epochs=config.train_epochs,
                                                           steps_per_epoch=steps_per_epoch)
    total_steps = max(1, total_steps)
    peak_lr = config.learning_rate
    lr_source = "--learning_rate"
    if peak_lr is None and init.learning_rate:
        peak_lr, lr_source = init.learning_rate, f"recorded in {init.path}"
    if peak_lr is None:
        peak_lr, lr_source = config.default_learning_rate, "default"
    warm = min(warmup_steps(config.warmup_epochs, config.train_batch_size, steps_per_epoch), total_steps)
    schedule = _make_plateau_schedule(peak_lr, warm, config.min_learning_rate)
    optimizer = (keras.optimizers.Adam(learning_rate=schedule) if config.optimizer == "adam"
                 else keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum))
    trainer = horovod_glue.DistributedTrainer(network, context, fp16_allreduce=config.fp16_allreduce)
    trainer.compile(optimizer=optimizer, loss=make_loss(pos_w, neg_w), jit_compile=False)
    resumed = loop.restore_and_sync(config.model_dir, trainer, optimizer, context)
    if resumed is not None:
        schedule.factor.assign(float(resumed.state.get("lr_factor", 1.0)))
    start = int(optimizer.iterations.numpy())
    chief_log(f"chexnet: {network.name} ({network.count_params():,} parameters) from {init.describe()}; "
              f"{context.size} rank(s), global batch {config.train_batch_size}, {total_steps} steps, "
              f"peak lr {peak_lr:.3g} ({lr_source}), warm-up {warm} steps, {config.optimizer}, "
              f"{'weighted' if config.weighted_loss else 'unweighted'} BCE"
              + (f"; resuming at step {start}" if resumed else ""))
    for info in (train_info, eval_info):
        if info.skipped:
            chief_log(f"rank {context.rank}: skipped {len(info.skipped)} corrupt images")

    last = {}

    def evaluate():
        probs, labels, index = _gather(network, eval_ds, len(val_split), context)
        values, result = score(probs, labels, pos_w, neg_w)
        last.update(probs=probs, labels=labels, index=index, result=result)
        chief_log(f"eval at step {int(optimizer.iterations.numpy())}: mean AUROC "
                  f"{values['mean_auroc']:.4f} over {result.num_defined} classes, loss "
                  f"{values['loss']:.4f} ({len(labels)} images)")
        return values

    steps_per_loop = min(config.steps_per_loop or max(1, round(steps_per_epoch)), total_steps)
    state = lambda: {"task": "chexnet", "backbone": config.backbone, "image_size": config.image_size,
                     "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES),
                     "global_batch": config.train_batch_size, "init": init.describe(),
                     "lr_factor": float(schedule.factor.numpy())}
    t0 = time.perf_counter()
    result = loop.train(
        trainer, train_ds, context=context, total_steps=total_steps, steps_per_loop=steps_per_loop,
        global_batch=config.train_batch_size, steps_per_epoch=steps_per_epoch, evaluate=evaluate,
        eval_every_steps=steps_per_loop, model_dir=config.model_dir, checkpoint_state=state,
        keep_checkpoints=config.keep_checkpoints, best_metric="mean_auroc", best_mode="max",
        log_every_n_steps=config.log_every_n_steps,
        extra_callbacks=[make_plateau_callback(schedule, config.plateau_patience, config.plateau_factor)])
    if not last:
        evaluate()
    summary = {"mode": "train", "ranks": context.size, "global_batch": config.train_batch_size,
               "model": network.name, "init": init.describe(), "peak_learning_rate": peak_lr,
               "final_step": result.final_step, "train_seconds": time.perf_counter() - t0,
               "images_per_sec": result.images_per_sec, "val_images": int(len(last["labels"])),
               "mean_auroc": last["result"].mean_auroc}
    best = checkpoints.best(config.model_dir, "mean_auroc", "max") if config.model_dir else None
    if best is not None:
        summary["best_checkpoint"] = best.path
    title = f"{network.name} fine-tuned, val split, step {result.final_step}"
    reports.write_report(config.reports_to, last["result"], last["labels"], last["probs"], context,
                         title=title, summary=summary)
    chief_log(reports.markdown_table(last["result"], title))
    chief_log("SUMMARY " + json.dumps(summary, sort_keys=True, default=float))
    return summary


def _evaluate(config: ChexnetConfig, context, dataset: Data, chief_log) -> dict:
    from chexnet import model as model_lib
    from hooks import checkpoints

    ckpt = find_chexnet_checkpoint(config.checkpoint or config.model_dir)
    split = dataset.splits[config.eval_split]
    if len(split) == 0:
        raise DataError(f"the {config.eval_split} split is empty")
    state = ckpt.state
    if state.get("task") != "chexnet":
        raise ConfigError(f"{ckpt.path} is not a chexnet checkpoint")
    if state.get("backbone", config.backbone) != config.backbone or \
            int(state.get("image_size", config.image_size)) != config.image_size:
        raise ConfigError(f"{ckpt.path} holds a {state.get('backbone')} at {state.get('image_size')} px; "
                          f"pass --backbone={state.get('backbone')} --image_size={state.get('image_size')}")
    paths = dataset.paths[config.eval_split]
    ds, info = all_ranks_ok(lambda: data.make_dataset(
        paths, split.labels, image_size=config.image_size,
        batch_size=max(1, config.eval_batch_size // context.size), training=False,
        rank=context.rank, size=context.size, preprocessing=_preprocessing(config),
        cache=config.cache, on_corrupt=config.on_corrupt, pad=True, with_info=True), context)
    network, _ = model_lib.build_chexnet_model(config.backbone, config.image_size)
    try:
        checkpoints.restore(ckpt, network)
    except checkpoints.CheckpointError as err:
        raise ModelError(str(err)) from None
    t0 = time.perf_counter()
    probs, labels, index = _gather(network, _label_weight_dataset(ds), len(split), context)
    values, result = score(probs, labels)
    names = [split.names[i] for i in index]
    summary = {"mode": "evaluate", "ranks": context.size, "checkpoint": ckpt.path,
               "split": config.eval_split, "images": len(names), "mean_auroc": result.mean_auroc,
               "loss": values["loss"], "seconds": time.perf_counter() - t0,
               "skipped": int(len(split) - len(names))}
    title = f"{network.name} {ckpt.path}, {config.eval_split} split ({len(names)} images)"
    out = config.reports_to
    reports.write_predictions_csv(os.path.join(out, "predictions.csv"), names, probs, context)
    reports.write_report(out, result, labels, probs, context, title=title, summary=summary)
    chief_log(reports.markdown_table(result, title))
    chief_log("SUMMARY " + json.dumps(summary, sort_keys=True, default=float))
    return summary


def score_predictions_file(config: ChexnetConfig, context, chief_log) -> dict:
    """``evaluate --predictions_csv``: AUROC of an existing predictions file (``Image Index``
    + ``prob_<Class>``) against the labels of --csv/--split_dir; no model, no images."""
    names, probs = reports.read_predictions_csv(config.predictions_csv)
    dataset = load_data(dataclasses.replace(config, mode="evaluate", eval_split="all", max_images=None),
                        need_images=False)
    table = dataset.splits["all"]
    row_of = {n: i for i, n in enumerate(table.names)}
    missing = [n for n in names if n not in row_of]
    if missing:
        raise DataError(f"{config.predictions_csv}: {len(missing)} images have no labels, first: {missing[0]}")
    labels = table.labels[[row_of[n] for n in names]]
    values, result = score(probs, labels)
    summary = {"mode": "score", "predictions_csv": config.predictions_csv, "images": len(names),
               "mean_auroc": result.mean_auroc}
    title = f"{config.predictions_csv} ({len(names)} images)"
    if config.reports_to:
        reports.write_report(config.reports_to, result, labels, probs, context, title=title, summary=summary)
    chief_log(reports.markdown_table(result, title))
    chief_log("SUMMARY " + json.dumps(summary, sort_keys=True, default=float))
    return summary
