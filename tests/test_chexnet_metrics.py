"""Exact AUROC (numpy) against sklearn, ROC curves, reports' file formats."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chexnet import metrics, reports
from chexnet.labels import CLASS_NAMES
from hooks.distributed.horovod_glue import Context
from hooks.errors import DataError


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_random_and_tied(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = (rng.random((n, 14)) < rng.uniform(0.02, 0.6, 14)).astype(np.float32)
    labels[:2] = [[0] * 14, [1] * 14]  # every class defined
    scores = rng.random((n, 14)).astype(np.float32)
    tied = np.round(scores * 5) / 5  # heavy ties: only 6 distinct values
    for s in (scores, tied):
        result = metrics.per_class_auroc(labels, s)
        expected = [roc_auc_score(labels[:, k], s[:, k]) for k in range(14)]
        np.testing.assert_allclose(result.auroc, expected, rtol=0, atol=1e-6)
        assert result.mean_auroc == pytest.approx(np.mean(expected), abs=1e-6)
        assert result.notes == ()


def test_auroc_all_tied_is_half_and_perfect_is_one():
    y = np.array([0, 1, 0, 1, 1])
    assert metrics.auroc(y, np.full(5, 0.3)) == 0.5
    assert metrics.auroc(y, y * 0.9) == 1.0
    assert metrics.auroc(y, 1 - y) == 0.0


def test_single_valued_class_is_nan_with_note_and_excluded_from_mean():
    rng = np.random.default_rng(1)
    labels = (rng.random((30, 14)) < 0.4).astype(np.float32)
    labels[:2] = [[0] * 14, [1] * 14]
    labels[:, CLASS_NAMES.index("Hernia")] = 0
    labels[:, CLASS_NAMES.index("Edema")] = 1
    scores = rng.random((30, 14))
    result = metrics.per_class_auroc(labels, scores)
    nan_classes = [c for c, v in zip(CLASS_NAMES, result.auroc) if math.isnan(v)]
    assert nan_classes == ["Edema", "Hernia"]
    assert result.num_defined == 12
    assert any("Hernia" in n and "no positive" in n for n in result.notes)
    assert any("Edema" in n and "no negative" in n for n in result.notes)
    defined = [
        roc_auc_score(labels[:, k], scores[:, k])
        for k in range(14)
        if CLASS_NAMES[k] not in ("Edema", "Hernia")
    ]
    assert result.mean_auroc == pytest.approx(np.mean(defined), abs=1e-9)


def test_roc_curve_area_equals_auroc():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(float)
    s = np.round(rng.random(200) * 10) / 10
    fpr, tpr = metrics.roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=1e-9)


def test_weighted_bce_matches_formula():
    y = np.array([[1.0, 0.0], [0.0, 0.0]])
    p = np.array([[0.8, 0.3], [0.1, 0.6]])
    wp, wn = np.array([2.0, 3.0]), np.array([0.5, 0.25])
    expected = np.mean(
        [-2 * np.log(0.8), -0.25 * np.log(0.7), -0.5 * np.log(0.9), -0.25 * np.log(0.4)]
    )
    assert metrics.weighted_bce(y, p, wp, wn) == pytest.approx(expected)


def test_report_files_and_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 14)) < 0.3).astype(np.float32)
    labels[:, 13] = 0
    probs = rng.random((40, 14))
    result = metrics.per_class_auroc(labels, probs)
    written = reports.write_report(
        str(tmp_path), result, labels, probs, Context(), title="t", summary={"a": 1}
    )
    assert sorted(p.split("/")[-1] for p in written) == [
        "auroc.csv",
        "auroc.md",
        "roc_curves.png",
        "summary.json",
    ]
    rows = (tmp_path / "auroc.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:15]] == list(CLASS_NAMES)
    assert rows[14].split(",")[1] == "n/a"  # Hernia: no positives
    assert (tmp_path / "roc_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "auroc.md").read_text()
    assert "| Pneumonia |" in md and "0.7680" in md and "note: Hernia" in md
    # a non-chief rank writes nothing
    assert (
        reports.write_report(str(tmp_path / "r1"), result, labels, probs, Context(rank=1, size=2))
        == []
    )
    assert not (tmp_path / "r1").exists()

    names = [f"{i:08d}_000.png" for i in range(40)]
    reports.write_predictions_csv(str(tmp_path / "p.csv"), names, probs, Context())
    got_names, got = reports.read_predictions_csv(str(tmp_path / "p.csv"))
    assert got_names == names
    np.testing.assert_allclose(got, probs, atol=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,prob_Atelectasis\nx.png,0.5\n")
    with pytest.raises(DataError, match="missing columns"):
        reports.read_predictions_csv(str(bad))
