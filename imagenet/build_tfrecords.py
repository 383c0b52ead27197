"""Convert an ImageNet-style JPEG folder into TPU-style TFRecord shards.

    python -m imagenet.build_tfrecords --input_dir=DIR --output_dir=DIR \
        --split=train|validation --synsets_file=FILE --num_shards=N \
        [--validation_labels_file=FILE] [--num_workers=K] [--seed=S]

Input layouts:
  * `<input_dir>/<synset>/*.JPEG` (train, and validation when already sorted into folders);
  * validation only: a flat folder of `ILSVRC2012_val_XXXXXXXX.JPEG` plus
    `--validation_labels_file` in one of two formats (detected from the first line):
      - one synset per line; line i (1-based) is the synset of `ILSVRC2012_val_<i as %08d>`
        (the usual `imagenet_2012_validation_synset_labels.txt`; for the full set that is
        the sorted file order, and a subset of the files also works);
      - `filename synset` per line (filename with or without extension).
    The devkit's numeric `ILSVRC2012_validation_ground_truth.txt` is rejected: its IDs are
    not in synset order.

`--synsets_file` has one synset per line, optionally followed by a short name
("n01440764 tench"). Labels number the synsets in sorted order from 1, as
tensorflow/tpu's tools/datasets/imagenet_to_gcs.py does, whatever the file's order (an
unsorted file is accepted with a warning; its order does not change the labels).

Output: `<split>-00000-of-<N as %05d>` ... each record a tf.train.Example with
`image/encoded` (JPEG), `image/format` ("JPEG"), `image/class/label` (1..1000),
`image/class/synset`, `image/class/text`, `image/height`, `image/width`,
`image/channels` (3), `image/colorspace` ("RGB"), `image/filename`.

Real ImageNet holds grayscale and CMYK JPEGs and a PNG named .JPEG: they are re-encoded
as RGB JPEG (quality 95) and counted; a file PIL cannot decode is counted and skipped
with a warning. A shard is never written empty: fewer images than shards, or a shard whose
images are all undecodable, is an error naming the shard. Train file order is shuffled
with a fixed seed so every shard mixes classes. Shards are written in parallel processes,
each to a hidden temporary name that is renamed when complete, so readers never see a
partial shard.
"""
import collections
import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence

from PIL import Image

SPLITS = ("train", "validation")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
JPEG_QUALITY = 95
DEFAULT_SEED = 12345  # the seed of the original build_imagenet_data.py shuffle

# How an input image was handled. "rgb_jpeg" keeps the original bytes; the next four are
# re-encoded as RGB JPEG; "undecodable" files are skipped.
KINDS = ("rgb_jpeg", "grayscale", "cmyk", "png", "other", "undecodable")

