"""ImageNet data: JPEG-folder -> TFRecord builder, TFRecord / TFDS / synthetic pipelines."""
import collections
import io
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds  # an install requirement: a broken install must fail here
from PIL import Image

from imagenet import build_tfrecords as bt
from imagenet import input_pipeline as ip
from tests.conftest import SHARED_DATA, python_cmd, run_cmd, shared_data

SHARED_IMAGENET = SHARED_DATA / "imagenet"
SYN_A, SYN_B = "n01440764", "n01443537"


# ---------------------------------------------------------------- helpers
def _save(path, image, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


def _rgb(h, w, color):
    return Image.new("RGB", (w, h), color)


def _write_synsets(path, synsets, with_names=True):
    lines = [f"{s} name_{i}" if with_names else s for i, s in enumerate(synsets)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _read(files):
    """Parsed tf.train.Examples of `files` as dicts of python values."""
    out = []
    for record in tf.data.TFRecordDataset(sorted(str(f) for f in files)).as_numpy_iterator():
        feats = tf.train.Example.FromString(record).features.feature
        out.append({k: (v.bytes_list.value[0] if v.bytes_list.value else v.int64_list.value[0])
                    for k, v in feats.items()})
    return out


def _eval_labels(data_dir, size, per_rank_batch=3):
    """Labels each rank sees in one evaluation pass."""
    per_rank = []
    for rank in range(size):
        ds = ip.tfrecord_dataset(data_dir, is_training=False, per_rank_batch=per_rank_batch,
                                 image_size=16, rank=rank, size=size)
        per_rank.append([int(v) for _, y in ds for v in y.numpy()])
    return per_rank


# ---------------------------------------------------------------- builder
def test_builder_reencodes_grayscale_cmyk_png_and_skips_broken(tmp_path):
    src = tmp_path / "in"
    _save(src / SYN_A / "rgb.JPEG", _rgb(30, 40, (10, 200, 30)))
    _save(src / SYN_A / "gray.JPEG", Image.new("L", (41, 31), 128))
    _save(src / SYN_A / "cmyk.JPEG", Image.new("CMYK", (42, 32), (0, 255, 255, 0)))  # red
    _save(src / SYN_B / "png.JPEG", Image.new("RGBA", (43, 33), (0, 0, 255, 255)), "PNG")
    _save(src / SYN_B / "rgb2.JPEG", _rgb(34, 44, (90, 90, 90)))
    (src / SYN_B / "garbage.JPEG").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    _rgb(64, 64, (1, 2, 3)).save(buf, "JPEG")
    (src / SYN_B / "truncated.JPEG").write_bytes(buf.getvalue()[:300])
    synsets = _write_synsets(tmp_path / "synsets.txt", [SYN_A, SYN_B])
    logs = []
    stats = bt.build(str(src), str(tmp_path / "out"), "train", synsets, num_shards=2,
                     log=logs.append)

    assert stats.counts == {"rgb_jpeg": 2, "grayscale": 1, "cmyk": 1, "png": 1, "other": 0,
                            "undecodable": 2}
    assert stats.num_records == 5
    assert sorted(os.listdir(tmp_path / "out")) == ["train-00000-of-00002",
                                                    "train-00001-of-00002"]  # no temp left
    warnings = [m for m in logs if m.startswith("warning: skipped")]
    assert len(warnings) == 2 and any("garbage.JPEG" in m for m in warnings)
    assert any("truncated.JPEG" in m for m in warnings)
    assert "grayscale 1, CMYK 1, PNG 1" in logs[-1]

    records = {r["image/filename"].decode(): r for r in _read(stats.output_files)}
    assert sorted(records) == ["cmyk.JPEG", "gray.JPEG", "png.JPEG", "rgb.JPEG", "rgb2.JPEG"]
    expected_color = {"rgb.JPEG": (10, 200, 30), "gray.JPEG": (128, 128, 128),
                      "cmyk.JPEG": (255, 0, 0), "png.JPEG": (0, 0, 255),
                      "rgb2.JPEG": (90, 90, 90)}
    for name, r in records.items():
        assert r["image/format"] == b"JPEG"
        assert r["image/encoded"][:2] == b"\xff\xd8", name  # real JPEG bytes, PNG included
        image = tf.io.decode_jpeg(r["image/encoded"], channels=0).numpy()  # keep stored channels
        assert image.shape == (r["image/height"], r["image/width"], 3), name
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), expected_color[name], atol=6,
                                   err_msg=name)
        synset = SYN_A if name in ("rgb.JPEG", "gray.JPEG", "cmyk.JPEG") else SYN_B
        assert r["image/class/synset"] == synset.encode()
        assert r["image/class/label"] == (1 if synset == SYN_A else 2)
    assert records["rgb.JPEG"]["image/encoded"] == (src / SYN_A / "rgb.JPEG").read_bytes()
    assert records["cmyk.JPEG"]["image/class/text"] == b"name_0"


