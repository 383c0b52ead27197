"""ChestX-ray14 data layer: the NIH label CSV, image discovery, patient-wise splits,
class weights, and the per-rank tf.data input pipeline.

Everything up to ``class_weights`` is plain Python/numpy (no TensorFlow import), so
split tools and reports start fast; TensorFlow is imported only when a pipeline is built.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chexnet.labels import CLASS_NAMES, NUM_CLASSES, encode_findings

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = ("train", "val", "test")


class DataError(ValueError):
    """A problem with the user's data files (message names the file and what is wrong)."""


# --------------------------------------------------------------------------- CSV


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class Table:
    """Data_Entry_2017.csv as columns; row i of every field describes image_index[i]."""

    image_index: list[str]
    patient_id: np.ndarray  # int64 [N]
    labels: np.ndarray  # float32 [N, 14], columns in CLASS_NAMES order
    age: np.ndarray  # int64 [N], years (-1 where the CSV has no age column)
    gender: np.ndarray  # str [N], "M"/"F" ("" where absent)
    view_position: np.ndarray  # str [N], "PA"/"AP" ("" where absent)

    def __len__(self) -> int:
        return len(self.image_index)


def _open_text(path: str):
    """Open plain or gzipped text; gzip is recognised by its magic bytes, not the name."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    # utf-8-sig: tolerate a BOM left by spreadsheet programs.
    return open(path, encoding="utf-8-sig", newline="")


_AGE_RE = re.compile(r"^(\d+)\s*([YMD]?)$", re.IGNORECASE)
# The 2017 CSV writes ages as "058Y"; a few infants are in months ("006M") or days.
_AGE_UNIT_DAYS = {"": 365, "Y": 365, "M": 30, "D": 1}


def _parse_age(text: str) -> int | None:
    match = _AGE_RE.match(text.strip())
    if match is None:
        return None
    value, unit = int(match.group(1)), match.group(2).upper()
    if unit in ("", "Y"):
        return value
    return value * _AGE_UNIT_DAYS[unit] // 365


def read_data_entry(path: PathLike) -> Table:
    """Read Data_Entry_2017.csv (2017 release or v2020 revision, plain or gzipped).

    The 2017 header ends with a comma (12 header fields for 11 data fields) and ages
    are strings like "058Y"; v2020 has 11 fields and integer ages. Columns are found
    by header name, so both parse the same way. Raises DataError for a missing
    required column, a short row, a bad age/patient id or an unknown finding label.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"label CSV not found: {path}")
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file, expected a Data_Entry_2017.csv header")
        column = {name.strip(): i for i, name in enumerate(header) if name.strip()}
        for name in REQUIRED_COLUMNS:
            if name not in column:
                raise DataError(f"{path}: no {name!r} column in the header (is this Data_Entry_2017.csv?)")
        i_name, i_find, i_pid = (column[c] for c in REQUIRED_COLUMNS)
        i_age, i_sex, i_view = (column.get(c) for c in ("Patient Age", "Patient Gender", "View Position"))
        n_needed = 1 + max(i for i in (i_name, i_find, i_pid, i_age, i_sex, i_view) if i is not None)

        names, pids, label_rows, ages, sexes, views = [], [], [], [], [], []
        encoded: dict[str, np.ndarray] = {}  # only ~800 distinct findings strings
        seen: set[str] = set()
        for line_no, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < n_needed:
                raise DataError(f"{path}:{line_no}: {len(row)} fields, expected at least {n_needed}")
            name = row[i_name].strip()
            if name in seen:
                raise DataError(f"{path}:{line_no}: duplicate Image Index {name!r}")
            seen.add(name)
            findings = row[i_find]
            vector = encoded.get(findings)
            if vector is None:
                try:
                    vector = encode_findings(findings)
                except ValueError as err:
                    raise DataError(f"{path}:{line_no}: {err}") from None
                encoded[findings] = vector
            try:
                pid = int(row[i_pid])
            except ValueError:
                raise DataError(f"{path}:{line_no}: Patient ID {row[i_pid]!r} is not an integer") from None
            if i_age is None:
                age = -1
            else:
                age = _parse_age(row[i_age])
                if age is None:
                    raise DataError(f"{path}:{line_no}: Patient Age {row[i_age]!r} is not like 58 or 058Y")
            names.append(name)
            pids.append(pid)
            label_rows.append(vector)
            ages.append(age)
            sexes.append(row[i_sex].strip() if i_sex is not None else "")
            views.append(row[i_view].strip() if i_view is not None else "")
    if not names:
        raise DataError(f"{path}: header only, no image rows")
    return Table(
        image_index=names,
        patient_id=np.asarray(pids, np.int64),
        labels=np.stack(label_rows).astype(np.float32),
        age=np.asarray(ages, np.int64),
        gender=np.asarray(sexes, dtype=str),
        view_position=np.asarray(views, dtype=str),
    )


