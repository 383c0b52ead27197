"""ChestX-ray14 tf.data input pipelines: per-rank training and (padded) evaluation
datasets, and the functions `evaluate` and `predict` share with them: `decode` (every
image read), `eval_image` + `preprocess_images` (= `network_input`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hooks.errors import DataError

log = logging.getLogger(__name__)

# keras.applications preprocess_input conventions, written as tensor math so they run
# inside tf.data on a batch (input: float RGB in 0..255). Which one a backbone gets is
# decided in one place: chexnet.model.preprocessing_for.
#   "torch": x/255, minus ImageNet mean, divided by std, per RGB channel (resnet_main's
#            own input, Keras DenseNet weights)
#   "caffe": RGB -> BGR, minus ImageNet mean in BGR, no scaling (Keras VGG16/ResNet50)
#   "tf":    x/127.5 - 1 (Inception, MobileNet)
#   "none":  0..255 floats unchanged (the model normalises itself)
PREPROCESSING = ("torch", "caffe", "tf", "none")
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_images(images, preprocessing: str = "torch"):
    """Normalise float RGB images in 0..255 (any leading shape, channels last) the way
    keras.applications ``preprocess_input`` does for ``preprocessing``."""
    import tensorflow as tf

    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}, expected one of "
                         f"{', '.join(PREPROCESSING)}")
    images = tf.cast(images, tf.float32)
    if preprocessing == "torch":
        return (images / 255.0 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
    if preprocessing == "caffe":
        return images[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR)
    if preprocessing == "tf":
        return images / 127.5 - 1.0
    return images


def cannot_open(path: str) -> str | None:
    """Why `path` cannot be opened for reading ("Permission denied", ...), None if it can.
    An unreadable file is a set-up error to report as such, never a corrupt image to drop."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    return None


def find_corrupt_images(paths: Sequence[str], workers: int = 8) -> list[int]:
    """Indices of files PIL cannot read. PNGs are checked with ``verify()`` (walks every
    chunk and its CRC without decompressing: about 1 ms per ChestX-ray14 image, so
    truncated or bit-flipped files are caught); other formats are fully decoded."""
    from PIL import Image

    def bad(path: str) -> bool:
        try:
            with Image.open(path) as image:
                if image.format == "PNG":
                    image.verify()
                else:
                    image.load()
            return False
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            return True

    if not paths:
        return []
    # Threads, not processes: the work is file reads and zlib CRCs, which drop the GIL.
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        flags = list(pool.map(bad, paths))
    return [i for i, is_bad in enumerate(flags) if is_bad]


VIEWS = ("whole", "crop")


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How images become network inputs (the same for every split of a run, and for
    `evaluate` and `predict` of its checkpoints: see `chexnet.model.input_options`).

    ``view="whole"`` (CheXNet): the whole image resized to image_size x image_size, a
    random horizontal flip the only training augmentation. ``view="crop"`` (ImageNet
    style): shorter side resized to image_size*256/224, random crop + flip in training,
    centre crop in evaluation (at 224 px that drops about 64 px of each 1024 px border).
    """

    image_size: int
    preprocessing: str = "torch"
    cache: str | None = None  # None, "memory", or a folder (chexnet.image_cache)
    on_corrupt: str = "fail"  # "fail": DataError naming the file; "skip": drop it
    verify: bool = True  # pre-scan the shard with PIL before anything is built
    view: str = "whole"

    @property
    def resize_to(self) -> int:
        return int(round(self.image_size * 256 / 224))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a pipeline holds on this rank."""

    num_examples: int  # real images this rank yields per pass
    num_padded: int  # padding entries (weight 0) this rank yields per pass
    skipped: tuple[str, ...]  # corrupt files dropped from this rank's shard