_VAL_INDEX_RE = re.compile(r"ILSVRC2012_val_(\d+)")


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One input image and its class."""
    path: str
    synset: str
    label: int  # 1-based, as in the TPU records
    text: str


@dataclasses.dataclass
class BuildStats:
    """What a build did: per-kind counts (see KINDS), records written, skipped files."""
    counts: dict[str, int]
    num_records: int
    num_shards: int
    seconds: float
    skipped: list[str]
    output_files: list[str]


# ---------------------------------------------------------------- label files
def synset_labels(synsets: Sequence[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    """synset -> (label, short name): 1 + the synset's position in sorted order, as
    imagenet_to_gcs.py numbers them (so records agree whatever the file's order)."""
    return {s: (i + 1, text) for i, (s, text) in enumerate(sorted(synsets))}


def read_synsets(synsets_file: str) -> list[tuple[str, str]]:
    """Returns [(synset, short_name)] in file order; short_name is "" when absent."""
    out, seen = [], set()
    with open(synsets_file) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split(maxsplit=1)
            if not parts:
                continue
            synset = parts[0]
            if synset in seen:
                raise ValueError(f"{synsets_file} line {lineno}: duplicate synset '{synset}'")
            seen.add(synset)
            out.append((synset, parts[1].strip() if len(parts) > 1 else ""))
    if not out:
        raise ValueError(f"no synsets in {synsets_file}")
    return out


def read_validation_labels(labels_file: str) -> Callable[[str], str | None]:
    """Returns a lookup `filename -> synset or None` for a validation ground-truth file.

    Accepts one synset per line (line i is ILSVRC2012_val_%08d with number i) or
    "filename synset" lines; the format is taken from the first non-empty line.
    """
    rows = []
    with open(labels_file) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if parts:
                rows.append((lineno, parts))
    if not rows:
        raise ValueError(f"no labels in {labels_file}")
    ncols = len(rows[0][1])
    if ncols not in (1, 2):
        raise ValueError(f"{labels_file} line {rows[0][0]}: expected 'synset' or "
                         f"'filename synset', got {len(rows[0][1])} fields")
    for lineno, parts in rows:
        if len(parts) != ncols:
            raise ValueError(f"{labels_file} line {lineno}: expected {ncols} field(s) like "
                             f"line {rows[0][0]}, got {len(parts)}")
        if parts[-1].isdigit():
            # Devkit ILSVRC2012_IDs are numbered in a different order than the synsets file.
            raise ValueError(f"{labels_file} line {lineno}: '{parts[-1]}' is a number, not a "
                             "synset (devkit IDs are not supported; use synset labels)")
    if ncols == 1:
        ordered = [parts[0] for _, parts in rows]

        def lookup(filename: str) -> str | None:
            m = _VAL_INDEX_RE.search(filename)
            if not m:
                return None
            i = int(m.group(1)) - 1
            return ordered[i] if 0 <= i < len(ordered) else None
        return lookup

    mapping = {}
    for _, (name, synset) in rows:
        mapping[os.path.basename(name)] = synset
        mapping[os.path.splitext(os.path.basename(name))[0]] = synset

    def lookup(filename: str) -> str | None:
        return mapping.get(filename, mapping.get(os.path.splitext(filename)[0]))
    return lookup


# ---------------------------------------------------------------- finding images
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def find_images(input_dir: str, split: str, synsets_file: str,
                validation_labels_file: str | None = None) -> list[ImageEntry]:
    """Lists the images of `input_dir` with their labels, sorted by path.

    Raises ValueError (one line, naming the folder/file) for an unknown synset, a missing
    label, an unsupported layout or an empty input, before anything is written.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if not os.path.isdir(input_dir):
        raise ValueError(f"input_dir {input_dir} is not a directory")
    index = synset_labels(read_synsets(synsets_file))
    names = sorted(os.listdir(input_dir))
    subdirs = [n for n in names if os.path.isdir(os.path.join(input_dir, n))
               and not n.startswith(".")]
    entries = []
    if subdirs:
        for synset in subdirs:
            if synset not in index:
                raise ValueError(f"unknown synset folder '{synset}' in {input_dir}: "
                                 f"not in {synsets_file}")
        for synset in subdirs:
            label, text = index[synset]
            folder = os.path.join(input_dir, synset)
            for name in sorted(os.listdir(folder)):
                if _is_image(name):
                    entries.append(ImageEntry(os.path.join(folder, name), synset, label, text))
    else:
        if split == "train":
            raise ValueError(f"train expects <synset>/ folders in {input_dir}, found none")
        if not validation_labels_file:
            raise ValueError(f"flat validation folder {input_dir} needs "
                             "--validation_labels_file")
        lookup = read_validation_labels(validation_labels_file)
        for name in names:
            if not _is_image(name):
                continue
            synset = lookup(name)
            if synset is None:
                raise ValueError(f"no label for {name} in {validation_labels_file}")
            if synset not in index:
                raise ValueError(f"unknown synset '{synset}' for {name} in "
                                 f"{validation_labels_file}: not in {synsets_file}")
            label, text = index[synset]
            entries.append(ImageEntry(os.path.join(input_dir, name), synset, label, text))
    if not entries:
        raise ValueError(f"no images (*.JPEG, *.jpg, *.png) found in {input_dir}")
    return entries


# ---------------------------------------------------------------- images and records
def load_image(path: str) -> tuple[bytes | None, int, int, str, str]:
    """Returns (jpeg_bytes, height, width, kind, error); jpeg_bytes is None if undecodable.

    RGB JPEGs keep their original bytes; anything else PIL can decode (grayscale, CMYK,
    PNG, other modes/formats) is converted to RGB and re-encoded, because
    tf.image.decode_and_crop_jpeg(channels=3) fails on PNG and mis-handles CMYK.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: catches truncated and corrupt files, not just headers
            fmt, mode = im.format, im.mode
            if fmt == "JPEG" and mode == "RGB":
                return data, im.height, im.width, "rgb_jpeg", ""
            if fmt == "PNG":
                kind = "png"
            elif fmt == "JPEG" and mode in ("L", "1"):
                kind = "grayscale"
            elif fmt == "JPEG" and mode == "CMYK":
                kind = "cmyk"
            else:
                kind = "other"
            rgb = im.convert("RGB")
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), rgb.height, rgb.width, kind, ""
    except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this file
        return None, 0, 0, "undecodable", f"{type(e).__name__}: {e}"