def test_unknown_synset_folder_fails_before_writing(tmp_path):
    src = tmp_path / "in"
    _save(src / SYN_A / "a.JPEG", _rgb(8, 8, (1, 1, 1)))
    _save(src / "n99999999" / "b.JPEG", _rgb(8, 8, (1, 1, 1)))
    synsets = _write_synsets(tmp_path / "synsets.txt", [SYN_A, SYN_B])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown synset folder 'n99999999' in .*synsets\.txt"):
        bt.build(str(src), str(out), "train", synsets, num_shards=1, log=lambda m: None)
    assert not out.exists()

    # The command line turns it into one line on stderr and exit status 1.
    proc = run_cmd(python_cmd("-m", "imagenet.build_tfrecords", f"--input_dir={src}",
                              f"--output_dir={out}", "--split=train",
                              f"--synsets_file={synsets}", "--num_shards=1"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"build_tfrecords: error: unknown synset folder 'n99999999' in {src}: "
        f"not in {synsets}")
    assert not out.exists()


@pytest.mark.parametrize("content,match", [
    ("ILSVRC2012_val_00000001.JPEG 490\n", "is a number, not a synset"),
    ("n01440764\na b\n", "line 2: expected 1 field"),
    ("a b c\n", "expected 'synset' or 'filename synset'"),
])
def test_bad_validation_labels_file(tmp_path, content, match):
    path = tmp_path / "labels.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        bt.read_validation_labels(str(path))


@pytest.mark.slow  # worker processes
def test_build_shared_sample_in_parallel(tmp_path):
    shared_data(SHARED_IMAGENET / "images")
    synsets_file = shared_data(SHARED_IMAGENET / "synsets.txt")
    order = [line.split()[0] for line in synsets_file.read_text().splitlines() if line.strip()]
    files = sorted((SHARED_IMAGENET / "images").glob("*/*.JPEG"))
    # Independent count of what the builder must re-encode.
    modes = collections.Counter(Image.open(f).mode for f in files)
    logs = []
    stats = bt.build(str(SHARED_IMAGENET / "images"), str(tmp_path), "train",
                     str(synsets_file), num_shards=3, num_workers=2, log=logs.append)
    assert stats.num_records == len(files) == 42
    assert stats.counts["grayscale"] == modes["L"] and modes["L"] > 0
    assert stats.counts["rgb_jpeg"] == modes["RGB"]
    assert stats.counts["cmyk"] == stats.counts["png"] == stats.counts["undecodable"] == 0
    assert any("3/3 shards, 42/42 images" in m for m in logs)

    records = _read(stats.output_files)
    assert sorted(r["image/filename"].decode() for r in records) == sorted(f.name for f in files)
    for r in records:
        synset = r["image/class/synset"].decode()
        assert r["image/filename"].decode().startswith(synset)  # n01440764_tench.JPEG
        assert r["image/class/label"] == order.index(synset) + 1
    # Shuffled: the first shard is not just the alphabetically first synsets.
    first = _read(stats.output_files[:1])
    assert [r["image/class/synset"] for r in first] != sorted(r["image/class/synset"]
                                                              for r in first)
    # Reproducible: one worker instead of two gives byte-identical shards.
    again = bt.build(str(SHARED_IMAGENET / "images"), str(tmp_path / "again"), "train",
                     str(synsets_file), num_shards=3, num_workers=1, log=lambda m: None)
    for a, b in zip(stats.output_files, again.output_files):
        assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()


# ---------------------------------------------------------------- shared small data set
NUM_TRAIN = 20  # one training image per synset, so a label names its record
NUM_VAL = 10


@pytest.fixture(scope="module")
def small_imagenet(tmp_path_factory):
    """20 synsets; train: one image per synset folder, validation: 10 flat images; 3 shards each.

    Labels identify records: train image k has label k, validation image i (1-based) synset i.
    """
    root = tmp_path_factory.mktemp("small_imagenet")
    synsets = [f"n{i:08d}" for i in range(1, NUM_TRAIN + 1)]
    synsets_file = _write_synsets(root / "synsets.txt", synsets, with_names=False)
    rng = np.random.default_rng(0)
    for k, s in enumerate(synsets):
        h, w = (40, 40) if k % 2 else (30, 52)
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        _save(root / "train" / s / f"{s}_0.JPEG", Image.fromarray(pixels))
    val = root / "val_flat"
    for i in range(1, NUM_VAL + 1):
        _save(val / f"ILSVRC2012_val_{i:08d}.JPEG", _rgb(40, 40, (i * 20, 0, 0)))
    (root / "val_order.txt").write_text("".join(s + "\n" for s in synsets[:NUM_VAL]))
    (root / "val_pairs.txt").write_text("".join(
        f"ILSVRC2012_val_{i:08d}.JPEG {s}\n" for i, s in enumerate(synsets[:NUM_VAL], 1)))
    out = root / "records"
    quiet = dict(log=lambda m: None)
    bt.build(str(root / "train"), str(out), "train", synsets_file, num_shards=3, **quiet)
    bt.build(str(val), str(out), "validation", synsets_file, num_shards=3,
             validation_labels_file=str(root / "val_order.txt"), **quiet)
    bt.build(str(val), str(root / "records_pairs"), "validation", synsets_file, num_shards=1,
             validation_labels_file=str(root / "val_pairs.txt"), **quiet)
    return root


def test_both_validation_label_formats_agree(small_imagenet):
    order = _read(ip.list_files(str(small_imagenet / "records"), "validation"))
    pairs = _read(ip.list_files(str(small_imagenet / "records_pairs"), "validation"))
    as_map = lambda rs: {r["image/filename"]: r["image/class/label"] for r in rs}  # noqa: E731
    assert as_map(order) == as_map(pairs)
    assert as_map(order)[b"ILSVRC2012_val_00000007.JPEG"] == 7


def test_list_and_count_files(small_imagenet, tmp_path):
    files = ip.list_files(str(small_imagenet / "records"), "validation")
    assert [os.path.basename(f) for f in files] == [
        f"validation-{i:05d}-of-00003" for i in range(3)]
    assert ip.count_records(files) == 10
    assert ip.records_per_rank(files, 2) == [7, 3]  # files 0, 2 | file 1 (3 + 4 + 3 records)
    assert ip.records_per_rank(files, 4) == [3, 3, 2, 2]  # by record
    with pytest.raises(ValueError, match=f"no train-\\* TFRecord files in {tmp_path}"):
        ip.list_files(str(tmp_path), "train")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])  # 4, 5: fewer files (3) than ranks
