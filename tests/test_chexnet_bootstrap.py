"""Patient-bootstrap AUROC intervals against an independent replay (numpy patient draws +
sklearn's AUROC) and against DeLong's interval (DeLong et al. 1988, Sun & Xu 2014)."""

import csv
import json

import numpy as np
import pytest
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from chexnet import bootstrap, evaluate, metrics, reports
from chexnet.config import ChexnetConfig
from chexnet.labels import CLASS_NAMES
from hooks.distributed.horovod_glue import Context

from .conftest import shared_data


def replay(labels, scores, patient_ids, resamples, seed):
    """[resamples, K] AUROCs: the documented draw, every drawn patient's images listed
    as often as drawn, sklearn's roc_auc_score (NaN where a class is single-valued)."""
    patients = np.unique(patient_ids)
    drawn = np.random.default_rng(seed).integers(0, len(patients), (resamples, len(patients)))
    images_of = [np.flatnonzero(patient_ids == p) for p in patients]
    out = np.full((resamples, labels.shape[1]), np.nan)
    for b in range(resamples):
        rows = np.concatenate([images_of[p] for p in drawn[b]])
        for k in range(labels.shape[1]):
            if 0 < labels[rows, k].sum() < len(rows):
                out[b, k] = roc_auc_score(labels[rows, k], scores[rows, k])
    return out


def _patients_data(seed, n=240, patients=60, classes=4):
    rng = np.random.default_rng(seed)
    pid = rng.integers(1000, 1000 + patients, n)
    sick = rng.random((patients + 1000, classes)) < 0.3  # a patient's images share labels
    labels = sick[pid].astype(np.float32)
    labels[rng.random(labels.shape) < 0.1] = 0  # and differ a little
    scores = np.round(rng.random((n, classes)) + 0.6 * labels, 1)  # ties
    return labels, scores, pid


@pytest.mark.parametrize("seed", [0, 1])
def test_intervals_equal_an_independent_patient_replay(seed):
    labels, scores, pid = _patients_data(seed)
    labels[:, 3] = 0
    labels[:3, 3] = 1  # rare class: some resamples have no positive
    got = bootstrap.patient_bootstrap(labels, scores, pid, resamples=150, seed=seed + 7)
    values = replay(labels, scores, pid, 150, seed + 7)
    assert np.isnan(values[:, 3]).any()
    np.testing.assert_allclose(got.low, np.nanpercentile(values, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(got.high, np.nanpercentile(values, 97.5, axis=0), atol=1e-12)
    means = np.nanmean(values, axis=1)
    assert got.mean_low == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert got.mean_high == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    assert got.patients == 60 or got.patients == len(np.unique(pid))
    # the point estimate lies inside its interval
    point = metrics.per_class_auroc(labels, scores, CLASS_NAMES[:4]).auroc
    assert np.all((got.low <= point) & (point <= got.high))


def test_images_of_one_patient_are_not_independent():
    """Ten identical images per patient: resampling images would narrow the interval by
    about sqrt(10); resampling patients keeps the width of the one-image-per-patient data."""
    labels, scores, pid = _patients_data(3, n=300, patients=300, classes=1)
    pid = np.arange(300)
    single = bootstrap.patient_bootstrap(labels, scores, pid, 1000, 0)
    rep = bootstrap.patient_bootstrap(np.repeat(labels, 10, 0), np.repeat(scores, 10, 0),
                                      np.repeat(pid, 10), 1000, 0)
    width = single.high - single.low
    np.testing.assert_allclose(rep.high - rep.low, width, rtol=0.02)


def delong_interval(labels, scores, level=0.95):
    """DeLong et al. (1988) variance with Sun & Xu's (2014) midrank algorithm."""
    x, y = scores[labels == 1], scores[labels == 0]
    m, n = len(x), len(y)
    tz = rankdata(np.r_[x, y])
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - rankdata(x)) / n
    v01 = 1 - (tz[m:] - rankdata(y)) / m
    se = np.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    z = norm.ppf((1 + level) / 2)
    return auc, auc - z * se, auc + z * se


@pytest.mark.parametrize("seed", [0, 1])
def test_one_image_per_patient_matches_delong(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    labels = (rng.random((n, 1)) < 0.25).astype(np.float32)
    scores = rng.normal(size=(n, 1)) + 1.0 * labels
    auc, lo, hi = delong_interval(labels[:, 0], scores[:, 0])
    assert auc == pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]), abs=1e-12)
    got = bootstrap.patient_bootstrap(labels, scores, np.arange(n), 2000, seed)
    half = (hi - lo) / 2
    # Monte-Carlo error of a 2.5% quantile of 2000 draws is ~5% of the half-width.
    assert got.low[0] == pytest.approx(lo, abs=0.12 * half)
    assert got.high[0] == pytest.approx(hi, abs=0.12 * half)