def make_example(encoded: bytes, entry: ImageEntry, height: int, width: int):
    """Builds the TPU-format tf.train.Example for one image."""
    import tensorflow as tf  # imported here so that listing/validation stays light

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": b(encoded),
        "image/format": b(b"JPEG"),
        "image/class/label": i(entry.label),
        "image/class/synset": b(entry.synset.encode()),
        "image/class/text": b(entry.text.encode()),
        "image/height": i(height),
        "image/width": i(width),
        "image/channels": i(3),
        "image/colorspace": b(b"RGB"),
        "image/filename": b(os.path.basename(entry.path).encode()),
    }))


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`train-00000-of-01024` style name."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def write_shard(output_path: str, entries: Sequence[ImageEntry]):
    """Writes one shard atomically; returns (counts dict, records written, skipped messages).
    ValueError naming the shard, and nothing written, when no image of it can be decoded."""
    import tensorflow as tf

    counts = collections.Counter()
    skipped = []
    written = 0
    # Hidden temp name: a reader's `train-*` glob never matches a partial shard.
    tmp = os.path.join(os.path.dirname(output_path),
                       f".tmp-{os.path.basename(output_path)}-{os.getpid()}")
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for entry in entries:
                encoded, height, width, kind, error = load_image(entry.path)
                counts[kind] += 1
                if encoded is None:
                    skipped.append(f"{entry.path}: {error}")
                    continue
                # deterministic=True: map fields in a fixed order, so rebuilds are byte-identical.
                example = make_example(encoded, entry, height, width)
                writer.write(example.SerializeToString(deterministic=True))
                written += 1
        if not written:
            raise ValueError(f"shard {os.path.basename(output_path)} would be empty: none of "
                             f"its {len(entries)} image(s) can be decoded (first: "
                             f"{skipped[0] if skipped else 'no images'})")
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dict(counts), written, skipped


def _check_output_dir(output_dir: str, split: str, num_shards: int) -> None:
    """Refuses to mix shards of a different total into one folder (readers glob them all)."""
    suffix = f"-of-{num_shards:05d}"
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(f"{split}-") and not name.endswith(suffix):
            raise ValueError(f"{os.path.join(output_dir, name)} is from another build "
                             f"(not {suffix}); remove the old {split}-* files first")


# ---------------------------------------------------------------- the build
class _Tally:
    """Counts what the finished shards wrote and logs progress every `interval_s`."""

    def __init__(self, num_shards: int, num_images: int, start: float, log, interval_s: float):
        self.num_shards, self.num_images, self.start = num_shards, num_images, start
        self.log, self.interval_s = log, interval_s
        self.counts, self.skipped = collections.Counter(), []
        self.records = self.done = self.images_done = 0
        self.last_log = 0.0

    def add(self, result, n_images: int) -> None:
        shard_counts, written, shard_skipped = result
        self.counts.update(shard_counts)
        self.records += written
        self.done += 1
        self.images_done += n_images
        for msg in shard_skipped:
            self.log(f"warning: skipped undecodable image {msg}")
        self.skipped.extend(shard_skipped)
        now = time.time()
        if self.done == self.num_shards or now - self.last_log >= self.interval_s:
            self.last_log = now
            rate = self.images_done / max(now - self.start, 1e-9)
            self.log(f"  {self.done}/{self.num_shards} shards, {self.images_done}/"
                     f"{self.num_images} images, {rate:.1f} images/s")