# ------------------------------------------------------------------------ images


def find_images(image_dir: PathLike) -> dict[str, str]:
    """Map image file name -> path, for one flat folder or the NIH download layout
    (``images_001/images/*.png`` ... ``images_012/images/*.png``), or both."""
    root = os.fspath(image_dir)
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    folders = [root]
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and entry.name.startswith("images_"):
            inner = os.path.join(entry.path, "images")
            folders.append(inner if os.path.isdir(inner) else entry.path)
    found: dict[str, str] = {}
    for folder in folders:
        for entry in os.scandir(folder):
            if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                if entry.name in found:
                    raise DataError(f"image {entry.name} found twice: {found[entry.name]} and {entry.path}")
                found[entry.name] = entry.path
    if not found:
        raise DataError(f"{root}: no .png/.jpg images, neither in the folder nor in images_*/images/")
    return found


def resolve_paths(names: Iterable[str], images: Mapping[str, str]) -> list[str]:
    """Paths for image names (as in a Split) from ``find_images``; DataError names the missing."""
    names = list(names)
    missing = [n for n in names if n not in images]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(names)} images not in the image folder, first: {missing[0]}"
        )
    return [images[n] for n in names]


def patient_id_from_name(name: str) -> int:
    """Patient id from an NIH file name: ``00000001_000.png`` -> 1."""
    stem = os.path.basename(name).split("_", 1)[0]
    if not stem.isdigit():
        raise DataError(f"cannot read a patient id from image name {name!r} (expected like 00000001_000.png)")
    return int(stem)