def decode(contents):
    """Encoded PNG/JPEG bytes -> uint8 [H, W, 3] RGB, as every pipeline and `predict` read
    images: grayscale -> RGB, RGBA -> RGB by dropping alpha (channels=3 does both inside
    the decoder), 16-bit PNGs -> their high byte (value >> 8), never clipped."""
    import tensorflow as tf

    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def resize(image, options: InputOptions):
    """uint8 [H, W, 3] -> the resized uint8 image that is cached: image_size x image_size
    ("whole") or shorter side ``resize_to`` ("crop"); antialiased (1024 px X-rays shrink
    4x or more)."""
    import tensorflow as tf

    if options.view == "whole":
        size = [options.image_size, options.image_size]
        return _to_uint8(tf.image.resize(image, size, method="bilinear", antialias=True))
    return resize_shorter_side(image, options.resize_to)


def _to_uint8(image):
    import tensorflow as tf

    # Back to uint8: 4x less memory in cache/shuffle/batch; normalised after batching.
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode_resize(path, options: InputOptions):
    """Read one image file, decode it (`decode`) and `resize` it."""
    import tensorflow as tf

    return resize(decode(tf.io.read_file(path)), options)


def resize_shorter_side(image, resize_to: int):
    """uint8 [H, W, 3] -> uint8 with the shorter side ``resize_to`` (antialiased)."""
    import tensorflow as tf

    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_to / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), resize_to)
    return _to_uint8(tf.image.resize(image, new_hw, method="bilinear", antialias=True))


def eval_image(image, options: InputOptions):
    """The evaluation view of a decoded uint8 RGB image (uint8 [size, size, 3]): `resize`,
    then the centre crop for view="crop". `predict` and `evaluate` go through it (and
    `network_input`), so a model sees the same input in evaluation and prediction."""
    import tensorflow as tf

    resized = resize(image, options)
    if options.view == "whole":
        return resized
    return tf.image.resize_with_crop_or_pad(resized, options.image_size, options.image_size)


def train_view(resized, options: InputOptions, seed):
    """The training view of a `resize`d image: random crop for view="crop", then a random
    horizontal flip (stateless, ``seed`` a [2] int tensor)."""
    import tensorflow as tf

    size_ = options.image_size
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if options.view == "crop":
        resized = tf.image.stateless_random_crop(resized, [size_, size_, 3], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(resized, seed=flip_seed)


def network_input(image, options: InputOptions):
    """What the network gets for a decoded image at evaluation: `eval_image` then
    `preprocess_images`. Returns (float32 input, uint8 view shown under Grad-CAM)."""
    view = eval_image(image, options)
    return preprocess_images(view, options.preprocessing), view


def _check_args(paths, labels, options: InputOptions, batch_size, rank, size) -> None:
    if labels.ndim != 2 or labels.shape[0] != len(paths):
        raise ValueError(f"labels must be [len(paths)={len(paths)}, classes], got shape "
                         f"{labels.shape}")
    if options.image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {options.image_size} "
                         f"and {batch_size}")
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"need 0 <= rank < size, got rank={rank} size={size}")
    if options.on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {options.on_corrupt!r}")
    if options.preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {options.preprocessing!r}, expected one of "
                         f"{', '.join(PREPROCESSING)}")
    if options.view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {options.view!r}")


def _shard(paths, labels, options: InputOptions, rank: int, size: int):
    """This rank's files (index % size == rank), their labels and a keep mask (False:
    corrupt and skipped). Missing files and, with on_corrupt="fail", undecodable ones
    raise DataError naming the first."""
    shard = np.arange(len(paths))[rank::size]
    shard_paths = [paths[i] for i in shard]
    missing = [p for p in shard_paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} image files missing, first: {missing[0]}")
    unreadable = [(p, why) for p in shard_paths if (why := cannot_open(p))]
    if unreadable:  # whatever --on_corrupt says: permissions are not corruption
        raise DataError(f"{len(unreadable)} image files cannot be read, first: "
                        f"{unreadable[0][0]} ({unreadable[0][1]}): check their permissions")
    keep = np.ones(len(shard), bool)
    if options.verify:
        bad = find_corrupt_images(shard_paths)
        if bad and options.on_corrupt == "fail":
            raise DataError(f"{len(bad)} images cannot be decoded, first: "
                            f"{shard_paths[bad[0]]} (--on_corrupt=skip drops them)")
        keep[bad] = False
        if bad:
            log.warning("rank %d: skipping %d corrupt images, first: %s", rank, len(bad),
                        shard_paths[bad[0]])
    return shard_paths, labels[shard], keep