def _write_shards(tasks, workers: int, on_done) -> None:
    """`write_shard` for each (path, chunk) of `tasks`, in `workers` spawned processes
    (spawn, not fork: a forked TensorFlow process can deadlock); `on_done(result, n)`."""
    if workers == 1:
        for path, chunk in tasks:
            on_done(write_shard(path, chunk), len(chunk))
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(write_shard, path, chunk): len(chunk) for path, chunk in tasks}
        try:
            for fut in concurrent.futures.as_completed(futures):
                on_done(fut.result(), futures[fut])
        except BaseException:
            # A failed shard (e.g. disk full) or Ctrl-C: do not start the remaining ones.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def build(input_dir: str, output_dir: str, split: str, synsets_file: str, num_shards: int,
          validation_labels_file: str | None = None, num_workers: int = 1,
          seed: int = DEFAULT_SEED, log: Callable[[str], None] = print,
          progress_interval_s: float = 5.0) -> BuildStats:
    """Converts `input_dir` into `num_shards` TFRecord shards in `output_dir`.

    num_workers > 1 writes shards in that many spawned processes. Returns the counts;
    prints progress and a summary through `log`.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    start = time.time()
    synsets = [s for s, _ in read_synsets(synsets_file)]
    if synsets != sorted(synsets):
        log(f"warning: {synsets_file} is not in sorted order; labels follow the sorted order "
            "(as imagenet_to_gcs.py), not the file's")
    entries = find_images(input_dir, split, synsets_file, validation_labels_file)
    if split == "train":
        random.Random(seed).shuffle(entries)
    if len(entries) < num_shards:
        raise ValueError(f"{split}: {len(entries)} images for {num_shards} shards: shard "
                         f"{shard_name(split, num_shards - 1, num_shards)} would be empty; "
                         f"use --num_shards <= {len(entries)}")
    os.makedirs(output_dir, exist_ok=True)
    _check_output_dir(output_dir, split, num_shards)

    # Contiguous, near-equal chunks: shard i gets images [bounds[i], bounds[i+1]).
    bounds = [len(entries) * i // num_shards for i in range(num_shards + 1)]
    tasks = [(os.path.join(output_dir, shard_name(split, i, num_shards)),
              entries[bounds[i]:bounds[i + 1]]) for i in range(num_shards)]
    log(f"{split}: {len(entries)} images from {input_dir} -> {num_shards} shards in "
        f"{output_dir} ({min(num_workers, num_shards)} worker(s))")

    tally = _Tally(num_shards, len(entries), start, log, progress_interval_s)
    _write_shards(tasks, min(num_workers, num_shards), tally.add)
    seconds = time.time() - start
    stats = BuildStats(counts={k: tally.counts.get(k, 0) for k in KINDS},
                       num_records=tally.records, num_shards=num_shards, seconds=seconds,
                       skipped=tally.skipped, output_files=[t[0] for t in tasks])
    c = stats.counts
    log(f"done: {tally.records} records in {num_shards} shards, {seconds:.1f} s "
        f"({len(entries) / max(seconds, 1e-9):.1f} images/s); RGB JPEG kept {c['rgb_jpeg']}, "
        f"re-encoded: grayscale {c['grayscale']}, CMYK {c['cmyk']}, PNG {c['png']}, "
        f"other {c['other']}; undecodable skipped {c['undecodable']}")
    return stats


# ---------------------------------------------------------------- command line
def define_flags(flag_values=None) -> None:
    """Registers this tool's flags (only the command line calls this)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string("input_dir", None, "Folder of <synset>/*.JPEG, or a flat "
                        "validation folder (then --validation_labels_file).", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where the shards are written.", flag_values=fv)
    flags.DEFINE_enum("split", "train", SPLITS, "Shard name prefix and shuffling: train "
                      "shuffles the file order.", flag_values=fv)
    flags.DEFINE_string("synsets_file", None, "One synset per line (optionally followed by "
                        "a name); labels number them from 1 in sorted order, as "
                        "imagenet_to_gcs.py.", flag_values=fv)
    flags.DEFINE_integer("num_shards", None, "Number of output shards (TPU: 1024 train, "
                         "128 validation).", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("validation_labels_file", None, "Ground truth for a flat validation "
                        "folder: one synset per line, or 'filename synset' lines (not used "
                        "when input_dir has <synset>/ folders).", flag_values=fv)
    flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Processes writing shards.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", DEFAULT_SEED, "Seed of the train file-order shuffle.",
                         flag_values=fv)
    for name in ("input_dir", "output_dir", "synsets_file", "num_shards"):
        flags.mark_flag_as_required(name, flag_values=fv)


def main(argv) -> None:
    from absl import flags
    del argv
    FLAGS = flags.FLAGS
    try:
        build(FLAGS.input_dir, FLAGS.output_dir, FLAGS.split, FLAGS.synsets_file,
              FLAGS.num_shards, validation_labels_file=FLAGS.validation_labels_file,
              num_workers=FLAGS.num_workers, seed=FLAGS.seed,
              log=lambda msg: print(msg, flush=True))
    except (ValueError, OSError) as e:
        sys.exit(f"build_tfrecords: error: {e}")


if __name__ == "__main__":
    from absl import app

    from hooks import entry
    entry.quiet_startup()  # before TensorFlow is imported
    define_flags()
    app.run(main)