def test_eval_reads_every_record_exactly_once(small_imagenet, size):
    per_rank = _eval_labels(str(small_imagenet / "records"), size)
    assert sorted(sum(per_rank, [])) == list(range(NUM_VAL))
    assert [len(p) for p in per_rank] == ip.records_per_rank(
        ip.list_files(str(small_imagenet / "records"), "validation"), size)


def test_eval_center_crop_and_normalisation():
    # 64x64: central 56x56 (= 224/256) red, a 4-pixel blue border that the crop removes.
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 2] = 255
    pixels[4:60, 4:60] = (255, 0, 0)
    encoded = tf.io.encode_jpeg(pixels, quality=100)
    out = ip.preprocess_jpeg(encoded, is_training=False, image_size=32)
    rgb = out.numpy() * np.array(ip.STDDEV_RGB) + np.array(ip.MEAN_RGB)
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(rgb[2:-2, 2:-2].reshape(-1, 3).mean(0), (255, 0, 0), atol=6)
    decoded = ip.preprocess_decoded(tf.io.decode_jpeg(encoded, channels=3), is_training=False,
                                    image_size=32)
    # Decoding only the window changes chroma upsampling at its edge: compare the inside.
    np.testing.assert_allclose(decoded.numpy()[1:-1, 1:-1], out.numpy()[1:-1, 1:-1], atol=0.05)


def test_training_crop_is_seeded_and_flip_happens():
    pixels = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (48, 1, 3))
    encoded = tf.io.encode_jpeg(pixels)
    crop = lambda s: ip.preprocess_jpeg(encoded, is_training=True, image_size=16,  # noqa: E731
                                        seed=tf.constant([s, 7], tf.int64)).numpy()
    np.testing.assert_array_equal(crop(1), crop(1))
    outs = [crop(s) for s in range(12)]
    assert len({o.tobytes() for o in outs}) > 1
    slopes = {np.sign(o[:, -1, 0].mean() - o[:, 0, 0].mean()) for o in outs}
    assert slopes == {-1.0, 1.0}  # the horizontal ramp appears both ways round


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_training_batches_per_rank(small_imagenet, dtype):
    data_dir = str(small_imagenet / "records")
    seen = []
    for rank in range(2):
        ds = ip.tfrecord_dataset(data_dir, is_training=True, per_rank_batch=4, image_size=24,
                                 rank=rank, size=2, dtype=dtype, shuffle_buffer=16, seed=3)
        labels = set()
        for images, y in ds.take(8):  # > one epoch of this rank's records: it repeats
            assert images.shape == (4, 24, 24, 3) and images.dtype == dtype
            assert y.dtype == tf.int32 and y.shape == (4,)
            assert np.isfinite(tf.cast(images, tf.float32).numpy()).all()
            labels.update(int(v) for v in y.numpy())
        assert labels <= set(range(1000))
        seen.append(labels)
    assert not seen[0] & seen[1]  # ranks train on disjoint files
    assert seen[0] | seen[1] == set(range(NUM_TRAIN))
    # Same seed, same batches.
    again = ip.tfrecord_dataset(data_dir, is_training=True, per_rank_batch=4, image_size=24,
                                rank=1, size=2, dtype=dtype, shuffle_buffer=16, seed=3)
    first = next(iter(ip.tfrecord_dataset(data_dir, is_training=True, per_rank_batch=4,
                                          image_size=24, rank=1, size=2, dtype=dtype,
                                          shuffle_buffer=16, seed=3)))
    a, b = first, next(iter(again))
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    np.testing.assert_array_equal(tf.cast(a[0], tf.float32).numpy(),
                                  tf.cast(b[0], tf.float32).numpy())


