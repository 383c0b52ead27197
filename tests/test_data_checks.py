"""Bad ImageNet data found before a run and named: empty, truncated, wrongly built shards,
labels out of range (1001-class convention included); the builder's label numbering and
its refusal to write an empty shard. In-process, on a few tiny records."""
import shutil

import pytest
import tensorflow as tf
from PIL import Image

from hooks.distributed.horovod_glue import Context
from hooks.errors import DataError
from imagenet import build_tfrecords as bt
from imagenet import input_pipeline as ip
from imagenet import train as imagenet_train
from imagenet.config import RunConfig

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture
def records(tiny_tfrecords):
    return tiny_tfrecords


def _copy(records, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(records, out)
    return out


def _example(**features):
    def feature(v):
        if isinstance(v, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    return tf.train.Example(features=tf.train.Features(
        feature={k.replace("__", "/"): feature(v) for k, v in features.items()}
    )).SerializeToString()


def _write(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def test_good_shards_pass_the_scan(records):
    files = ip.list_files(str(records), "train") + ip.list_files(str(records), "validation")
    # 9 images per split; 4 records read from the head of each of the 3 files
    assert ip.check_records(files, num_classes=3) == 4 + 4 + 4
    assert ip.check_records(files, num_classes=3, records_per_file=100) == 18


def test_truncated_shard_is_named(records, tmp_path):
    data = _copy(records, tmp_path)
    shard = data / "train-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:1500])  # inside the first or second record
    with pytest.raises(DataError, match=f"{shard}: unreadable TFRecord shard after . record"):
        ip.check_records(ip.list_files(str(data), "train"), num_classes=3)


def test_empty_shard_is_named_and_stops_the_run_before_any_work(records, tmp_path):
    data = _copy(records, tmp_path)
    (data / "validation-00000-of-00001").write_bytes(b"")
    config = RunConfig(data_dir=str(data), model_dir=str(tmp_path / "run"), train_steps=1,
                       num_label_classes=3, resnet_depth=18, image_size=32,
                       train_batch_size=2, eval_batch_size=2)
    with pytest.raises(DataError, match="validation-00000-of-00001: empty TFRecord shard"):
        imagenet_train.run(config, Context(), **QUIET)
    assert not (tmp_path / "run").exists()


def test_wrong_schema_is_named(tmp_path):
    path = tmp_path / "train-00000-of-00001"
    _write(path, [_example(image__raw=b"x", image__class__label=1)])
    with pytest.raises(DataError, match=f"{path}: record 0 has no image/encoded"):
        ip.check_records([str(path)], num_classes=10)
    _write(path, [_example(image__encoded=b"x", image__label=1)])
    with pytest.raises(DataError, match=f"{path}: record 0 has no image/class/label"):
        ip.check_records([str(path)], num_classes=10)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=f"{path}: unreadable TFRecord shard after 0 record"):
        ip.check_records([str(path)], num_classes=10)


def test_label_out_of_range_is_named_with_the_1001_convention(tmp_path):
    path = tmp_path / "validation-00000-of-00001"
    _write(path, [_example(image__encoded=b"x", image__class__label=label)
                  for label in (3, 1000, 0)])
    with pytest.raises(DataError, match=rf"{path}: record 0 has image/class/label 3, "
                       r"outside 1\.\.2 for --num_label_classes=2"):
        ip.check_records([str(path)], num_classes=2)
    # 1000 classes: records number them 1..1000, so the background label 0 is out of range.
    with pytest.raises(DataError, match=r"record 2 has image/class/label 0, outside 1\.\.1000"):
        ip.check_records([str(path)], num_classes=1000)
    # 1001 classes: 0 is the background class and 1000 the last one.
    assert ip.check_records([str(path)], num_classes=1001, include_background_label=True) == 3
    assert RunConfig(num_label_classes=1001).include_background_label
    assert not RunConfig(num_label_classes=1000).include_background_label


def _labels(data_dir, background):
    ds = ip.tfrecord_dataset(str(data_dir), is_training=False, per_rank_batch=4,
                             image_size=8, include_background_label=background)
    return [int(v) for _, y in ds for v in y.numpy()]


def test_background_convention_keeps_record_labels(records):
    raw = [tf.train.Example.FromString(r).features.feature["image/class/label"].int64_list
           .value[0] for r in tf.data.TFRecordDataset(
               ip.list_files(str(records), "validation")).as_numpy_iterator()]
    assert sorted(raw) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert _labels(records, background=True) == raw
    assert _labels(records, background=False) == [r - 1 for r in raw]


def test_corrupt_record_mid_run_names_the_shard(records, tmp_path):
    data = _copy(records, tmp_path)
    shard = data / "train-00000-of-00002"
    size = next(iter(tf.data.TFRecordDataset(str(shard)))).numpy().__len__() + 16
    shard.write_bytes(shard.read_bytes()[:size + 40])  # first record intact, then cut
    files = ip.list_files(str(data), "train")
    assert ip.check_records(files, num_classes=3, records_per_file=1) == 2
    ds = ip.tfrecord_dataset(str(data), is_training=True, per_rank_batch=2, image_size=8,
                             seed=0)
    with pytest.raises(tf.errors.DataLossError) as err:
        next(iter(ds))
    problem = ip.read_error(err.value, files, rank=1)
    assert str(problem).startswith(f"rank 1: corrupt TFRecord shard {shard} (")
    # Too big to read through: the error lists this rank's files instead.
    ip_limit, ip.LOCATE_MAX_BYTES = ip.LOCATE_MAX_BYTES, 0
    try:
        listed = str(ip.read_error(err.value, files, rank=0))
    finally:
        ip.LOCATE_MAX_BYTES = ip_limit
    assert "in one of this rank's 2 file(s): " + ", ".join(files) in listed
    assert ip.read_error(tf.errors.InvalidArgumentError(None, None, "shape mismatch"),
                         files, 0) is None  # not a data problem: keeps its traceback


# ---------------------------------------------------------------- builder
def test_builder_numbers_synsets_in_sorted_order(tmp_path):
    src = tmp_path / "in"
    for synset, value in (("n02000000", 200), ("n01000000", 100)):
        (src / synset).mkdir(parents=True)
        Image.new("RGB", (16, 16), (value, 0, 0)).save(src / synset / "a.JPEG")
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n02000000 second\nn01000000 first\n")  # not sorted
    logs = []
    stats = bt.build(str(src), str(tmp_path / "out"), "validation", str(synsets), 1,
                     log=logs.append)
    labels = {}
    for record in tf.data.TFRecordDataset(stats.output_files).as_numpy_iterator():
        feature = tf.train.Example.FromString(record).features.feature
        labels[feature["image/class/synset"].bytes_list.value[0].decode()] = (
            feature["image/class/label"].int64_list.value[0],
            feature["image/class/text"].bytes_list.value[0].decode())
    # imagenet_to_gcs.py: {synset: k + 1 for k, synset in enumerate(sorted(synsets))}
    assert labels == {"n01000000": (1, "first"), "n02000000": (2, "second")}
    assert any("not in sorted order" in line for line in logs)


def test_builder_refuses_to_write_an_empty_shard(tmp_path):
    src = tmp_path / "in" / "n01000000"
    src.mkdir(parents=True)
    (src / "broken.JPEG").write_bytes(b"not a jpeg")
    (src / "broken2.JPEG").write_bytes(b"\xff\xd8 nor this")
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n01000000\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"shard validation-00000-of-00001 would be empty: "
                       r"none of its 2 image\(s\) can be decoded"):
        bt.build(str(tmp_path / "in"), str(out), "validation", str(synsets), 1, **QUIET)
    assert list(out.iterdir()) == []  # no shard, no temporary file
    Image.new("RGB", (16, 16)).save(src / "good.JPEG")
    with pytest.raises(ValueError, match=r"validation: 3 images for 4 shards: shard "
                       r"validation-00003-of-00004 would be empty"):
        bt.build(str(tmp_path / "in"), str(out), "validation", str(synsets), 4, **QUIET)
    assert list(out.iterdir()) == []