def test_report_files_carry_the_intervals(tmp_path):
    labels, scores, pid = _patients_data(5, classes=14)
    labels[:, 13] = 0  # Hernia undefined
    result = metrics.per_class_auroc(labels, scores)
    iv = bootstrap.patient_bootstrap(labels, scores, pid, 80, 3)
    values = replay(labels, scores, pid, 80, 3)
    reports.write_report(str(tmp_path), result, labels, scores, Context(), title="t",
                         summary={}, intervals=iv)
    rows = list(csv.reader(open(tmp_path / "auroc.csv")))
    assert rows[0] == reports.CSV_HEADER
    for k, name in enumerate(CLASS_NAMES[:13]):
        row = rows[1 + k]
        assert row[0] == name
        assert float(row[2]) == pytest.approx(np.percentile(values[:, k], 2.5), abs=6e-5)
        assert float(row[3]) == pytest.approx(np.percentile(values[:, k], 97.5), abs=6e-5)
    assert rows[14][2:4] == ["n/a", "n/a"]
    means = np.nanmean(values[:, :13], axis=1)
    assert float(rows[15][2]) == pytest.approx(np.percentile(means, 2.5), abs=6e-5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    ci = summary["auroc_ci"]
    assert ci["per_class"]["Hernia"] is None and ci["resamples"] == 80 and ci["seed"] == 3
    assert ci["per_class"]["Atelectasis"][0] == pytest.approx(rows[1][2] and float(rows[1][2]),
                                                              abs=6e-5)
    md = (tmp_path / "auroc.md").read_text()
    assert "| class | AUROC | 95% CI | positives | CheXNet (2017), other test split |" in md
    assert "difference" not in md and "80 resamples" in md
    assert f"{np.percentile(values[:, 0], 2.5):.4f} - " in md


def test_evaluate_a_predictions_file_reports_patient_intervals(tmp_path):
    """evaluate --predictions_csv on the real sample names: the interval is over the
    patients the NIH CSV gives those images."""
    import gzip

    data_csv = shared_data("chestxray14", "Data_Entry_2017.csv.gz")
    with gzip.open(data_csv, "rt") as f:
        rows = [r for r in csv.reader(f)][1:]
    names = sorted(r[0] for r in rows)[:400]
    by_name = {r[0]: r for r in rows}
    labels = np.asarray([[c in by_name[n][1].split("|") for c in CLASS_NAMES] for n in names],
                        np.float32)
    pid = np.asarray([int(by_name[n][3]) for n in names])
    probs = np.clip(np.random.default_rng(0).random((400, 14)) * 0.5 + 0.4 * labels, 0, 1)
    reports.write_predictions_csv(str(tmp_path / "p.csv"), names, probs, Context())
    config = ChexnetConfig(mode="evaluate", csv=data_csv, predictions_csv=str(tmp_path / "p.csv"),
                           report_dir=str(tmp_path / "r"), bootstrap_resamples=100,
                           bootstrap_seed=4)
    evaluate.run(config, Context(), log=lambda *a: None)
    got = list(csv.reader(open(tmp_path / "r" / "auroc.csv")))
    values = replay(labels, np.round(probs, 6), pid, 100, 4)
    assert len(np.unique(pid)) < 400  # several images per patient
    for k, name in enumerate(CLASS_NAMES):
        if np.isnan(values[:, k]).mean() < 0.5:
            assert float(got[1 + k][2]) == pytest.approx(np.nanpercentile(values[:, k], 2.5),
                                                         abs=6e-5), name
