"""ChestX-ray14 evaluation: exact AUROC over predictions gathered from every rank, for a
fine-tuned checkpoint (`run`) or an existing predictions file (`score_file`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from chexnet import bootstrap, input_pipeline, localize, metrics, reports, splits
from chexnet.config import ChexnetConfig
from hooks.errors import ConfigError, DataError
from hooks.state import checkpoints


@dataclasses.dataclass
class Scored:
    """Predictions in original image order with their labels and scores."""

    probs: np.ndarray  # [N, 14]
    labels: np.ndarray  # [N, 14]
    index: np.ndarray  # original image index of each row
    values: dict  # mean_auroc, loss, images, auroc_<class>
    auroc: metrics.AurocResult
    warnings: list[str] = dataclasses.field(default_factory=list)  # collapse, saturation
    intervals: object = None  # chexnet.bootstrap.Intervals (evaluate), None (training)


def find_checkpoint(path: str) -> checkpoints.Checkpoint:
    """A fine-tuned checkpoint: a ckpt-* folder, or a model_dir (best by val mean_auroc,
    else the newest). ConfigError for anything else."""
    found = checkpoints.read(path)
    if found is None:
        found = checkpoints.best(path, "mean_auroc", "max") or checkpoints.latest(path)
    if found is None:
        raise ConfigError(f"{path} is neither a checkpoint folder nor a directory holding "
                          "ckpt-* checkpoints")
    if found.state.get("task") != "chexnet":
        raise ConfigError(f"{found.path} is not a chexnet checkpoint (a resnet_main one? "
                          "fine-tune it first)")
    missing = [key for key in ("backbone", "image_size") if key not in found.state]
    if missing:  # a hand-edited or foreign state.json: say so, not a KeyError
        raise ConfigError(f"{os.path.join(found.path, checkpoints.STATE)} has no "
                          f"{' or '.join(map(repr, missing))}: not a complete chexnet checkpoint")
    return found


def gather(network, dataset, n: int, context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities and labels of the `n` images of a padded `eval_dataset`, from every
    rank, in original order: (probs, labels, original index)."""
    from hooks.training import evaluation

    probs, labels, weights = evaluation.predict(network, dataset, context)
    slots = -(-n // context.size)
    if len(probs) != slots * context.size:
        raise RuntimeError(f"gathered {len(probs)} predictions, expected {slots * context.size}")
    # Rank r holds original indices r, r+size, ... then padding: undo the interleave.
    index = (np.arange(context.size)[:, None] + context.size * np.arange(slots)[None, :]).ravel()
    keep = (weights > 0) & (index < n)
    order = np.argsort(index[keep], kind="stable")
    return probs[keep][order], labels[keep][order], index[keep][order]


def score(probs, labels, index, pos_weight=None, neg_weight=None) -> Scored:
    result = metrics.per_class_auroc(labels, probs)
    values = {"mean_auroc": result.mean_auroc,
              "loss": metrics.weighted_bce(labels, probs, pos_weight, neg_weight),
              "images": float(len(labels))}
    values.update({f"auroc_{k}": v for k, v in result.as_dict().items()})
    return Scored(probs, labels, index, values, result, metrics.prediction_warnings(probs))


def add_intervals(scored: Scored, patient_ids, config: ChexnetConfig, chief_log) -> None:
    """Patient-bootstrap intervals of the AUROCs (rank 0 only; --bootstrap_resamples=0:
    none)."""
    if config.bootstrap_resamples == 0:
        return
    t0 = time.perf_counter()
    scored.intervals = bootstrap.patient_bootstrap(
        scored.labels, scored.probs, patient_ids, config.bootstrap_resamples,
        config.bootstrap_seed)
    chief_log(f"bootstrap: {config.bootstrap_resamples} resamples of "
              f"{scored.intervals.patients} patients in {time.perf_counter() - t0:.1f} s")


def run(config: ChexnetConfig, context, log=print) -> dict:
    """``chexnet evaluate``: AUROC of a fine-tuned checkpoint on one split (reports, a
    predictions CSV); or of ``--predictions_csv`` without a model."""
    from chexnet import model as model_lib
    from hooks.distributed import horovod_glue

    chief_log = log if context.is_chief else (lambda *a, **k: None)
    if config.predictions_csv:
        return score_file(config, context, chief_log)
    horovod_glue.check_global_batches(context, eval_batch_size=config.eval_batch_size)
    ckpt = find_checkpoint(config.checkpoint or config.model_dir)
    state = ckpt.state
    # The network the checkpoint records (as predict does): --backbone/--image_size are
    # training flags, and their defaults must not make a user repeat them here.
    backbone = state.get("backbone", config.backbone)
    image_size = int(state.get("image_size", config.image_size))
    boxes = localize.read_boxes(config.boxes_csv) if config.boxes_csv else None
    data = splits.load_data(config)
    chief_log("chexnet splits (patient-wise):\n" + data.summary)
    name = config.split_to_evaluate
    split = data.splits[name]
    if len(split) == 0:
        raise DataError(f"the {name} split is empty")
    options = model_lib.input_options(state, cache=config.cache, on_corrupt=config.on_corrupt)
    ds, _ = horovod_glue.all_ranks_ok(lambda: input_pipeline.eval_dataset(
        data.paths[name], split.labels, options,
        batch_size=max(1, config.eval_batch_size // context.size), rank=context.rank,
        size=context.size, split=name), context)
    network, _ = model_lib.build_chexnet_model(backbone, image_size)
    try:
        checkpoints.restore(ckpt, network)
    except checkpoints.CheckpointError as err:
        raise model_lib.ModelError(str(err)) from None
    t0 = time.perf_counter()
    scored = score(*gather(network, ds, len(split), context))
    names = [split.names[i] for i in scored.index]
    if context.is_chief:
        add_intervals(scored, split.patient_ids[scored.index], config, chief_log)
    summary = {"mode": "evaluate", "ranks": context.size, "checkpoint": ckpt.path,
               "split": name, "images": len(names), "mean_auroc": scored.auroc.mean_auroc,
               "loss": scored.values["loss"], "seconds": time.perf_counter() - t0,
               "skipped": int(len(split) - len(names))}
    title = f"{network.name} {ckpt.path}, {name} split ({len(names)} images)"
    out = config.reports_to
    reports.write_predictions_csv(os.path.join(out, "predictions.csv"), names, scored.probs,
                                  context)
    report(out, scored, title, summary, context, chief_log)
    if boxes is not None and context.is_chief:
        paths = [data.paths[name][i] for i in scored.index]
        localization_report(config, network, options, boxes, names, paths, scored.probs,
                            title, chief_log)
    return summary


def localization_report(config, network, options, boxes, names, paths, probs, title,
                        chief_log) -> list:
    """Grad-CAM of every boxed finding of the evaluated images against its NIH boxes:
    localization.md / .csv and overlays (REPORT_DIR/localization/) when there is a
    report folder; the table is logged."""
    from chexnet.predict import read_image

    out = config.reports_to
    items = [(n, read_image(p), boxes[n], row)
             for n, p, row in zip(names, paths, probs) if n in boxes]
    rows = localize.localize(network, items, options, config.cam_threshold,
                             os.path.join(out, "localization") if out else None,
                             log=lambda *a: None)
    text = localize.markdown(rows, config.cam_threshold,
                             f"{title}, {len(items)} images with boxes")
    chief_log(text)
    if out:
        from hooks.distributed.horovod_glue import Context, write_atomically

        write_atomically(os.path.join(out, "localization.md"),
                         reports._write_text(text), Context())
        write_atomically(os.path.join(out, "localization.csv"),
                         lambda p: localize.write_csv(p, rows), Context())
    return rows


def report(out_dir, scored: Scored, title: str, summary: dict, context, chief_log,
           environment: dict | None = None) -> None:
    """Rank 0 writes the report files (when `out_dir`; summary.json also holds the run's
    `environment`), logs the table, the warnings (collapsed or saturated predictions) and
    a SUMMARY line."""
    summary["warnings"] = list(scored.warnings)
    if out_dir:
        written = summary if environment is None else dict(summary, environment=environment)
        reports.write_report(out_dir, scored.auroc, scored.labels, scored.probs, context,
                             title=title, summary=written, warnings=scored.warnings,
                             intervals=scored.intervals)
    chief_log(reports.markdown_table(scored.auroc, title, scored.warnings, scored.intervals))
    for warning in scored.warnings:
        chief_log(f"WARNING: {warning}")
    chief_log("SUMMARY " + json.dumps(summary, sort_keys=True, default=float))


def score_file(config: ChexnetConfig, context, chief_log) -> dict:
    """``evaluate --predictions_csv``: AUROC of an existing predictions file (``Image Index``
    + ``prob_<Class>``) against the labels of --csv/--split_dir; no model, no images."""
    names, probs = reports.read_predictions_csv(config.predictions_csv)
    data = splits.load_data(dataclasses.replace(config, mode="evaluate", eval_split="all",
                                                max_images=None), need_images=False)
    table = data.splits["all"]
    row_of = {n: i for i, n in enumerate(table.names)}
    missing = [n for n in names if n not in row_of]
    if missing:
        raise DataError(f"{config.predictions_csv}: {len(missing)} images have no labels, "
                        f"first: {missing[0]}")
    rows = np.asarray([row_of[n] for n in names])
    scored = score(probs, table.labels[rows], rows)
    if context.is_chief:
        add_intervals(scored, table.patient_ids[rows], config, chief_log)
    summary = {"mode": "score", "predictions_csv": config.predictions_csv, "images": len(names),
               "mean_auroc": scored.auroc.mean_auroc}
    title = f"{config.predictions_csv} ({len(names)} images)"
    report(config.reports_to, scored, title, summary, context, chief_log)
    return summary
