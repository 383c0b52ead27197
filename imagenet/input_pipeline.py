"""ImageNet input pipelines: TPU-style TFRecords, prepared TFDS `imagenet2012`, synthetic data.

All return per-rank batches of (image [B, S, S, 3] in `dtype`, label [B] int32 in 0..999;
1..1000 with `include_background_label`, the reference's 1001-class convention where 0 is
a background class no record uses), preprocessed as tensorflow/tpu's
resnet_preprocessing.py: training takes a random distorted-bounding-box crop (center-crop
fallback) and a random flip, evaluation a 224/256 center crop; both resize to `image_size`
(bicubic) and normalise by the ImageNet mean/stddev. Ranks read disjoint data; in
evaluation every record is read exactly once across all ranks (so ranks may get different
counts: the eval loop must pad and mask). `check_records` scans the head of every shard
before a run; `read_error` turns a bad record met mid-run into a `DataError`.
"""
import os
from collections.abc import Sequence

import tensorflow as tf

from hooks.errors import DataError
from hooks.state import data_order

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "validation")
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Eval center crop keeps 224/256 of the shorter side: the TPU's CROP_PADDING = 32 at 224 px,
# scaled with image_size so other resolutions crop the same fraction.
CROP_FRACTION = 224.0 / 256.0
RESIZE_METHOD = "bicubic"  # as the TPU reference (tf.image.resize_bicubic)
_READ_BUFFER_BYTES = 8 << 20
# Pre-training scan: records read from the head of every shard (cheap, catches empty,
# unreadable and wrongly built shards); a shard damaged further in fails when it is read.
SCAN_RECORDS = 4
REQUIRED_FEATURES = {"image/encoded": "bytes_list", "image/class/label": "int64_list"}
# After a read error mid-run, this rank's shards are read through to find the broken one
# when they hold at most this many bytes; above, the error lists them.
LOCATE_MAX_BYTES = 1 << 30


