"""Exact per-class AUROC and ROC curves in numpy (no sklearn, no TensorFlow).

AUROC is the Mann-Whitney statistic: the probability that a random positive scores
higher than a random negative, ties counting one half. Computed from average ranks
(ties share their mean rank), it equals ``sklearn.metrics.roc_auc_score`` exactly (the
tests check to 1e-6). ``keras.metrics.AUC`` is a thresholded approximation: not used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from chexnet.labels import CLASS_NAMES


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values get the mean of the ranks they span."""
    values = np.asarray(values, np.float64).ravel()
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of (start+1 .. end)
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(values), np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC of one class; NaN when ``labels`` hold only one value (undefined)."""
    labels = np.asarray(labels, np.float64).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (got NaN or inf)")
    positives = labels == 1
    n_pos = int(positives.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores)
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)
    to (1, 1); tied scores form one point, so the trapezoid area equals ``auroc``."""
    labels = np.asarray(labels, np.float64).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tps = np.cumsum(y)[last_of_run]
    fps = np.cumsum(1 - y)[last_of_run]
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.r_[0.0, np.full(len(tps), np.nan)]
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.r_[0.0, np.full(len(fps), np.nan)]
    return fpr, tpr


@dataclasses.dataclass(frozen=True)
class AurocResult:
    """Per-class AUROC (NaN where undefined), their mean over defined classes, counts."""

    class_names: tuple[str, ...]
    auroc: np.ndarray  # float64 [K]
    positives: np.ndarray  # int64 [K]
    num_images: int
    notes: tuple[str, ...]

    @property
    def mean_auroc(self) -> float:
        defined = self.auroc[~np.isnan(self.auroc)]
        return float(defined.mean()) if defined.size else math.nan

    @property
    def num_defined(self) -> int:
        return int((~np.isnan(self.auroc)).sum())

    def as_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.class_names, self.auroc)}


def per_class_auroc(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> AurocResult:
    """AUROC of every column of [N, K] ``labels``/``scores``; a column with only
    positives or only negatives gets NaN and a note saying why."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 2 or labels.shape != scores.shape or labels.shape[1] != len(class_names):
        raise ValueError(
            f"labels {labels.shape} and scores {scores.shape} must both be [N, {len(class_names)}]"
        )
    values, notes = [], []
    positives = labels.sum(axis=0).astype(np.int64)
    for k, name in enumerate(class_names):
        value = auroc(labels[:, k], scores[:, k])
        if math.isnan(value):
            kind = "no positive" if positives[k] == 0 else "no negative"
            notes.append(f"{name}: AUROC undefined ({kind} images among {labels.shape[0]})")
        values.append(value)
    return AurocResult(tuple(class_names), np.asarray(values, np.float64), positives,
                       int(labels.shape[0]), tuple(notes))


def weighted_bce(labels: np.ndarray, probs: np.ndarray, pos_weight=None, neg_weight=None,
                 epsilon: float = 1e-7) -> float:
    """Mean (weighted) binary cross-entropy over images and classes, numpy version of the
    training loss (``chexnet.train.WeightedBCE``); weights default to 1."""
    y = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), epsilon, 1 - epsilon)
    wp = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    wn = 1.0 if neg_weight is None else np.asarray(neg_weight, np.float64)
    if y.size == 0:
        return math.nan
    return float(np.mean(-(wp * y * np.log(p) + wn * (1 - y) * np.log(1 - p))))


# A network that says the same thing about every patient, or only 0s and 1s, is broken
# whatever its AUROC on a handful of images: evaluate, train and predict say so.
FLAT_SPREAD = 1e-3  # a class is "flat" when max - min of its probabilities is below this
SATURATION_MARGIN = 1e-3  # a probability within this of 0 or 1 is "saturated"
SATURATED_SHARE = 0.5  # warn when at least this share of all probabilities is saturated


def prediction_warnings(probs: np.ndarray,
                        class_names: Sequence[str] = CLASS_NAMES) -> list[str]:
    """One-line warnings for [N, K] probabilities that do not depend on the image (every
    class spread over the images below FLAT_SPREAD; needs N >= 2) or are saturated (at
    least SATURATED_SHARE of them within SATURATION_MARGIN of 0 or 1). [] when healthy."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        return []
    warnings = []
    n = probs.shape[0]
    if n >= 2:
        spread = probs.max(axis=0) - probs.min(axis=0)
        if np.all(spread < FLAT_SPREAD):
            warnings.append(
                f"predictions do not depend on the image: for every class the {n} images' "
                f"probabilities differ by less than {FLAT_SPREAD:g} (largest spread "
                f"{spread.max():.2g}); the network has collapsed (learning rate? batch-norm "
                "statistics? see docs/chexnet.md)")
    saturated = (probs < SATURATION_MARGIN) | (probs > 1 - SATURATION_MARGIN)
    if saturated.mean() >= SATURATED_SHARE:
        always = [c for c, s in zip(class_names, saturated.all(axis=0)) if s]
        warnings.append(
            f"{saturated.mean():.0%} of the probabilities are within {SATURATION_MARGIN:g} of "
            "0 or 1 (saturated)"
            + (f"; on every image: {', '.join(always)}" if always else "")
            + " (learning rate too high for the optimizer?)")
    return warnings