def _cache(ds, options: InputOptions, name: str, entries, rank: int, size: int, **settings):
    """`ds` cached as `options.cache` says. On disk (`chexnet.image_cache`) the cache is
    keyed by `name`, the options that shape the images, the rank layout, `settings` and
    `entries` = (paths, labels, weights) of what `ds` yields, so it is never read back
    for other data (another split, changed files or labels)."""
    if options.cache is None:
        return ds
    if options.cache == "memory":
        return ds.cache()
    import tensorflow as tf

    from chexnet import image_cache

    key = image_cache.fingerprint(
        *entries, name=name, image_size=options.image_size, view=options.view,
        resize_to=options.resize_to, preprocessing=options.preprocessing, rank=rank,
        size=size, tensorflow=tf.__version__, **settings)
    slot = f"{name}-{options.image_size}px-{options.view}-rank{rank}-of-{size}"
    return ds.cache(image_cache.open_slot(options.cache, slot, key))


def _train_stream(shard_paths: list[str], shard_labels: np.ndarray, options: InputOptions,
                  key: int, rank: int, size: int, first_image: int, reshuffle: bool):
    """((image, label), position seed) pairs of this rank's training stream, from its
    `first_image`-th image on: each epoch's order keyed by (`key`, epoch), or epoch 0's
    order again without `reshuffle`; from the cache when `options.cache` is set."""
    import tensorflow as tf

    from hooks.state import data_order

    autotune = tf.data.AUTOTUNE

    def load(path, label):
        return decode_resize(path, options), label

    def order(epoch):  # reshuffle=False: every epoch in epoch 0's order
        return epoch if reshuffle else 0

    n = len(shard_paths)
    first_epoch, offset = data_order.start(first_image, n)
    if options.cache is not None:  # one fixed order cached; each epoch reshuffles it
        fixed = np.random.default_rng(key).permutation(n)
        entries = (np.asarray(shard_paths)[fixed], shard_labels[fixed], np.ones(n))
        decoded = tf.data.Dataset.from_tensor_slices(entries[:2]).map(
            load, num_parallel_calls=autotune)
        # the key holds the entries in their cached order (this seed's permutation)
        cached = _cache(decoded, options, "train", entries, rank, size, seed=key)
        ds = data_order.by_epoch(lambda e: data_order.block_shuffle(
            cached, min(n, 2048), key, order(e)), first_epoch)
        return data_order.with_position_seeds(ds, key, first_epoch * n).skip(offset)
    # the files to read in each epoch's order; skipped ones are never decoded
    table = (tf.constant(shard_paths), tf.constant(shard_labels))
    ds = data_order.by_epoch(lambda e: tf.data.Dataset.from_tensor_slices(
        data_order.permutation(n, key, order(e))), first_epoch)
    ds = data_order.with_position_seeds(ds, key, first_epoch * n).skip(offset)
    return ds.map(lambda i, pair_seed: (load(tf.gather(table[0], i), tf.gather(table[1], i)),
                                        pair_seed), num_parallel_calls=autotune)