# ---------------------------------------------------------------- files
def list_files(data_dir: str, split: str) -> list[str]:
    """Sorted `<split>-*` TFRecord files in data_dir; ValueError when there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{split}-*")))
    if not files:
        raise ValueError(f"no {split}-* TFRecord files in {data_dir}")
    return files


def count_records(files: Sequence[str]) -> int:
    """Number of records in `files` (reads them all)."""
    if not files:
        return 0
    ds = tf.data.TFRecordDataset(list(files))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def shard_files(files: Sequence[str], rank: int, size: int) -> tuple[list[str], bool]:
    """Which files `rank` reads, and whether it must also shard by record.

    With at least `size` files, file i goes to rank i % size (cheap: each rank reads only
    its files). With fewer files than ranks, every rank reads all files in a fixed order
    and keeps records rank, rank + size, ... (dataset.shard). Either way the ranks'
    records are disjoint and together cover every record once.
    """
    _check_rank(rank, size)
    if len(files) >= size:
        return list(files[rank::size]), False
    return list(files), True


def records_per_rank(files: Sequence[str], size: int) -> list[int]:
    """Records each of `size` ranks gets from `files` under `shard_files` (for pad + mask)."""
    files = list(files)
    if len(files) >= size:
        return [count_records(files[r::size]) for r in range(size)]
    n = count_records(files)
    return [len(range(r, n, size)) for r in range(size)]


def rank_files(data_dir: str, split: str, rank: int, size: int) -> list[str]:
    """The `split` files that `rank` of `size` reads (see `shard_files`)."""
    return shard_files(list_files(data_dir, split), rank, size)[0]


def label_range(num_classes: int, include_background_label: bool) -> tuple[int, int]:
    """Smallest and largest `image/class/label` a record may hold: records number classes
    from 1; with the background convention (1001 classes) label 0 is the background."""
    return (0, num_classes - 1) if include_background_label else (1, num_classes)


def _check_example(path: str, index: int, record: bytes, labels: tuple[int, int],
                   num_classes: int) -> None:
    try:
        feature = tf.train.Example.FromString(record).features.feature
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise DataError(f"{path}: record {index} is not a tf.train.Example "
                        f"({type(err).__name__})") from None
    for key, kind in REQUIRED_FEATURES.items():
        if key not in feature or not getattr(feature[key], kind).value:
            raise DataError(f"{path}: record {index} has no {key} ({kind}); not a TPU-style "
                            "ImageNet TFRecord (build them with imagenet.build_tfrecords)")
    label = feature["image/class/label"].int64_list.value[0]
    if not labels[0] <= label <= labels[1]:
        raise DataError(f"{path}: record {index} has image/class/label {label}, outside "
                        f"{labels[0]}..{labels[1]} for --num_label_classes={num_classes}")


def check_records(files: Sequence[str], num_classes: int,
                  include_background_label: bool = False,
                  records_per_file: int | None = None) -> int:
    """Reads the first `records_per_file` (default SCAN_RECORDS) records of every file with
    tf.data and checks them; `DataError` naming the file for an empty or unreadable
    (truncated, corrupt, unpermitted) shard, a record without `image/encoded` or
    `image/class/label`, or a label outside `label_range`. Returns the records checked."""
    take = SCAN_RECORDS if records_per_file is None else records_per_file
    labels = label_range(num_classes, include_background_label)
    checked = 0
    for path in files:
        count = 0
        try:
            for count, record in enumerate(
                    tf.data.TFRecordDataset(path).take(take).as_numpy_iterator(), 1):
                _check_example(path, count - 1, record, labels, num_classes)
        except tf.errors.OpError as err:
            raise DataError(f"{path}: unreadable TFRecord shard after {count} record(s) "
                            f"({_first_line(err)})") from None
        if count == 0:
            raise DataError(f"{path}: empty TFRecord shard (no records)")
        checked += count
    return checked


def _first_line(err: Exception) -> str:
    text = getattr(err, "message", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _unreadable(path: str) -> bool:
    try:
        for _ in tf.data.TFRecordDataset(path):
            pass
    except tf.errors.OpError:
        return True
    return False


def read_error(err: Exception, files: Sequence[str], rank: int) -> DataError | None:
    """A `DataError` for a TensorFlow error that bad input raises mid-run (a corrupt or
    truncated record, an undecodable JPEG), naming the shard when it can be found by
    reading this rank's `files` through (only when they are small), else listing them.
    None for any other error (a bug: keep its traceback)."""
    text = _first_line(err)
    lowered = text.lower()
    if not (isinstance(err, tf.errors.DataLossError) or (
            isinstance(err, tf.errors.InvalidArgumentError)
            and any(k in lowered for k in ("jpeg", "image/", "example", "record")))):
        return None
    files = list(files)
    sizes = [os.path.getsize(f) for f in files if os.path.exists(f)]
    if isinstance(err, tf.errors.DataLossError) and sum(sizes) <= LOCATE_MAX_BYTES:
        broken = [f for f in files if _unreadable(f)]
        if broken:
            return DataError(f"rank {rank}: corrupt TFRecord shard {broken[0]} ({text})")
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return DataError(f"rank {rank}: bad input data ({text}) in one of this rank's "
                     f"{len(files)} file(s): {shown}")


def _check_rank(rank: int, size: int) -> None:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"need 0 <= rank < size, got rank={rank} size={size}")


# ---------------------------------------------------------------- preprocessing
def _center_crop_window(shape, image_size: int):
    """[y, x, h, w] of the central square keeping CROP_FRACTION of the shorter side."""
    del image_size  # the fraction is fixed; kept for the TPU-like signature
    height, width = shape[0], shape[1]
    crop = tf.cast(CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    crop = tf.maximum(crop, 1)
    return tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])


def _distorted_crop_window(shape, image_size: int, seed):
    """[y, x, h, w] of an Inception-style random crop; the center crop when sampling fails.

    sample_distorted_bounding_box returns the whole image after max_attempts failures;
    like the TPU code, a window equal to the whole image takes the center crop instead.
    """
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=bbox, seed=seed, min_object_covered=0.1,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    failed = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
    return tf.where(failed, _center_crop_window(shape, image_size), window)


def _finish(image, *, is_training: bool, image_size: int, seed):
    """Resize the crop, flip (training), normalise: float32 [image_size, image_size, 3]."""
    image = tf.image.resize([image], [image_size, image_size], method=RESIZE_METHOD)[0]
    if is_training:
        image = tf.image.stateless_random_flip_left_right(image, seed)
    image = (image - tf.constant(MEAN_RGB, tf.float32)) / tf.constant(STDDEV_RGB, tf.float32)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _split_seed(seed):
    if seed is None:
        return None, None
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    return seeds[0], seeds[1]


def preprocess_jpeg(image_bytes, *, is_training: bool, image_size: int, seed=None):
    """JPEG bytes -> normalised float32 [image_size, image_size, 3].

    Only the crop window is decoded (decode_and_crop_jpeg). `seed`: shape-[2] int tensor
    for the stateless random crop and flip; required when is_training.
    """
    shape = tf.image.extract_jpeg_shape(image_bytes)
    crop_seed, flip_seed = _split_seed(seed)
    if is_training:
        window = _distorted_crop_window(shape, image_size, crop_seed)
    else:
        window = _center_crop_window(shape, image_size)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    return _finish(image, is_training=is_training, image_size=image_size, seed=flip_seed)


def preprocess_decoded(image, *, is_training: bool, image_size: int, seed=None):
    """Decoded uint8 [H, W, 3] -> normalised float32 [image_size, image_size, 3].

    The same crops as preprocess_jpeg, applied to the decoded tensor (TFDS path).
    """
    shape = tf.shape(image)
    crop_seed, flip_seed = _split_seed(seed)
    if is_training:
        window = _distorted_crop_window(shape, image_size, crop_seed)
    else:
        window = _center_crop_window(shape, image_size)
    image = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])
    return _finish(image, is_training=is_training, image_size=image_size, seed=flip_seed)


# ---------------------------------------------------------------- datasets
def _check_args(per_rank_batch: int, image_size: int, rank: int, size: int) -> None:
    if per_rank_batch < 1:
        raise ValueError(f"per_rank_batch must be >= 1, got {per_rank_batch}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    _check_rank(rank, size)


def stream_key(seed: int | None, rank: int) -> int:
    """The int seed of `rank`'s training stream (ranks do not share orders or crops);
    seed=None: a random one (not reproducible)."""
    return data_order.resolve_seed(seed) * 1009 + rank


def _training_stream(epoch_records, *, shuffle_buffer: int, key: int, first_position: int,
                     epoch_size: int | None):
    """This rank's (record, augmentation seed) pairs from its `first_position`-th record
    on, forever.

    `epoch_records(epoch)` gives the records of one epoch; each epoch's blocks of
    `shuffle_buffer` records are permuted, keyed by (key, epoch), and each record gets an
    augmentation seed from (key, its position), so a run resumed at a position reads and
    augments what the uninterrupted run did (`hooks.state.data_order`); `key` is
    `stream_key(seed, rank)`. An epoch is `epoch_size` records (the shard's shuffled
    records, cycled if it holds fewer; None: all of them, and first_position must be 0),
    so positions never depend on how many records a shard really holds. The records
    before `first_position` in its epoch are skipped undecoded."""
    if epoch_size is None and first_position:
        raise ValueError("first_position needs epoch_size (the records of a rank's epoch)")

    def epoch(e):
        records = data_order.block_shuffle(epoch_records(e), shuffle_buffer, key, e)
        return records.repeat().take(epoch_size) if epoch_size else records

    first_epoch, offset = data_order.start(first_position, epoch_size or 1)
    ds = data_order.by_epoch(epoch, first_epoch)
    return data_order.with_position_seeds(ds, key, first_position - offset).skip(offset)


def _finalize(ds, *, per_rank_batch: int, drop_remainder: bool, deterministic: bool):
    """The tail shared by every source: batch, determinism, prefetch."""
    ds = ds.batch(per_rank_batch, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(AUTOTUNE)


def _record_reader(my_files: list[str], shard_records: bool, rank: int, size: int,
                   num_parallel_calls, deterministic: bool):
    """`read(names)`: this rank's records, from the file-name dataset `names` (files
    interleaved), or, when the rank shares files with others (`shard_records`), every
    size-th record of all its files in fixed order."""
    def read(names):
        if shard_records:
            # Fixed file order and sequential reads: record k must be the same on every rank.
            return tf.data.TFRecordDataset(my_files,
                                           buffer_size=_READ_BUFFER_BYTES).shard(size, rank)
        return names.interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES),
            cycle_length=min(len(my_files), 16), block_length=1,
            num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    return read


def _record_parser(is_training: bool, image_size: int, dtype,
                   include_background_label: bool):
    """`parse(record, seed_pair)`: (image as `dtype`, label) of one TFRecord."""
    features = {"image/encoded": tf.io.FixedLenFeature((), tf.string),
                "image/class/label": tf.io.FixedLenFeature((), tf.int64)}

    def parse(record, seed_pair=None):
        ex = tf.io.parse_single_example(record, features)
        image = preprocess_jpeg(ex["image/encoded"], is_training=is_training,
                                image_size=image_size, seed=seed_pair)
        label = tf.cast(ex["image/class/label"], tf.int32)  # records hold 1..1000
        if not include_background_label:
            label -= 1
        return tf.cast(image, dtype), label
    return parse


def tfrecord_dataset(data_dir: str, *, is_training: bool, per_rank_batch: int,
                     image_size: int, rank: int = 0, size: int = 1, dtype=tf.float32,
                     shuffle_buffer: int = 1024, seed: int | None = None,
                     cache: bool = False, num_parallel_calls=AUTOTUNE,
                     drop_remainder: bool | None = None,
                     include_background_label: bool = False,
                     first_position: int = 0, epoch_size: int | None = None
                     ) -> tf.data.Dataset:
    """Per-rank batches from TPU-style `train-*` / `validation-*` TFRecords in data_dir.

    Training: files shuffled per epoch, parallel interleaved reads, record shuffle, repeat
    forever, random crop + flip, drop_remainder (default). Evaluation: one pass, center
    crop, the last partial batch kept (default), every record read by exactly one rank.
    `seed` makes the order and augmentation reproducible, each epoch's keyed by (seed,
    epoch); `cache` keeps the raw records of this rank in memory after the first pass.
    `first_position` (training; a resumed or elastic restart): this rank starts at its
    record of that number in the stream of `epoch_size`-record epochs (see
    `_training_stream`), skipping the records before it in that epoch undecoded.
    Records hold labels 1..1000; they become 0..999, or stay 1..1000 with
    `include_background_label` (1001 classes, the reference's convention).
    """
    _check_args(per_rank_batch, image_size, rank, size)
    dtype = tf.as_dtype(dtype)
    files = list_files(data_dir, "train" if is_training else "validation")
    my_files, shard_records = shard_files(files, rank, size)
    deterministic = seed is not None or not is_training

    read = _record_reader(my_files, shard_records, rank, size, num_parallel_calls,
                          deterministic)
    parse = _record_parser(is_training, image_size, dtype, include_background_label)
    if not is_training:
        records = read(None) if shard_records else tf.data.TFRecordDataset(
            my_files, buffer_size=_READ_BUFFER_BYTES, num_parallel_reads=min(len(my_files), 8))
        ds = records.map(parse, num_parallel_calls=num_parallel_calls)
        return _finalize(ds, per_rank_batch=per_rank_batch,
                         drop_remainder=bool(drop_remainder), deterministic=True)
    key = stream_key(seed, rank)

    def names(epoch):  # this rank's files in the epoch's order
        return tf.data.Dataset.from_tensor_slices(
            data_order.shuffled(tf.constant(my_files), key + 1, epoch))
    if cache:  # one file order, read once; each epoch reshuffles the records
        cached = read(names(0)).cache()
        epoch_records = lambda epoch: cached  # noqa: E731
    else:
        epoch_records = lambda epoch: read(names(epoch))  # noqa: E731
    ds = _training_stream(epoch_records, shuffle_buffer=shuffle_buffer, key=key,
                          first_position=first_position, epoch_size=epoch_size)
    ds = ds.map(parse, num_parallel_calls=num_parallel_calls)
    return _finalize(ds, per_rank_batch=per_rank_batch,
                     drop_remainder=drop_remainder is None or drop_remainder,
                     deterministic=deterministic)


def tfds_dataset(tfds_data_dir: str | None, *, is_training: bool, per_rank_batch: int,
                 image_size: int, rank: int = 0, size: int = 1, dtype=tf.float32,
                 shuffle_buffer: int = 1024, seed: int | None = None,
                 num_parallel_calls=AUTOTUNE, drop_remainder: bool | None = None,
                 name: str = "imagenet2012", include_background_label: bool = False,
                 first_position: int = 0, epoch_size: int | None = None
                 ) -> tf.data.Dataset:
    """Per-rank batches from an already prepared TFDS `imagenet2012` (never downloads).

    Each rank reads tfds.even_splits(split, n=size)[rank]: disjoint, and together the
    whole split, so evaluation sees every example exactly once. Crops are taken on the
    decoded image; labels are already 0..999 (1..1000 with `include_background_label`).
    Training: `first_position` as `tfrecord_dataset`, but the order is TFDS's file shuffle
    and a shuffle buffer, reshuffled each pass and not keyed by epoch: a resumed run starts
    at the right position of its epoch and may read other examples there.
    """
    import tensorflow_datasets as tfds  # heavy; only this path needs it

    _check_args(per_rank_batch, image_size, rank, size)
    dtype = tf.as_dtype(dtype)
    split = tfds.even_splits("train" if is_training else "validation", n=size)[rank]
    try:
        ds = tfds.load(name, split=split, data_dir=tfds_data_dir, download=False,
                       shuffle_files=is_training,
                       read_config=tfds.ReadConfig(shuffle_seed=seed))
    except (AssertionError, FileNotFoundError) as e:
        raise ValueError(f"no prepared TFDS {name} in {tfds_data_dir}: {e}") from e
    deterministic = seed is not None or not is_training

    def parse(ex, seed_pair=None):
        image = preprocess_decoded(ex["image"], is_training=is_training,
                                   image_size=image_size, seed=seed_pair)
        label = tf.cast(ex["label"], tf.int32) + int(include_background_label)
        return tf.cast(image, dtype), label

    if is_training:  # decoded images of any size: a shuffle buffer, not keyed blocks
        key = stream_key(seed, rank)
        _, offset = data_order.start(first_position, epoch_size or max(1, int(ds.cardinality())))
        ds = ds.shuffle(shuffle_buffer, seed=key, reshuffle_each_iteration=True).repeat()
        ds = data_order.with_position_seeds(ds, key, first_position - offset).skip(offset)
    ds = ds.map(parse, num_parallel_calls=num_parallel_calls)
    return _finalize(ds, per_rank_batch=per_rank_batch,
                     drop_remainder=is_training if drop_remainder is None else drop_remainder,
                     deterministic=deterministic)


def synthetic_dataset(*, per_rank_batch: int, image_size: int, num_classes: int,
                      dtype=tf.float32, seed: int = 0) -> tf.data.Dataset:
    """One random batch (normal images, uniform labels) repeated forever, like TPU fake data.

    Generated once inside the pipeline and cached, so it measures the model, not the input.
    """
    _check_args(per_rank_batch, image_size, 0, 1)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    dtype = tf.as_dtype(dtype)

    def make(_):
        images = tf.random.stateless_truncated_normal(
            [per_rank_batch, image_size, image_size, 3], seed=[seed, 0])
        labels = tf.random.stateless_uniform([per_rank_batch], seed=[seed, 1], minval=0,
                                             maxval=num_classes, dtype=tf.int32)
        return tf.cast(images, dtype), labels

    return tf.data.Dataset.range(1).map(make).cache().repeat()
