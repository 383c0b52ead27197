"""Patient-level bootstrap confidence intervals of per-class AUROC and of their mean.

Images of one patient are correlated, so the bootstrap resamples PATIENTS with
replacement (each drawn patient brings all of its images) and reports the percentile
interval. The draws can be replayed:
``np.random.default_rng(seed).integers(0, P, size=(resamples, P))`` over the patients in
``np.unique`` order (drawn in chunks of CHUNK resamples: the same stream). The AUROC of a
resample is computed from image weights (how often the image's patient was drawn),
vectorised over resamples; it equals sklearn's ``roc_auc_score`` on the images listed that
many times.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LEVEL = 0.95
CHUNK = 64  # resamples computed together: memory ~ CHUNK x images x 8 bytes x a few


@dataclasses.dataclass(frozen=True)
class Intervals:
    """Percentile intervals: ``low``/``high`` [K] per class (NaN where undefined),
    ``mean_low``/``mean_high`` of the mean AUROC, and how they were drawn."""

    low: np.ndarray
    high: np.ndarray
    mean_low: float
    mean_high: float
    resamples: int
    seed: int
    patients: int
    level: float = LEVEL

    def as_dict(self, class_names) -> dict:
        def pair(lo, hi):
            return None if math.isnan(lo) else [float(lo), float(hi)]

        return {"per_class": {c: pair(lo, hi) for c, lo, hi in zip(class_names, self.low,
                                                                   self.high)},
                "mean": pair(self.mean_low, self.mean_high), "resamples": self.resamples,
                "seed": self.seed, "patients": self.patients, "level": self.level,
                "unit": "patient"}


def draw_counts(rng: np.random.Generator, patients: int, resamples: int) -> np.ndarray:
    """[resamples, patients] how often each patient is drawn in each resample: the next
    ``rng.integers(0, patients, (resamples, patients))`` (consecutive calls continue one
    stream: drawing in chunks gives the draws of one big call)."""
    drawn = rng.integers(0, patients, size=(resamples, patients))
    rows = np.repeat(np.arange(resamples), patients)
    return np.bincount(rows * patients + drawn.ravel(),
                       minlength=resamples * patients).reshape(resamples, patients)


def weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray,
                   order: np.ndarray | None = None) -> np.ndarray:
    """AUROC of one class for each row of ``weights`` [B, N] (images repeated that many
    times); ties count one half. NaN where a row has no positive or no negative weight.
    ``order``: ``np.argsort(scores)`` when the caller has it."""
    order = np.argsort(scores, kind="mergesort") if order is None else order
    s, y = scores[order], labels[order] == 1
    w = weights[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # runs of tied scores
    pos = np.add.reduceat(w * y, starts, axis=1)  # [B, G] positive weight per tie group
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


def patient_bootstrap(labels: np.ndarray, scores: np.ndarray, patient_ids: np.ndarray,
                      resamples: int = 1000, seed: int = 0, level: float = LEVEL) -> Intervals:
    """Percentile intervals of each column's AUROC and of the mean over the classes whose
    AUROC is defined on all the data (a resample's mean skips a class it lacks positives
    or negatives of). A class defined in fewer than half the resamples gets NaN."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    unique, patient_of = np.unique(np.asarray(patient_ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    k = labels.shape[1]
    values = np.empty((resamples, k))
    orders = [np.argsort(scores[:, c], kind="mergesort") for c in range(k)]
    for start in range(0, resamples, CHUNK):  # memory: CHUNK x images, not resamples x
        n = min(CHUNK, resamples - start)
        weights = draw_counts(rng, len(unique), n)[:, patient_of]
        for c in range(k):
            values[start:start + n, c] = weighted_auroc(labels[:, c], scores[:, c], weights,
                                                        orders[c])
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    defined = np.mean(~np.isnan(values), axis=0) >= 0.5
    low, high = np.full(k, np.nan), np.full(k, np.nan)
    if defined.any():
        low[defined], high[defined] = np.nanpercentile(values[:, defined], q, axis=0)
    full = np.array([0 < labels[:, c].sum() < len(labels) for c in range(k)]) & defined
    mean_low = mean_high = math.nan
    if full.any():
        kept = values[:, full]
        count = (~np.isnan(kept)).sum(axis=1)
        means = np.nansum(kept, axis=1) / np.where(count > 0, count, 1)
        mean_low, mean_high = np.percentile(means[count > 0], q)
    return Intervals(low, high, float(mean_low), float(mean_high), resamples, seed,
                     len(unique), level)
