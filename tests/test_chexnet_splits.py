"""ChestX-ray14 labels and splits on the real NIH files in ../shared/data/chestxray14
(a test that reads them fails naming the missing file; the pipeline tests need no sample)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from chexnet import splits as data
from chexnet.labels import CHEXNET_PUBLISHED_AUROC, CLASS_NAMES, NO_FINDING, encode_findings
from hooks.errors import DataError
from tests.conftest import SHARED_DATA, shared_data

DATA = SHARED_DATA / "chestxray14"
CSV_2017 = DATA / "Data_Entry_2017.csv.gz"
CSV_2020 = DATA / "Data_Entry_2017_v2020.csv.gz"


def col(name: str) -> int:
    return CLASS_NAMES.index(name)


@pytest.fixture(scope="module")
def table_2017():
    return data.read_data_entry(shared_data(CSV_2017))


@pytest.fixture(scope="module")
def table_2020():
    return data.read_data_entry(shared_data(CSV_2020))


@pytest.fixture(scope="module")
def split_lists():
    shared_data(DATA / "splits" / "train_list.txt")
    return data.load_split_lists(DATA / "splits")


# ----------------------------------------------------------------------- labels


def test_encode_findings():
    assert CLASS_NAMES[6:8] == ("Pneumonia", "Pneumothorax")
    assert len(CLASS_NAMES) == 14 and set(CHEXNET_PUBLISHED_AUROC) == set(CLASS_NAMES)
    assert np.mean(list(CHEXNET_PUBLISHED_AUROC.values())) == pytest.approx(0.841, abs=5e-4)
    assert encode_findings(NO_FINDING).tolist() == [0.0] * 14
    v = encode_findings("Cardiomegaly|Emphysema")
    assert (
        v.dtype == np.float32
        and v.sum() == 2
        and v[col("Cardiomegaly")] == v[col("Emphysema")] == 1
    )
    with pytest.raises(ValueError, match="Infiltrate"):
        encode_findings("Mass|Infiltrate")


# -------------------------------------------------------------------------- CSV


def test_csv_2017(table_2017):
    t = table_2017
    assert len(t) == 112_120 and t.labels.shape == (112_120, 14) and t.labels.dtype == np.float32
    positives = t.labels.sum(0)
    assert positives[col("Hernia")] == 227
    assert positives[col("Pneumonia")] == 1_353
    assert positives[col("Infiltration")] == 19_870
    assert (t.labels.sum(1) == 0).sum() == 60_412  # "No Finding" rows
    # "058Y" strings -> ints; the 2017 file still has its known bogus ages (412-414Y).
    assert t.age.dtype.kind == "i" and t.age[:3].tolist() == [58, 58, 58] and t.age.max() == 414
    assert (
        t.image_index[0] == "00000001_000.png"
        and t.patient_id[0] == 1
        and t.patient_id[-1] == 30_805
    )
    assert set(t.gender) == {"M", "F"} and set(t.view_position) == {"PA", "AP"}


def test_csv_v2020(table_2017, table_2020):
    t = table_2020
    assert len(t) == 112_120 and sorted(t.image_index) == sorted(table_2017.image_index)
    positives = t.labels.sum(0)
    assert positives[col("Hernia")] == 227 and positives[col("Pneumonia")] == 1_431
    assert t.age.dtype.kind == "i" and t.age[:2].tolist() == [57, 58] and t.age.max() == 95
    row = {name: i for i, name in enumerate(table_2017.image_index)}
    old = table_2017.labels[[row[n] for n in t.image_index]]
    assert (t.labels != old).any(1).sum() == 181  # the relabelled images


def test_gzip_found_by_content_and_plain_text(tmp_path):
    shared_data(CSV_2017)
    disguised = tmp_path / "labels.csv"  # gzip bytes behind a .csv name
    shutil.copy(CSV_2017, disguised)
    assert len(data.read_data_entry(disguised)) == 112_120
    with gzip.open(CSV_2017, "rt", newline="") as f:
        head = "".join(f.readline() for _ in range(4))
    plain = tmp_path / "head.csv"
    plain.write_text(head, newline="")
    t = data.read_data_entry(plain)
    assert t.image_index == ["00000001_000.png", "00000001_001.png", "00000001_002.png"]
    assert t.labels[1, col("Emphysema")] == 1 and t.age.tolist() == [58, 58, 58]


def test_csv_errors(tmp_path):
    no_findings = tmp_path / "no_findings.csv"
    no_findings.write_text("Image Index,Patient ID,Patient Age\n00000001_000.png,1,58\n")
    with pytest.raises(DataError, match=r"no_findings\.csv.*'Finding Labels'") as err:
        data.read_data_entry(no_findings)
    assert "\n" not in str(err.value)

    unknown = tmp_path / "unknown.csv"
    unknown.write_text(
        "Image Index,Finding Labels,Patient ID,Patient Age\n"
        "00000001_000.png,Mass,1,058Y\n"
        "00000001_001.png,Mass|Infiltrate,1,058Y\n"
    )
    with pytest.raises(DataError, match=r"unknown\.csv:3: .*'Infiltrate'"):
        data.read_data_entry(unknown)

    with pytest.raises(DataError, match="not found"):
        data.read_data_entry(tmp_path / "absent.csv")


# ----------------------------------------------------------------------- splits


def test_split_lists_are_patient_disjoint(split_lists):
    assert {k: len(s) for k, s in split_lists.items()} == {
        "train": 78_468,
        "val": 11_219,
        "test": 22_433,
    }
    data.check_patient_disjoint(split_lists)
    ids = [set(s.patient_ids.tolist()) for s in split_lists.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(i) for i in ids) == 30_805  # every patient, once
    assert (
        split_lists["train"].names[0] == "00001522_000.png"
        and split_lists["train"].patient_ids[0] == 1522
    )


def test_split_list_labels_match_csv(split_lists, table_2017):
    """The 14 columns of the split lists are CLASS_NAMES order as read from the CSV."""
    row = {name: i for i, name in enumerate(table_2017.image_index)}
    for split in split_lists.values():
        rows = np.asarray([row[n] for n in split.names])
        np.testing.assert_array_equal(split.labels, table_2017.labels[rows])
        np.testing.assert_array_equal(split.patient_ids, table_2017.patient_id[rows])
    # The check has teeth: swapping Pneumonia and Pneumothorax breaks it.
    swapped = split_lists["train"].labels[:, [*range(6), 7, 6, *range(8, 14)]]
    rows = np.asarray([row[n] for n in split_lists["train"].names])
    assert (swapped != table_2017.labels[rows]).any(1).sum() > 4_000


def test_split_by_patient(table_2017):
    a = data.split_by_patient(table_2017, (0.7, 0.1, 0.2), seed=0)
    b = data.split_by_patient(table_2017, (0.7, 0.1, 0.2), seed=0)
    c = data.split_by_patient(table_2017, (0.7, 0.1, 0.2), seed=1)
    assert all(a[k].names == b[k].names for k in a)
    assert a["test"].names != c["test"].names
    data.check_patient_disjoint(a)
    sizes = np.array([len(s) for s in a.values()])
    assert sizes.sum() == 112_120
    np.testing.assert_allclose(sizes / 112_120, [0.7, 0.1, 0.2], atol=0.002)
    with pytest.raises(ValueError, match="sum to 1"):
        data.split_by_patient(table_2017, (0.7, 0.1, 0.1))


def test_split_official_carves_val_by_patient(split_lists, table_2017, tmp_path):
    # Stand-in for NIH's train_val_list / test_list (not shipped): the same one-name format.
    train_val = tmp_path / "train_val_list.txt"
    train_val.write_text("\n".join(split_lists["train"].names + split_lists["val"].names) + "\n")
    test = tmp_path / "test_list.txt"
    test.write_text("\n".join(split_lists["test"].names) + "\n")
    s = data.split_official(table_2017, train_val, test, val_fraction=0.125, seed=3)
    assert len(s["train"]) + len(s["val"]) == 78_468 + 11_219 and len(s["test"]) == 22_433
    assert len(s["val"]) / (78_468 + 11_219) == pytest.approx(0.125, abs=0.002)
    data.check_patient_disjoint(s)
    assert s["test"].names == split_lists["test"].names

    leaky = data.Split("leaky", ["00000001_000.png"], np.zeros((1, 14), np.float32), np.array([1]))
    first_patient = data.Split(
        "other", ["00000001_001.png"], np.zeros((1, 14), np.float32), np.array([1])
    )
    with pytest.raises(DataError, match="patient leak.*'leaky'.*'other'"):
        data.check_patient_disjoint([leaky, first_patient])


def test_class_weights_and_summary(split_lists):
    train = split_lists["train"].labels
    w_pos, w_neg = data.class_weights(train)
    p = train.sum(0)
    n = len(train) - p
    np.testing.assert_allclose(w_pos, n / (p + n), rtol=1e-6)
    np.testing.assert_allclose(w_neg, p / (p + n), rtol=1e-6)
    assert w_pos[col("Hernia")] == pytest.approx(1 - 144 / 78_468, rel=1e-6)

    text = data.split_summary(split_lists)
    assert "78,468" in text and "22,433" in text
    assert "Hernia" in text and "144 ( 0.18%)" in text and len(text.splitlines()) == 17


# --------------------------------------------------------------------- images


def test_find_images_nih_layout(tmp_path):
    for folder, name in [("images_001", "00000001_000.png"), ("images_002", "00000002_000.png")]:
        (tmp_path / folder / "images").mkdir(parents=True)
        (tmp_path / folder / "images" / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    found = data.find_images(tmp_path)
    assert found == {
        "00000001_000.png": str(tmp_path / "images_001" / "images" / "00000001_000.png"),
        "00000002_000.png": str(tmp_path / "images_002" / "images" / "00000002_000.png"),
    }
    with pytest.raises(DataError, match="00000003_000.png"):
        data.resolve_paths(["00000001_000.png", "00000003_000.png"], found)
