"""ChestX-ray14 data layer on the real NIH files in ../shared/data/chestxray14."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from chexnet import data
from chexnet.data import DataError
from chexnet.labels import CHEXNET_PUBLISHED_AUROC, CLASS_NAMES, NO_FINDING, encode_findings

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data" / "chestxray14").resolve()
CSV_2017 = DATA / "Data_Entry_2017.csv.gz"
CSV_2020 = DATA / "Data_Entry_2017_v2020.csv.gz"
RGBA_IMAGE = "00004934_000.png"  # one of the real RGBA files in the sample

def col(name: str) -> int:
    return CLASS_NAMES.index(name)


@pytest.fixture(scope="module")
def table_2017():
    if not CSV_2017.is_file():
        pytest.skip(f"ChestX-ray14 label CSV not found at {CSV_2017}")
    return data.read_data_entry(CSV_2017)


@pytest.fixture(scope="module")
def table_2020():
    if not CSV_2020.is_file():
        pytest.skip(f"ChestX-ray14 v2020 label CSV not found at {CSV_2020}")
    return data.read_data_entry(CSV_2020)


@pytest.fixture(scope="module")
def split_lists():
    if not (DATA / "splits" / "train_list.txt").is_file():
        pytest.skip(f"CheXNet split lists not found under {DATA / 'splits'}")
    return data.load_split_lists(DATA / "splits")


@pytest.fixture(scope="module")
def six_images():
    """6 real PNG paths (one RGBA) and distinct one-hot label rows to trace them."""
    if not (DATA / "images" / RGBA_IMAGE).is_file():
        pytest.skip(f"ChestX-ray14 sample images not found under {DATA / 'images'}")
    found = data.find_images(DATA / "images")
    names = sorted(n for n in found if n != RGBA_IMAGE)[:5] + [RGBA_IMAGE]
    return data.resolve_paths(names, found), np.eye(14, dtype=np.float32)[:6]


# ----------------------------------------------------------------------- labels


def test_encode_findings():
    assert CLASS_NAMES[6:8] == ("Pneumonia", "Pneumothorax")
    assert len(CLASS_NAMES) == 14 and set(CHEXNET_PUBLISHED_AUROC) == set(CLASS_NAMES)
    assert np.mean(list(CHEXNET_PUBLISHED_AUROC.values())) == pytest.approx(0.841, abs=5e-4)
    assert encode_findings(NO_FINDING).tolist() == [0.0] * 14
    v = encode_findings("Cardiomegaly|Emphysema")
    assert v.dtype == np.float32 and v.sum() == 2 and v[col("Cardiomegaly")] == v[col("Emphysema")] == 1
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
    assert t.image_index[0] == "00000001_000.png" and t.patient_id[0] == 1 and t.patient_id[-1] == 30_805
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
    if not CSV_2017.is_file():
        pytest.skip(f"ChestX-ray14 label CSV not found at {CSV_2017}")
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
    assert {k: len(s) for k, s in split_lists.items()} == {"train": 78_468, "val": 11_219, "test": 22_433}
    data.check_patient_disjoint(split_lists)
    ids = [set(s.patient_ids.tolist()) for s in split_lists.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(i) for i in ids) == 30_805  # every patient, once
    assert split_lists["train"].names[0] == "00001522_000.png" and split_lists["train"].patient_ids[0] == 1522


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
    first_patient = data.Split("other", ["00000001_001.png"], np.zeros((1, 14), np.float32), np.array([1]))
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


# --------------------------------------------------------------------- pipeline


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


def test_missing_image_raises_before_pipeline(six_images, tmp_path):
    paths, labels = six_images
    absent = str(tmp_path / "00099999_000.png")
    with pytest.raises(DataError, match="00099999_000.png"):
        data.make_dataset(paths[:2] + [absent], labels[:3], image_size=32, batch_size=2, training=False)


def test_corrupt_png_skip_and_fail(six_images, tmp_path):
    paths, labels = six_images
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files = [paths[0], str(corrupt), paths[1]]
    ds, info = data.make_dataset(
        files, labels[:3], image_size=32, batch_size=8, training=False, on_corrupt="skip", with_info=True
    )
    assert info.skipped == (str(corrupt),) and info.num_examples == 2
    (x, y), *rest = list(ds)
    assert not rest and x.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(y.numpy(), labels[[0, 2]])  # the corrupt one's row is gone
    with pytest.raises(DataError, match=r"x\.png"):
        data.make_dataset(files, labels[:3], image_size=32, batch_size=8, training=False, on_corrupt="fail")


def test_unverified_corrupt_png(six_images, tmp_path):
    """verify=False: no pre-scan; TF fails on the file ("fail") or drops it ("skip")."""
    import tensorflow as tf

    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    files, labels = [str(corrupt), six_images[0][0]], six_images[1][:2]
    common = dict(image_size=32, batch_size=4, training=False, verify=False)
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(data.make_dataset(files, labels, on_corrupt="fail", **common))
    (x, y), = list(data.make_dataset(files, labels, on_corrupt="skip", **common))
    np.testing.assert_array_equal(y.numpy(), labels[1:])


def test_cache_gives_same_batches(six_images, tmp_path):
    paths, labels = six_images[0][:2], six_images[1][:2]
    common = dict(image_size=32, batch_size=2, training=False)
    plain = next(iter(data.make_dataset(paths, labels, **common)))[0].numpy()
    for cache in ("memory", str(tmp_path / "cache" / "eval")):
        ds = data.make_dataset(paths, labels, cache=cache, **common)
        for _ in range(2):  # a full pass fills the cache, the second reads it back
            (x, _), = list(ds)
            np.testing.assert_array_equal(x.numpy(), plain)
    assert any(p.name.endswith(".index") for p in (tmp_path / "cache").iterdir())


def test_training_batches(six_images):
    paths, labels = six_images
    ds = data.make_dataset(paths, labels, image_size=32, batch_size=4, training=True, shuffle_seed=7)
    batches = [(x.numpy(), y.numpy()) for x, y in ds.take(3)]  # repeats past the 6 images
    for x, y in batches:
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.shape == (4, 14)
        assert -2.2 < x.min() < x.max() < 2.7  # torch-normalised range
    seen = np.concatenate([y for _, y in batches])[:6]  # first epoch: each image once
    np.testing.assert_array_equal(seen.sum(0), labels.sum(0))
    again = next(iter(data.make_dataset(paths, labels, image_size=32, batch_size=4, training=True, shuffle_seed=7)))
    np.testing.assert_array_equal(again[0].numpy(), batches[0][0])  # reproducible


def test_eval_shards_cover_each_image_once(six_images):
    paths, labels = six_images
    rows = []
    for rank in range(3):
        ds = data.make_dataset(paths, labels, image_size=32, batch_size=4, training=False, rank=rank, size=3)
        for x, y in ds:
            assert x.shape[1:] == (32, 32, 3) and x.dtype == np.float32
            rows.append(y.numpy())
    rows = np.concatenate(rows)
    assert len(rows) == 6
    np.testing.assert_array_equal(rows.sum(0), labels.sum(0))  # one-hot rows: each exactly once


def test_eval_padding_balances_ranks(six_images):
    paths, labels = six_images
    total, counts = np.zeros(14), []
    for rank in range(4):
        ds, info = data.make_dataset(
            paths, labels, image_size=32, batch_size=4, training=False, rank=rank, size=4, pad=True, with_info=True
        )
        elements = [(y.numpy(), w.numpy()) for _, y, w in ds]
        counts.append(sum(len(w) for _, w in elements))
        total += sum((y * w[:, None]).sum(0) for y, w in elements)
        assert info.num_examples + info.num_padded == 2
    assert counts == [2, 2, 2, 2]
    np.testing.assert_array_equal(total, labels.sum(0))


def test_rgba_decodes_like_grayscale(six_images, tmp_path):
    from PIL import Image

    rgba = next(p for p in six_images[0] if p.endswith(RGBA_IMAGE))
    with Image.open(rgba) as image:
        assert image.mode == "RGBA"
        image.convert("L").save(tmp_path / "gray.png")
    ds = data.make_dataset(
        [rgba, str(tmp_path / "gray.png")], np.zeros((2, 14)), image_size=32, batch_size=2,
        training=False, preprocessing="none",
    )
    x = next(iter(ds))[0].numpy()
    np.testing.assert_array_equal(x[0], x[1])
    assert 0 <= x.min() and x.max() <= 255 and x.std() > 10  # a real picture, not blank


@pytest.mark.parametrize("mode,module", [("densenet121", "densenet"), ("resnet50", "resnet50"), ("vgg16", "vgg16")])
def test_preprocessing_matches_keras_applications(mode, module):
    import importlib

    keras_module = importlib.import_module(f"keras.applications.{module}")
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = keras_module.preprocess_input(x.copy())
    np.testing.assert_allclose(data.preprocess_images(x, mode).numpy(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        data.preprocess_images(x, "inception")