def test_training_record_sharding_when_fewer_files_than_ranks(small_imagenet):
    data_dir = str(small_imagenet / "records")  # 3 train files, 20 records
    seen = []
    for rank in range(4):
        ds = ip.tfrecord_dataset(data_dir, is_training=True, per_rank_batch=5, image_size=8,
                                 rank=rank, size=4, cache=True, seed=0)
        seen.append(collections.Counter(int(v) for _, y in ds.take(2) for v in y.numpy()))
    # 5 records per rank, cached, two batches = each record exactly twice; no overlap.
    assert all(sorted(c.values()) == [2] * 5 for c in seen)
    assert sum(seen, collections.Counter()) == collections.Counter(
        {k: 2 for k in range(NUM_TRAIN)})


def test_bad_rank_is_rejected(small_imagenet):
    with pytest.raises(ValueError, match="rank=2 size=2"):
        ip.tfrecord_dataset(str(small_imagenet / "records"), is_training=False,
                            per_rank_batch=2, image_size=8, rank=2, size=2)


# ---------------------------------------------------------------- synthetic
def test_synthetic_dataset_repeats_one_batch():
    ds = ip.synthetic_dataset(per_rank_batch=3, image_size=8, num_classes=5,
                              dtype=tf.bfloat16)
    (x1, y1), (x2, y2) = list(ds.take(2))
    assert x1.shape == (3, 8, 8, 3) and x1.dtype == tf.bfloat16 and y1.dtype == tf.int32
    assert set(y1.numpy()) <= set(range(5))
    np.testing.assert_array_equal(tf.cast(x1, tf.float32), tf.cast(x2, tf.float32))
    np.testing.assert_array_equal(y1, y2)


# ---------------------------------------------------------------- TFDS
def test_tfds_dataset_on_mock_data():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        train = ip.tfds_dataset("/nonexistent", is_training=True, per_rank_batch=4,
                                image_size=16, rank=0, size=1, dtype=tf.bfloat16, seed=1)
        x, y = next(iter(train))
        assert x.shape == (4, 16, 16, 3) and x.dtype == tf.bfloat16
        assert y.dtype == tf.int32 and set(y.numpy()) <= set(range(1000))
        evaluation = ip.tfds_dataset("/nonexistent", is_training=False, per_rank_batch=4,
                                     image_size=16, rank=0, size=1)
        assert [b[0].shape[0] for b in evaluation] == [4, 2]


def test_tfds_dataset_even_splits_cover_validation_once():
    # mock_data ignores sub-splits, so stand in for the reader: resolve the even split
    # with TFDS's own slicing against 10 examples whose label is their index.
    num = {"train": 12, "validation": 10}

    def as_dataset_fn(builder, split, decoders=None, read_config=None, shuffle_files=False,
                      **kwargs):
        infos = {k: tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0,
                                        filename_template=None) for k, v in num.items()}
        (inst,) = tfds.core.splits.AbstractSplit.from_spec(split).to_absolute(infos)
        stop = num[inst.splitname] if inst.to is None else inst.to
        labels = np.arange(inst.from_ or 0, stop, dtype=np.int64)
        return tf.data.Dataset.from_generator(
            lambda: ({"image": np.full((30 + 3 * i, 40 - i, 3), i, np.uint8), "label": i}
                     for i in labels),
            output_signature={"image": tf.TensorSpec([None, None, 3], tf.uint8),
                              "label": tf.TensorSpec([], tf.int64)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        for size in (1, 2, 3):
            labels = []
            for rank in range(size):
                ds = ip.tfds_dataset(None, is_training=False, per_rank_batch=4, image_size=8,
                                     rank=rank, size=size)
                labels += [int(v) for _, y in ds for v in y.numpy()]
            assert sorted(labels) == list(range(10)), size