# ------------------------------------------------------------------------ splits


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One fold: image names, their [N, 14] labels and patient ids, row-aligned."""

    name: str
    names: list[str]
    labels: np.ndarray
    patient_ids: np.ndarray

    def __post_init__(self):
        if not (len(self.names) == len(self.labels) == len(self.patient_ids)):
            raise ValueError(
                f"split {self.name!r}: {len(self.names)} names, {len(self.labels)} label rows, "
                f"{len(self.patient_ids)} patient ids"
            )

    def __len__(self) -> int:
        return len(self.names)


def _table_split(table: Table, name: str, rows: np.ndarray) -> Split:
    return Split(
        name=name,
        names=[table.image_index[i] for i in rows],
        labels=table.labels[rows],
        patient_ids=table.patient_id[rows],
    )


def _assign_patients(patient_ids: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Fold index per row such that each patient lands in exactly one fold.

    Patients are shuffled (rng seeded by ``seed``, over the sorted unique ids, so the
    result does not depend on row order) and laid end to end by image count; a patient
    goes to the fold whose image-fraction interval holds the middle of its images. So
    the folds match ``fractions`` in images, not in patients.
    """
    fractions = np.asarray(fractions, np.float64)
    if fractions.ndim != 1 or np.any(fractions < 0) or not math.isclose(fractions.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    patients, inverse, counts = np.unique(patient_ids, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(patients))
    end = np.cumsum(counts[order])
    middle = end - counts[order] / 2.0
    bounds = np.cumsum(fractions)[:-1] * len(patient_ids)
    fold_of_patient = np.empty(len(patients), np.int64)
    fold_of_patient[order] = np.searchsorted(bounds, middle, side="right")
    return fold_of_patient[inverse]


def split_by_patient(
    table: Table,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    names: Sequence[str] = SPLIT_NAMES,
) -> dict[str, Split]:
    """Deterministic patient-wise split of ``table`` into folds named ``names``
    holding about ``fractions`` of the images each."""
    if len(names) != len(fractions):
        raise ValueError(f"{len(names)} split names for {len(fractions)} fractions")
    fold = _assign_patients(table.patient_id, fractions, seed)
    return {name: _table_split(table, name, np.flatnonzero(fold == k)) for k, name in enumerate(names)}


def read_name_list(path: PathLike) -> list[str]:
    """File names from an official NIH list (one per line; extra columns are ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"split list not found: {path}")
    with _open_text(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def split_official(
    table: Table,
    train_val_list: PathLike,
    test_list: PathLike,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Split]:
    """The official NIH split (train_val_list.txt / test_list.txt), with a patient-wise
    validation fold holding about ``val_fraction`` of the train_val images."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    row_of = {name: i for i, name in enumerate(table.image_index)}

    def rows(list_path: PathLike) -> np.ndarray:
        names = read_name_list(list_path)
        missing = [n for n in names if n not in row_of]
        if missing:
            raise DataError(f"{os.fspath(list_path)}: {len(missing)} names not in the label CSV, first: {missing[0]}")
        return np.asarray([row_of[n] for n in names], np.int64)

    train_val, test = rows(train_val_list), rows(test_list)
    both = np.intersect1d(train_val, test)
    if len(both):
        raise DataError(
            f"{len(both)} images are in both {os.fspath(train_val_list)} and {os.fspath(test_list)}, "
            f"first: {table.image_index[both[0]]}"
        )
    fold = _assign_patients(table.patient_id[train_val], (1.0 - val_fraction, val_fraction), seed)
    splits = {
        "train": _table_split(table, "train", train_val[fold == 0]),
        "val": _table_split(table, "val", train_val[fold == 1]),
        "test": _table_split(table, "test", test),
    }
    check_patient_disjoint(splits)
    return splits


def read_split_list(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Read a CheXNet re-implementation list: per line a file name and 14 0/1 labels
    in CLASS_NAMES order. Returns (names, float32 [N, 14])."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"split list not found: {path}")
    names, rows = [], []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 1 + NUM_CLASSES or not set(parts[1:]) <= {"0", "1"}:
                raise DataError(
                    f"{path}:{line_no}: expected a file name and {NUM_CLASSES} labels 0/1, got {line.strip()[:80]!r}"
                )
            names.append(parts[0])
            rows.append(parts[1:])
    if not names:
        raise DataError(f"{path}: no entries")
    return names, np.asarray(rows, dtype=np.float32)


def load_split_lists(split_dir: PathLike, names: Sequence[str] = SPLIT_NAMES) -> dict[str, Split]:
    """Read ``{name}_list.txt`` for each name in ``split_dir`` (the CheXNet 70/10/20
    split); patient ids come from the file names. Checks the folds are patient-disjoint."""
    splits = {}
    for name in names:
        image_names, labels = read_split_list(os.path.join(os.fspath(split_dir), f"{name}_list.txt"))
        pids = np.asarray([patient_id_from_name(n) for n in image_names], np.int64)
        splits[name] = Split(name=name, names=image_names, labels=labels, patient_ids=pids)
    check_patient_disjoint(splits)
    return splits


def _as_list(splits: Mapping[str, Split] | Iterable[Split]) -> list[Split]:
    return list(splits.values()) if isinstance(splits, Mapping) else list(splits)


def check_patient_disjoint(splits: Mapping[str, Split] | Iterable[Split]) -> None:
    """Raise DataError if any patient has images in two splits (a leak)."""
    folds = _as_list(splits)
    for a in range(len(folds)):
        for b in range(a + 1, len(folds)):
            shared = np.intersect1d(folds[a].patient_ids, folds[b].patient_ids)
            if len(shared):
                raise DataError(
                    f"patient leak: {len(shared)} patients in both {folds[a].name!r} and {folds[b].name!r}, "
                    f"e.g. {shared[:5].tolist()}"
                )


def split_summary(splits: Mapping[str, Split] | Iterable[Split]) -> str:
    """A text table: images, patients and per-class positives (prevalence) per split."""
    folds = _as_list(splits)
    width = 18
    lines = ["".ljust(20) + "".join(s.name.rjust(width) for s in folds)]
    lines.append("images".ljust(20) + "".join(f"{len(s):,}".rjust(width) for s in folds))
    lines.append("patients".ljust(20) + "".join(f"{len(np.unique(s.patient_ids)):,}".rjust(width) for s in folds))
    for k, cls in enumerate(CLASS_NAMES):
        cells = []
        for s in folds:
            positives = int(s.labels[:, k].sum())
            share = 100.0 * positives / max(len(s), 1)
            cells.append(f"{positives:,} ({share:5.2f}%)".rjust(width))
        lines.append(cls.ljust(20) + "".join(cells))
    return "\n".join(lines)


def class_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class weights for the weighted BCE: w+ = N/(P+N), w- = P/(P+N), with P and N
    the positives and negatives of each class in ``labels`` (the training split)."""
    labels = np.asarray(labels, np.float64)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"labels must be a non-empty [N, classes] matrix, got shape {labels.shape}")
    if not np.all((labels >= 0) & (labels <= 1)):
        raise ValueError("labels must lie in [0, 1]")
    positives = labels.sum(axis=0)
    total = labels.shape[0]  # P + N for every class
    negatives = total - positives
    return (negatives / total).astype(np.float32), (positives / total).astype(np.float32)


# ---------------------------------------------------------------------- pipeline

# keras.applications preprocess_input conventions, written as tensor math so they run
# inside tf.data on a batch (input: float RGB in 0..255):
#   "torch" (DenseNet):          x/255, minus ImageNet mean, divided by std, per RGB channel
#   "caffe" (ResNet50, VGG16):   RGB -> BGR, minus ImageNet mean in BGR, no scaling
#   "tf" (Inception, MobileNet): x/127.5 - 1
#   "imagenet":                  same math as "torch" (mean/std normalisation, RGB)
#   "none":                      0..255 floats unchanged (the model normalises itself)
# Backbone names map to their mode, so callers can pass the model name.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_PREPROCESSING_ALIASES = {
    "imagenet": "torch",
    "densenet121": "torch",
    "densenet": "torch",
    "resnet50": "caffe",
    "resnet": "caffe",
    "vgg16": "caffe",
    "vgg": "caffe",
}
PREPROCESSING_MODES = ("torch", "caffe", "tf", "none", *_PREPROCESSING_ALIASES)


def _preprocessing_mode(name: str) -> str:
    key = name.lower()
    mode = _PREPROCESSING_ALIASES.get(key, key)
    if mode not in ("torch", "caffe", "tf", "none"):
        raise ValueError(f"unknown preprocessing {name!r}, expected one of {', '.join(PREPROCESSING_MODES)}")
    return mode


def preprocess_images(images, preprocessing: str = "imagenet"):
    """Normalise float RGB images in 0..255 (any leading shape, channels last) the way
    keras.applications ``preprocess_input`` does for ``preprocessing``."""
    import tensorflow as tf

    mode = _preprocessing_mode(preprocessing)
    images = tf.cast(images, tf.float32)
    if mode == "torch":
        return (images / 255.0 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
    if mode == "caffe":
        return images[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR)
    if mode == "tf":
        return images / 127.5 - 1.0
    return images


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


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``make_dataset(..., with_info=True)`` built on this rank."""

    num_examples: int  # real images this rank yields per pass
    num_padded: int  # padding entries (weight 0) this rank yields per pass
    skipped: tuple[str, ...]  # corrupt files dropped from this rank's shard
    rank: int
    size: int


def _decode_resize(path, resize_to: int):
    """Read one image file, decode PNG/JPEG to RGB uint8 (grayscale -> RGB, RGBA -> RGB
    by dropping alpha: channels=3 does both inside the decoder), and resize its shorter
    side to ``resize_to`` (antialiased: the 1024 px X-rays shrink about 4x)."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize_to / tf.reduce_min(hw)
    new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), resize_to)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    # Back to uint8: 4x less memory in cache/shuffle/batch; normalised after batching.
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def make_dataset(
    paths: Sequence[PathLike],
    labels: np.ndarray,
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    rank: int = 0,
    size: int = 1,
    shuffle_seed: int = 0,
    preprocessing: str = "imagenet",
    cache: str | None = None,
    on_corrupt: str = "fail",
    verify: bool = True,
    pad: bool = False,
    with_info: bool = False,
):
    """Per-rank tf.data pipeline of (image float32 [b, s, s, 3], labels float32 [b, K]).

    Sharding is element-wise on the file list (index % size == rank), so the ranks hold
    disjoint images and together every image exactly once. ``batch_size`` is per rank.

    training=True: full shuffle of the shard's files (reseeded per epoch), repeat
      forever (drive it with steps_per_epoch), resize the shorter side to
      image_size*256/224, random crop image_size + random horizontal flip (stateless,
      seeded by shuffle_seed and rank), batches with drop_remainder.
    training=False: one pass in file order, resize then center crop, last batch partial.
      pad=True pads every rank's shard to ceil(N/size) entries and yields a third
      element, a float32 weight (1 real, 0 padding or skipped), so all ranks run the
      same number of batches and masked metrics count each image exactly once.

    Missing files raise DataError before anything is built (each rank checks its own
    shard). With verify=True (default) the shard is pre-scanned with PIL
    (``find_corrupt_images``): on_corrupt="fail" raises DataError naming the files,
    "skip" drops them (padding slots when pad=True), logs a warning and reports them in
    ``DatasetInfo.skipped``. A file that passes the scan but does not decode, or any
    bad file when verify=False, raises a TF error inside the pipeline in "fail" mode
    (without the name) and is dropped uncounted by ``ignore_errors`` in "skip" mode.

    cache: None, "memory", or a file prefix (rank, size, mode and size are appended;
    delete the files when the data changes). Training caches the resized uint8 images
    before cropping (about 3*(s*256/224)**2 bytes per image); the cached order is one
    fixed shuffle, reshuffled each epoch through a 2048-image buffer.

    Returns the dataset, or (dataset, DatasetInfo) with with_info=True.
    """
    import tensorflow as tf

    paths = [os.fspath(p) for p in paths]
    labels = np.asarray(labels, np.float32)
    _check_pipeline_args(paths, labels, image_size, batch_size, rank, size, on_corrupt, pad, training)
    mode = _preprocessing_mode(preprocessing)

    shard = np.arange(len(paths))[rank::size]
    shard_paths = [paths[i] for i in shard]
    missing = [p for p in shard_paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} image files missing, first: {missing[0]}")

    keep = np.ones(len(shard), bool)
    skipped: tuple[str, ...] = ()
    if verify:
        bad = find_corrupt_images(shard_paths)
        if bad and on_corrupt == "fail":
            raise DataError(
                f"{len(bad)} images cannot be decoded, first: {shard_paths[bad[0]]} (on_corrupt='skip' drops them)"
            )
        keep[bad] = False
        skipped = tuple(shard_paths[i] for i in bad)
        if skipped:
            log.warning("rank %d: skipping %d corrupt images, first: %s", rank, len(skipped), skipped[0])

    shard_labels = labels[shard]
    weights = keep.astype(np.float32)
    if pad:
        # Padding and skipped slots keep their place with weight 0 and a blank image, so
        # every rank has exactly ceil(N/size) entries.
        num_slots = -(-len(paths) // size)
        extra = num_slots - len(shard)
        shard_paths = [p if k else "" for p, k in zip(shard_paths, keep)] + [""] * extra
        shard_labels = np.concatenate([shard_labels, np.zeros((extra, labels.shape[1]), np.float32)])
        weights = np.concatenate([weights, np.zeros(extra, np.float32)])
    else:
        shard_paths = [p for p, k in zip(shard_paths, keep) if k]
        shard_labels = shard_labels[keep]
        weights = weights[keep]
    if training and not shard_paths:
        raise DataError(f"rank {rank} of {size} has no training images ({len(paths)} in all)")

    resize_to = int(round(image_size * 256 / 224))
    cache_file = None
    if cache and cache != "memory":
        cache_file = f"{cache}-{'train' if training else 'eval'}-{image_size}px-rank{rank}-of-{size}"
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
    autotune = tf.data.AUTOTUNE
    files = tf.data.Dataset.from_tensor_slices((shard_paths, shard_labels, weights))

    if training:
        seed = int(shuffle_seed) * 100_003 + rank  # distinct, reproducible stream per rank

        def load(path, label, weight):
            return _decode_resize(path, resize_to), label

        def augment(image, label, pair_seed):
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(pair_seed, 2))
            image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_seed)
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
            return image, label

        if cache is None:
            ds = files.shuffle(len(shard_paths), seed=seed, reshuffle_each_iteration=True)
            ds = ds.repeat().map(load, num_parallel_calls=autotune)
        else:
            ds = files.shuffle(len(shard_paths), seed=seed, reshuffle_each_iteration=False)
            ds = ds.map(load, num_parallel_calls=autotune)
            ds = ds.cache(cache_file) if cache_file else ds.cache()
            ds = ds.shuffle(min(len(shard_paths), 2048), seed=seed, reshuffle_each_iteration=True).repeat()
        if on_corrupt == "skip":
            ds = ds.ignore_errors(log_warning=True)
        randoms = tf.data.Dataset.random(seed=seed).batch(2)  # a [2] int64 seed per image
        ds = tf.data.Dataset.zip((ds, randoms)).map(
            lambda pair, pair_seed: augment(*pair, pair_seed), num_parallel_calls=autotune
        )
        ds = ds.batch(batch_size, drop_remainder=True)
        ds = ds.map(lambda x, y: (preprocess_images(x, mode), y), num_parallel_calls=autotune)
    else:
        blank = tf.zeros([image_size, image_size, 3], tf.uint8)

        def load(path, label, weight):
            image = tf.cond(
                weight > 0,
                lambda: tf.image.resize_with_crop_or_pad(_decode_resize(path, resize_to), image_size, image_size),
                lambda: blank,
            )
            image.set_shape([image_size, image_size, 3])
            return image, label, weight

        ds = files.map(load, num_parallel_calls=autotune)  # order kept: deterministic map
        if cache is not None:
            ds = ds.cache(cache_file) if cache_file else ds.cache()
        if on_corrupt == "skip" and not pad:  # with pad, a dropped entry would unbalance ranks
            ds = ds.ignore_errors(log_warning=True)
        ds = ds.batch(batch_size, drop_remainder=False)
        if pad:
            ds = ds.map(lambda x, y, w: (preprocess_images(x, mode), y, w), num_parallel_calls=autotune)
        else:
            ds = ds.map(lambda x, y, w: (preprocess_images(x, mode), y), num_parallel_calls=autotune)
    ds = ds.prefetch(autotune)
    if not with_info:
        return ds
    info = DatasetInfo(
        num_examples=int(weights.sum()),
        num_padded=int(len(weights) - weights.sum()) - len(skipped) if pad else 0,
        skipped=skipped,
        rank=rank,
        size=size,
    )
    return ds, info


def _check_pipeline_args(paths, labels, image_size, batch_size, rank, size, on_corrupt, pad, training) -> None:
    if labels.ndim != 2 or labels.shape[0] != len(paths):
        raise ValueError(f"labels must be [len(paths)={len(paths)}, classes], got shape {labels.shape}")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"need 0 <= rank < size, got rank={rank} size={size}")
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    if pad and training:
        raise ValueError("pad=True is for evaluation; training datasets repeat and need no padding")