def train_dataset(paths: Sequence[str], labels: np.ndarray, options: InputOptions, *,
                  batch_size: int, rank: int = 0, size: int = 1, seed: int = 0,
                  first_step: int = 0, reshuffle: bool = True):
    """This rank's training pipeline of (image float32 [b, s, s, 3], labels float32
    [b, K]) batches, repeated forever (drive it with steps), and its `DatasetInfo`.

    Sharding is by file (index % size == rank), so ranks hold disjoint images. Full
    shuffle of the shard (reseeded per epoch), `resize`, `train_view` (flip; random crop
    for view="crop"; stateless, seeded by `seed` and rank), batches of `batch_size` (per
    rank) with drop_remainder. With `options.cache` the resized uint8 images are cached
    before the random view (on disk: keyed by the shard's files, labels and `seed`, see
    `_cache`); the cached order is one fixed shuffle, reshuffled each epoch through
    blocks of 2048 images. Each epoch's order is keyed by (seed, rank, epoch) and
    each image's view by its position in the stream (`hooks.state.data_order`), so any iterator
    of the pipeline yields the same batches.
    `first_step` (a resumed or elastic restart): the stream starts where `first_step`
    batches of this rank end, skipping the images before it in that epoch (undecoded
    unless cached): the batches are those the uninterrupted run read from that step on.
    `reshuffle=False`: every epoch in the first epoch's order.
    """
    import tensorflow as tf


    paths, labels = [os.fspath(p) for p in paths], np.asarray(labels, np.float32)
    _check_args(paths, labels, options, batch_size, rank, size)
    shard_paths, shard_labels, keep = _shard(paths, labels, options, rank, size)
    skipped = tuple(p for p, k in zip(shard_paths, keep) if not k)
    shard_paths = [p for p, k in zip(shard_paths, keep) if k]
    shard_labels = shard_labels[keep]
    if not shard_paths:
        raise DataError(f"rank {rank} of {size} has no training images ({len(paths)} in all)")
    key = int(seed) * 100_003 + rank  # distinct, reproducible stream per rank
    autotune = tf.data.AUTOTUNE

    def augment(pair, pair_seed):
        image, label = pair
        return train_view(image, options, pair_seed), label

    ds = _train_stream(shard_paths, shard_labels, options, key, rank, size,
                       first_step * batch_size, reshuffle)
    if options.on_corrupt == "skip":
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.map(augment, num_parallel_calls=autotune)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda x, y: (preprocess_images(x, options.preprocessing), y),
                num_parallel_calls=autotune)
    info = DatasetInfo(num_examples=len(shard_paths), num_padded=0, skipped=skipped)
    return ds.prefetch(autotune), info


def eval_dataset(paths: Sequence[str], labels: np.ndarray, options: InputOptions, *,
                 batch_size: int, rank: int = 0, size: int = 1, split: str | None = None):
    """This rank's evaluation pipeline of (image, labels, weight) batches, one pass in
    file order, and its `DatasetInfo`.

    Every rank's shard is padded to ceil(N/size) entries; padding and skipped corrupt
    images keep their slot with weight 0 and a blank image, so all ranks run the same
    number of batches and weighted metrics count each image exactly once. Rank r holds
    original indices r, r + size, ... (see `chexnet.evaluate.gather`). `split` (val, test,
    ...) goes into the name of the on-disk cache's folder (`_cache`).
    """
    import tensorflow as tf

    paths, labels = [os.fspath(p) for p in paths], np.asarray(labels, np.float32)
    _check_args(paths, labels, options, batch_size, rank, size)
    shard_paths, shard_labels, keep = _shard(paths, labels, options, rank, size)
    extra = -(-len(paths) // size) - len(shard_paths)
    slots = [p if k else "" for p, k in zip(shard_paths, keep)] + [""] * extra
    slot_labels = np.concatenate([shard_labels, np.zeros((extra, labels.shape[1]), np.float32)])
    weights = np.concatenate([keep.astype(np.float32), np.zeros(extra, np.float32)])
    blank = tf.zeros([options.image_size, options.image_size, 3], tf.uint8)

    def load(path, label, weight):
        image = tf.cond(weight > 0, lambda: eval_image(decode(tf.io.read_file(path)), options),
                        lambda: blank)
        image.set_shape([options.image_size, options.image_size, 3])
        return image, label, weight

    ds = tf.data.Dataset.from_tensor_slices((slots, slot_labels, weights))
    ds = _cache(ds.map(load, num_parallel_calls=tf.data.AUTOTUNE), options,
                "eval-" + split if split else "eval",
                (slots, slot_labels, weights), rank, size)
    ds = ds.batch(batch_size, drop_remainder=False).map(
        lambda x, y, w: (preprocess_images(x, options.preprocessing), y, w),
        num_parallel_calls=tf.data.AUTOTUNE)
    info = DatasetInfo(num_examples=int(keep.sum()), num_padded=extra,
                       skipped=tuple(p for p, k in zip(shard_paths, keep) if not k))
    return ds.prefetch(tf.data.AUTOTUNE), info
