"""ChestX-ray14 labels and splits: the NIH label CSV, image discovery, patient-wise
splits, class weights, and `load_data` (config -> splits -> image paths).

Plain Python/numpy (no TensorFlow import), so split tools and reports start fast; the
tf.data pipeline is in `chexnet.input_pipeline`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from chexnet.config import ChexnetConfig
from chexnet.labels import CLASS_NAMES, NUM_CLASSES, encode_findings
from hooks.errors import ConfigError, DataError

PathLike = str | os.PathLike

REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = ("train", "val", "test")


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


@contextlib.contextmanager
def open_text(path: str):
    """Plain or gzipped UTF-8 text (gzip recognised by its magic bytes, not the name); bytes
    that are not UTF-8, wherever the reading meets them, are one DataError naming the file."""
    with open(path, "rb") as f:
        magic = f.read(2)
    # utf-8-sig: tolerate a BOM left by spreadsheet programs.
    if magic == b"\x1f\x8b":
        f = gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    else:
        f = open(path, encoding="utf-8-sig", newline="")
    try:
        with f:
            yield f
    except UnicodeDecodeError as err:
        bad = err.object[err.start:err.start + 1].hex()
        raise DataError(f"{path}: not UTF-8 text (byte 0x{bad}: {err.reason}); save it as "
                        "UTF-8") from None




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


def _columns(path: str, header: list[str] | None) -> tuple[dict, int]:
    """{field: column or None} of a Data_Entry header and the row length they need."""
    if not header:
        raise DataError(f"{path}: empty file, expected a Data_Entry_2017.csv header")
    column = {name.strip(): i for i, name in enumerate(header) if name.strip()}
    for name in REQUIRED_COLUMNS:
        if name not in column:
            raise DataError(
                f"{path}: no {name!r} column in the header (is this Data_Entry_2017.csv?)"
            )
    fields = dict(zip(("name", "findings", "pid"), (column[c] for c in REQUIRED_COLUMNS)))
    fields.update(age=column.get("Patient Age"), sex=column.get("Patient Gender"),
                  view=column.get("View Position"))
    return fields, 1 + max(i for i in fields.values() if i is not None)


def _parse_row(where: str, row: list[str], fields: dict, encoded: dict) -> tuple:
    """(name, patient id, label vector, age, sex, view) of one row; DataError at `where`.
    `encoded` caches the label vector of each findings string (only ~800 distinct)."""
    findings = row[fields["findings"]]
    vector = encoded.get(findings)
    if vector is None:
        try:
            vector = encoded[findings] = encode_findings(findings)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
    try:
        pid = int(row[fields["pid"]])
    except ValueError:
        raise DataError(
            f"{where}: Patient ID {row[fields['pid']]!r} is not an integer"
        ) from None
    age = -1
    if fields["age"] is not None:
        age = _parse_age(row[fields["age"]])
        if age is None:
            raise DataError(
                f"{where}: Patient Age {row[fields['age']]!r} is not like 58 or 058Y"
            )
    text = lambda key: row[fields[key]].strip() if fields[key] is not None else ""  # noqa: E731
    return text("name"), pid, vector, age, text("sex"), text("view")


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
    rows, seen, encoded = [], set(), {}
    with open_text(path) as f:
        reader = csv.reader(f)
        fields, n_needed = _columns(path, next(reader, None))
        for line_no, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < n_needed:
                raise DataError(
                    f"{path}:{line_no}: {len(row)} fields, expected at least {n_needed}"
                )
            name = row[fields["name"]].strip()
            if name in seen:
                raise DataError(f"{path}:{line_no}: duplicate Image Index {name!r}")
            seen.add(name)
            rows.append(_parse_row(f"{path}:{line_no}", row, fields, encoded))
    if not rows:
        raise DataError(f"{path}: header only, no image rows")
    names, pids, label_rows, ages, sexes, views = zip(*rows)
    return Table(
        image_index=list(names),
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
                    raise DataError(
                        f"image {entry.name} found twice: {found[entry.name]} and {entry.path}"
                    )
                found[entry.name] = entry.path
    if not found:
        raise DataError(
            f"{root}: no .png/.jpg images, neither in the folder nor in images_*/images/"
        )
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
        raise DataError(
            f"cannot read a patient id from image name {name!r} (expected like 00000001_000.png)"
        )
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
    if (
        fractions.ndim != 1
        or np.any(fractions < 0)
        or not math.isclose(fractions.sum(), 1.0, abs_tol=1e-6)
    ):
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
    return {
        name: _table_split(table, name, np.flatnonzero(fold == k)) for k, name in enumerate(names)
    }


def read_name_list(path: PathLike) -> list[str]:
    """File names from an official NIH list (one per line; extra columns are ignored)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"split list not found: {path}")
    with open_text(path) as f:
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
            raise DataError(
                f"{os.fspath(list_path)}: {len(missing)} names not in the label CSV, "
                f"first: {missing[0]}"
            )
        return np.asarray([row_of[n] for n in names], np.int64)

    train_val, test = rows(train_val_list), rows(test_list)
    both = np.intersect1d(train_val, test)
    if len(both):
        raise DataError(
            f"{len(both)} images are in both {os.fspath(train_val_list)} and "
            f"{os.fspath(test_list)}, "
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
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 1 + NUM_CLASSES or not set(parts[1:]) <= {"0", "1"}:
                raise DataError(
                    f"{path}:{line_no}: expected a file name and {NUM_CLASSES} labels 0/1, "
                    f"got {line.strip()[:80]!r}"
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
        image_names, labels = read_split_list(
            os.path.join(os.fspath(split_dir), f"{name}_list.txt")
        )
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
                    f"patient leak: {len(shared)} patients in both {folds[a].name!r} and "
                    f"{folds[b].name!r}, "
                    f"e.g. {shared[:5].tolist()}"
                )


def split_summary(splits: Mapping[str, Split] | Iterable[Split]) -> str:
    """A text table: images, patients and per-class positives (prevalence) per split."""
    folds = _as_list(splits)
    width = 18
    lines = ["".ljust(20) + "".join(s.name.rjust(width) for s in folds)]
    lines.append("images".ljust(20) + "".join(f"{len(s):,}".rjust(width) for s in folds))
    lines.append(
        "patients".ljust(20)
        + "".join(f"{len(np.unique(s.patient_ids)):,}".rjust(width) for s in folds)
    )
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
        raise ValueError(
            f"labels must be a non-empty [N, classes] matrix, got shape {labels.shape}"
        )
    if not np.all((labels >= 0) & (labels <= 1)):
        raise ValueError("labels must lie in [0, 1]")
    positives = labels.sum(axis=0)
    total = labels.shape[0]  # P + N for every class
    negatives = total - positives
    return (negatives / total).astype(np.float32), (positives / total).astype(np.float32)


# ---------------------------------------------------------------------- load_data


@dataclasses.dataclass(frozen=True)
class Data:
    splits: dict[str, Split]
    paths: dict[str, list[str]]  # split name -> image paths ({} when images are not needed)
    summary: str


def _restrict(table: Table, rows: np.ndarray) -> Table:
    return Table(
        image_index=[table.image_index[i] for i in rows],
        patient_id=table.patient_id[rows],
        labels=table.labels[rows],
        age=table.age[rows],
        gender=table.gender[rows],
        view_position=table.view_position[rows],
    )


def _head(split: Split, n: int) -> Split:
    return Split(split.name, split.names[:n], split.labels[:n], split.patient_ids[:n])


def _keep(split: Split, keep: Sequence[bool]) -> Split:
    keep = np.asarray(keep, bool)
    return Split(
        split.name,
        [n for n, k in zip(split.names, keep) if k],
        split.labels[keep],
        split.patient_ids[keep],
    )


def _splits_from_csv(config: ChexnetConfig, images: Mapping[str, str]) -> dict[str, Split]:
    if not config.csv:
        raise ConfigError("--csv (Data_Entry_2017.csv) is required unless --split_dir is given")
    table = read_data_entry(config.csv)
    if config.only_present_images and images:
        rows = np.flatnonzero([n in images for n in table.image_index])
        if not len(rows):
            raise DataError(
                f"none of the {len(table)} images of {config.csv} are in {config.image_dir}"
            )
        table = _restrict(table, rows)
    if config.max_images:
        rows = np.argsort(np.asarray(table.image_index))[: config.max_images]
        table = _restrict(table, np.sort(rows))
    if config.train_val_list or config.test_list:
        if not (config.train_val_list and config.test_list):
            raise ConfigError("--train_val_list and --test_list go together")
        return split_official(
            table, config.train_val_list, config.test_list, config.val_fraction, config.split_seed
        )
    try:
        return split_by_patient(table, tuple(config.split_fractions), config.split_seed)
    except ValueError as err:
        raise ConfigError(f"--split_fractions: {err}") from None


def load_data(config: ChexnetConfig, need_images: bool = True) -> Data:
    """Label table -> patient-wise splits -> image paths; raises DataError/ConfigError.

    Split source, first that applies: ``split_dir`` (CheXNet lists), the official
    ``train_val_list``/``test_list`` (+ patient-wise ``val_fraction`` carve-out), else
    ``split_fractions``/``split_seed`` by patient over the CSV. With
    ``only_present_images`` the labels are first restricted to the images in
    ``image_dir`` (the 50-image shared sample, demos); otherwise a listed image that is
    missing is an error. ``max_images`` keeps the first N rows (sorted by name).
    """
    images = find_images(config.image_dir) if need_images else {}
    if config.split_dir:
        splits = load_split_lists(config.split_dir)
        if config.only_present_images:
            splits = {k: _keep(s, [n in images for n in s.names]) for k, s in splits.items()}
        if config.max_images:
            splits = {k: _head(s, config.max_images) for k, s in splits.items()}
    else:
        splits = _splits_from_csv(config, images)
    check_patient_disjoint(splits)
    summary = split_summary(splits)
    if config.mode == "evaluate" and config.split_to_evaluate == "all":
        parts = list(splits.values())
        splits = dict(
            splits,
            all=Split(
                "all",
                [n for s in parts for n in s.names],
                np.concatenate([s.labels for s in parts]),
                np.concatenate([s.patient_ids for s in parts]),
            ),
        )
    paths = {}
    if need_images:
        wanted = ("train", "val") if config.mode == "train" else (config.split_to_evaluate,)
        paths = {name: resolve_paths(splits[name].names, images) for name in wanted}
    return Data(splits, paths, summary)
