"""Issue 20, item 9: one-line errors instead of tracebacks, and CSV cells that a spreadsheet
shows as text instead of running as formulas.

The unreadable X-ray is unreadable for real: the test drops its effective uid to `nobody`
for the check (root reads a mode-000 file), then takes root back.
"""
import contextlib
import csv
import gzip
import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from absl import flags as absl_flags
from PIL import Image

import resnet_main
from chexnet import __main__ as chexnet_main
from chexnet import evaluate, input_pipeline, predict, reports, splits
from chexnet.labels import CLASS_NAMES
from hooks.distributed.horovod_glue import Context
from hooks.errors import ConfigError, DataError
from hooks.state import checkpoints

HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"


def one_line(err, *words):
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert str(word) in message, message
    return message


# ------------------------------------------------------------------ flags
@pytest.mark.parametrize("entry", [resnet_main, chexnet_main])
@pytest.mark.parametrize("flag", ["--train_epochs", "--fusion_threshold_mb"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_infinite_flag_values_are_one_line_naming_the_flag(entry, flag, value):
    fv = absl_flags.FlagValues()
    entry.define_flags(fv)
    with pytest.raises(absl_flags.IllegalFlagValueError) as err:
        fv(["prog", f"{flag}={value}"])
    one_line(err, flag, "finite")


def test_finite_values_still_pass():
    fv = absl_flags.FlagValues()
    resnet_main.define_flags(fv)
    fv(["prog", "--train_epochs=2.5", "--fusion_threshold_mb=0"])
    assert fv.train_epochs == 2.5 and fv.fusion_threshold_mb == 0


# ------------------------------------------------------------------ CSVs that are not UTF-8
@pytest.mark.parametrize("packed", ["plain", "gzip"])
def test_label_csv_with_non_utf8_bytes_names_the_file(tmp_path, packed):
    body = (HEADER + "a.png,No Finding,0,1,058Y\n").encode() + b"b\xff.png,No Finding,0,2,040Y\n"
    path = tmp_path / ("labels.csv.gz" if packed == "gzip" else "labels.csv")
    path.write_bytes(gzip.compress(body) if packed == "gzip" else body)
    with pytest.raises(DataError) as err:
        splits.read_data_entry(path)
    one_line(err, path, "not UTF-8", "0xff")


def test_utf8_label_csv_still_reads(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(("\ufeff" + HEADER + "ä.png,Hernia,0,1,058Y\n").encode())
    table = splits.read_data_entry(path)
    assert table.image_index == ["ä.png"] and table.labels[0, CLASS_NAMES.index("Hernia")] == 1


def test_split_list_and_predictions_csv_with_non_utf8_bytes_name_the_file(tmp_path):
    lst = tmp_path / "test_list.txt"
    lst.write_bytes(b"x\xfe.png " + b"0 " * 14 + b"\n")
    with pytest.raises(DataError) as err:
        splits.read_split_list(lst)
    one_line(err, lst, "not UTF-8")
    pred = tmp_path / "predictions.csv"
    pred.write_bytes(("Image Index," + ",".join("prob_" + c for c in CLASS_NAMES) + "\n")
                     .encode() + b"\xc3(.png" + b",0.5" * 14 + b"\n")
    with pytest.raises(DataError) as err:
        reports.read_predictions_csv(str(pred))
    one_line(err, pred, "not UTF-8")


# ------------------------------------------------------------------ state.json
@pytest.mark.parametrize("drop", ["backbone", "image_size"])
def test_chexnet_checkpoint_without_backbone_names_its_state_json(tmp_path, drop):
    ckpt = tmp_path / "ckpt-000000004"
    ckpt.mkdir()
    (ckpt / checkpoints.WEIGHTS).write_bytes(b"")
    state = {"task": "chexnet", "step": 4, "backbone": "resnet18", "image_size": 32}
    del state[drop]
    (ckpt / checkpoints.STATE).write_text(json.dumps(state))
    for path in (ckpt, tmp_path):  # the folder itself, or the model_dir holding it
        with pytest.raises(ConfigError) as err:
            evaluate.find_checkpoint(str(path))
        one_line(err, ckpt / "state.json", repr(drop))


# ------------------------------------------------------------------ unreadable X-rays
@contextlib.contextmanager
def as_nobody():
    """Effective uid `nobody` inside the block; root's again after it, whatever happens."""
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def xrays():
    """Three PNGs nobody may read, the second of them mode 000; in a folder nobody can
    reach (pytest's basetemp is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="hr-xrays-"))
    folder.chmod(0o755)
    paths = []
    for i in range(3):
        path = folder / f"{i:08d}_000.png"
        Image.fromarray(np.full((40, 40), 60 * i, np.uint8)).save(path)
        path.chmod(0o644)
        paths.append(str(path))
    os.chmod(paths[1], 0)
    yield paths
    shutil.rmtree(folder)


@pytest.mark.parametrize("on_corrupt", ["fail", "skip"])
@pytest.mark.parametrize("verify", [True, False])
def test_unreadable_xray_is_a_permission_error_also_with_skip(xrays, on_corrupt, verify):
    if os.geteuid() != 0:
        pytest.fail("this test drops to uid nobody and back: run it as root")
    options = input_pipeline.InputOptions(image_size=32, on_corrupt=on_corrupt, verify=verify)
    labels = np.zeros((len(xrays), len(CLASS_NAMES)), np.float32)
    with as_nobody():
        with pytest.raises(DataError) as err:
            input_pipeline.eval_dataset(xrays, labels, options, batch_size=2)
        message = one_line(err, xrays[1], "Permission denied", "cannot be read")
        assert "decode" not in message
        with pytest.raises(DataError) as err:
            predict.read_image(xrays[1])
        one_line(err, xrays[1], "Permission denied")
    assert predict.read_image(xrays[1]).shape == (40, 40, 3)  # root reads it: the files are fine


# ------------------------------------------------------------------ spreadsheet formulas
FORMULAS = ["=HYPERLINK(\"http://x\",\"y\").png", "+1+1.png", "-2.png", "@SUM(A1).png",
            "\tx.png", "'=quoted.png"]


def test_predictions_csv_names_are_not_formulas_and_read_back_exactly(tmp_path):
    names = FORMULAS + ["00000001_000.png"]
    probs = np.linspace(0.0, 1.0, len(names) * len(CLASS_NAMES)).reshape(len(names), -1)
    path = tmp_path / "predictions.csv"
    reports.write_predictions_csv(str(path), names, probs, Context())
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    # OWASP: a text cell starting with = + - @ tab CR (or the escape ' itself) gets a '.
    assert [r[0] for r in rows] == ["'" + n for n in FORMULAS] + ["00000001_000.png"]
    for row, expected in zip(rows, probs):  # numbers are written as numbers
        assert [float(c) for c in row[1:]] == pytest.approx(expected, abs=5e-7)
    got_names, got = reports.read_predictions_csv(str(path))
    assert got_names == names
    np.testing.assert_allclose(got, probs, atol=5e-7)


def test_auroc_csv_keeps_numbers_as_numbers(tmp_path):
    """Only text cells are escaped: every AUROC, interval and count cell of auroc.csv reads
    back as the number sklearn gives (none gets a leading quote)."""
    from sklearn.metrics import roc_auc_score

    from chexnet import metrics

    rng = np.random.default_rng(1)
    labels = (rng.random((60, len(CLASS_NAMES))) < 0.4).astype(np.float32)
    probs = rng.random((60, len(CLASS_NAMES)))
    result = metrics.per_class_auroc(labels, probs)
    reports.write_report(str(tmp_path), result, labels, probs, Context())
    with open(tmp_path / "auroc.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:15]] == list(CLASS_NAMES)
    assert [float(r[1]) for r in rows[1:15]] == pytest.approx(
        [roc_auc_score(labels[:, c], probs[:, c]) for c in range(len(CLASS_NAMES))], abs=1e-4)
    assert [int(r[4]) for r in rows[1:15]] == labels.sum(axis=0).astype(int).tolist()
    assert not any(cell.startswith("'") for row in rows[1:] for cell in row[1:])


def test_an_existing_saved_model_in_export_dir_is_refused_before_training(tmp_path):
    """resnet_main never merges an export into an older one: the check runs with the
    config's, before any training; an empty --export_dir passes."""
    from imagenet import config as imagenet_config
    from imagenet.config import RunConfig

    base = dict(use_synthetic_data=True, mode="train", train_steps=1)
    imagenet_config.validate(RunConfig(export_dir=str(tmp_path), **base))
    (tmp_path / "saved_model").mkdir()
    with pytest.raises(ConfigError) as err:
        imagenet_config.validate(RunConfig(export_dir=str(tmp_path), **base))
    assert str(tmp_path / "saved_model") in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        imagenet_config.validate(RunConfig(export_dir=str(tmp_path / "file"), **base))
