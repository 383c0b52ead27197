"""chexnet fine-tuning, evaluation, predict and bad-input handling on the 50 real shared
X-rays, with a tiny ResNet-18 at 32 px pre-trained for 2 steps by resnet_main.

The 50 sample images are all from the CheXNet test fold, so the runs here split them
patient-wise themselves (--only_present_images + --split_fractions).
"""

import csv
import gzip
import json
import shutil
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chexnet import evaluate, reports, train
from chexnet import model as model_lib
from chexnet.config import ChexnetConfig
from chexnet.labels import CHEXNET_PUBLISHED_AUROC, CLASS_NAMES
from hooks.distributed.horovod_glue import Context
from hooks.errors import ConfigError, DataError
from tests.conftest import ROOT, SHARED_DATA, horovodrun_cmd, python_cmd, run_cmd, shared_data

CX = SHARED_DATA / "chestxray14"
CSV = CX / "Data_Entry_2017.csv.gz"
IMAGES = CX / "images"
TINY = ["--backbone=resnet18", "--image_size=32"]
# The 50-image sample split 60/20/20 by patient, tiny backbone (in-process configs).
SAMPLE = dict(csv=str(CSV), image_dir=str(IMAGES), only_present_images=True,
              split_fractions=(0.6, 0.2, 0.2), backbone="resnet18", image_size=32)



@pytest.fixture(scope="module")
def xrays():
    """The shared sample, or the test fails naming what is missing."""
    return shared_data(CSV), shared_data(IMAGES)


def data_args(image_dir=IMAGES, csv_path=CSV):
    return [
        f"--csv={csv_path}",
        f"--image_dir={image_dir}",
        "--only_present_images",
        "--split_fractions=0.6,0.2,0.2",
    ]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A resnet_main checkpoint dir (resnet18, 32 px, 10 classes, 2 steps)."""
    model_dir = tmp_path_factory.mktemp("pretrain") / "resnet18"
    run_cmd(
        python_cmd(
            "resnet_main.py",
            "--use_synthetic_data",
            "--resnet_depth=18",
            "--image_size=32",
            "--num_label_classes=10",
            "--train_batch_size=4",
            "--eval_batch_size=4",
            "--train_steps=2",
            "--iterations_per_loop=1",
            "--steps_per_eval=1",
            "--num_eval_images=4",
            "--num_train_images=40",
            f"--model_dir={model_dir}",
            "--mode=train_and_eval",
        ),
        timeout=300,
    )
    return model_dir


@pytest.fixture(scope="module")
def finetuned(xrays, pretrained, tmp_path_factory):
    """A 2-rank fine-tune of the pre-trained checkpoint on the 50 real images, launched by
    slurm/chexnet_finetune.sbatch outside SLURM (mpirun)."""
    model_dir = tmp_path_factory.mktemp("finetune") / "run"
    env = {"LAUNCHER": "mpirun", "NP": "2", "PYTHON": sys.executable, "CSV": CSV,
           "IMAGE_DIR": IMAGES, "BACKBONE": "resnet18", "IMAGE_SIZE": "32", "BATCH": "4",
           "EVAL_BATCH": "4", "TRAIN_STEPS": "4", "PRETRAINED_MODEL_DIR": pretrained,
           "INIT_CHECKPOINT": "best", "MODEL_DIR": model_dir,
           "EXTRA_FLAGS": "--only_present_images --split_fractions=0.6,0.2,0.2 "
                          "--steps_per_loop=2"}
    proc = run_cmd(["bash", ROOT / "slurm" / "chexnet_finetune.sbatch"], timeout=900, **env)
    assert "[hpc-resnet] launcher mpirun nodes 1 ranks 2 " in proc.stdout
    return model_dir, proc.stdout


def small_csv(tmp_path, names, *, drop_column=None, relabel=None):
    """A Data_Entry CSV (2017 format) holding only the real rows of `names`."""
    with gzip.open(CSV, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader if r and r[0] in set(names)]
    if relabel:
        rows[0][1] = relabel
    if drop_column:
        i = header.index(drop_column)
        header = header[:i] + header[i + 1 :]
        rows = [r[:i] + r[i + 1 :] for r in rows]
    path = tmp_path / "Data_Entry_small.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return path


# ----------------------------------------------------------------------- 2-rank fine-tune


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_two_rank_finetune_writes_report(finetuned, pretrained):
    model_dir, stdout = finetuned
    # Adam gets CheXNet's 1e-3, not the checkpoint's SGD rate (docs/chexnet.md)
    assert "2 rank(s)" in stdout and "peak lr 0.001 (Adam default, as CheXNet)" in stdout
    report = model_dir / "report"
    rows = list(csv.reader(open(report / "auroc.csv")))
    assert rows[0] == reports.CSV_HEADER
    assert [r[0] for r in rows[1:15]] == list(CLASS_NAMES)
    _check_published_columns(rows)
    md = (report / "auroc.md").read_text()
    assert md.count("\n| ") == 1 + 14 + 1  # header + 14 classes + mean
    assert (report / "roc_curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["final_step"] == 4 and summary["val_images"] == 10
    defined = [float(r[1]) for r in rows[1:15] if r[1] != "n/a"]
    assert defined and summary["mean_auroc"] == pytest.approx(np.mean(defined), abs=1e-4)
    # checkpoints record the validation AUROC and the best one is chosen by it
    states = [json.loads(p.read_text()) for p in sorted(model_dir.glob("ckpt-*/state.json"))]
    assert [s["step"] for s in states] == [2, 4]
    assert all(s["task"] == "chexnet" and s["best_metric"] == "mean_auroc" for s in states)
    assert all("mean_auroc" in s["metrics"] and "loss" in s["metrics"] for s in states)
    best = max(states, key=lambda s: (s["metrics"]["mean_auroc"], s["step"]))
    assert summary["best_checkpoint"].endswith(f"ckpt-{best['step']:09d}")
    assert summary["peak_learning_rate"] == 1e-3 and summary["optimizer"] == "adam"
    # evaluate and predict read the input the network was trained with from its checkpoints
    assert all((s["image_view"], s["preprocessing"]) == ("whole", "torch") for s in states)


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_three_rank_evaluate_counts_each_image_once(finetuned, tmp_path):
    model_dir, _ = finetuned
    out = tmp_path / "eval3"
    proc = run_cmd(
        horovodrun_cmd(
            3,
            "-m",
            "chexnet",
            "evaluate",
            *data_args(),
            *TINY,
            "--eval_batch_size=3",
            "--eval_split=all",
            f"--model_dir={model_dir}",
            f"--report_dir={out}",
        ),
        timeout=300,
    )
    rows = list(csv.reader(open(out / "predictions.csv")))
    assert rows[0] == ["Image Index"] + [f"prob_{c}" for c in CLASS_NAMES]
    names = [r[0] for r in rows[1:]]
    assert sorted(names) == sorted(p.name for p in IMAGES.glob("*.png"))  # all 50, each once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 50 and summary["ranks"] == 3
    assert "SUMMARY" in proc.stdout

    # Same predictions, same image order, as one process; scoring the file reproduces AUROC.
    one = tmp_path / "eval1"
    config = ChexnetConfig(mode="evaluate", eval_batch_size=4, eval_split="all",
                           model_dir=str(model_dir), report_dir=str(one), **SAMPLE)
    single = evaluate.run(config, Context(), log=lambda *a: None)
    rows1 = list(csv.reader(open(one / "predictions.csv")))
    assert [r[0] for r in rows1] == [r[0] for r in rows]
    np.testing.assert_allclose(
        np.asarray([r[1:] for r in rows1[1:]], float),
        np.asarray([r[1:] for r in rows[1:]], float),
        atol=2e-5,
    )
    scored = evaluate.run(
        ChexnetConfig(
            mode="evaluate",
            csv=str(CSV),
            predictions_csv=str(out / "predictions.csv"),
            report_dir=str(tmp_path / "scored"),
        ),
        Context(),
        log=lambda *a: None,
    )
    assert scored["images"] == 50
    assert scored["mean_auroc"] == pytest.approx(summary["mean_auroc"], abs=1e-5)
    assert single["mean_auroc"] == pytest.approx(summary["mean_auroc"], abs=1e-4)
    # sklearn on the gathered predictions, per class by name, against the report's rows.
    labels = _csv_findings()
    probs = np.asarray([r[1:] for r in rows[1:]], float)
    truth = np.asarray([[c in labels[n] for c in CLASS_NAMES] for n in names], float)
    report = {r[0]: r for r in csv.reader(open(out / "auroc.csv"))}
    expected = {}
    for k, name in enumerate(CLASS_NAMES):
        if 0 < truth[:, k].sum() < len(names):
            expected[name] = roc_auc_score(truth[:, k], probs[:, k])
            assert float(report[name][1]) == pytest.approx(expected[name], abs=1e-4), name
        else:
            assert report[name][1] == "n/a", name
    assert len(expected) >= 5
    assert summary["mean_auroc"] == pytest.approx(np.mean(list(expected.values())), abs=1e-4)
    _check_published_columns(list(report.values()))


def _csv_findings():
    """Image name -> set of findings, read from the label CSV here."""
    with gzip.open(CSV, "rt", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return {r[0]: set(r[1].split("|")) for r in reader if r}


def _check_published_columns(rows):
    """Each class row carries CheXNet's published AUROC of that class (Rajpurkar et al.
    2017, Table 2: Pneumonia .7680, Pneumothorax .8887, ...), labelled as another test
    split, and no difference from it."""
    header, by_name = rows[0], {r[0]: r for r in rows[1:]}
    assert header == ["class", "auroc", "ci_low", "ci_high", "positives",
                      "chexnet_2017_other_split"]
    assert by_name["Pneumonia"][5] == "0.7680" and by_name["Pneumothorax"][5] == "0.8887"
    for name in CLASS_NAMES:
        row = by_name[name]
        assert float(row[5]) == pytest.approx(CHEXNET_PUBLISHED_AUROC[name], abs=5e-5), name


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_predict_png_dicom_and_gradcam(finetuned, tmp_path):
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from chexnet import predict

    model_dir, _ = finetuned
    png = IMAGES / "00000075_000.png"
    pixels = np.asarray(Image.open(png).convert("L"))
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    # The DICOM reader stretches pixels to 0..255; a PNG of the stretched pixels is then the
    # same image, and must get the same probabilities.
    stretched = np.round((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
                         ).astype(np.uint8)
    assert np.array_equal(predict.read_image(str(tmp_path / "x.dcm"))[..., 0], stretched)
    Image.fromarray(stretched, "L").save(tmp_path / "stretched.png")

    # Issue #10: a 16-bit PNG of the same X-ray (as DICOM exports are) predicts like the
    # 8-bit one (PIL clipped it to white before); the same file name in two folders gets
    # two rows and two Grad-CAM files.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "a" / png.name)
    assert Image.open(tmp_path / "a" / png.name).mode == "I;16"
    shutil.copy(png, tmp_path / "b" / png.name)
    others = sorted(p for p in IMAGES.glob("*.png") if p != png)[:2]
    inputs = [png, tmp_path / "x.dcm", tmp_path / "a" / png.name, tmp_path / "b" / png.name,
              *others, tmp_path / "stretched.png"]
    heat, lines = tmp_path / "heat", []
    config = ChexnetConfig(
        mode="predict",
        checkpoint=str(model_dir),
        heatmap_dir=str(heat),
        output_csv=str(tmp_path / "p.csv"),
    )
    probs = predict.run(config, [str(p) for p in inputs], log=lines.append)
    assert probs.shape == (7, 14)
    np.testing.assert_allclose(probs[6], probs[1], atol=1e-6)  # DICOM == PNG of its pixels
    np.testing.assert_allclose(probs[2], probs[0], atol=1e-6)  # 16-bit == 8-bit
    np.testing.assert_allclose(probs[3], probs[0], atol=1e-6)
    # The probabilities are the sigmoid outputs of the best checkpoint's network.
    net, prepared = _net_and_input(model_dir, png)
    np.testing.assert_allclose(probs[0], np.asarray(net(prepared[None], training=False))[0],
                               rtol=1e-5, atol=1e-6)
    # Issue #14: three different X-rays, three different answers, none saturated.
    three = probs[[0, 4, 5]]
    assert np.all(three.max(axis=0) - three.min(axis=0) > 1e-3)
    assert not np.all((three < 1e-3) | (three > 1 - 1e-3))
    assert not any(line.startswith("WARNING") for line in lines)
    names = [r[0] for r in csv.reader(open(tmp_path / "p.csv"))][1:]
    assert names == [f"images/{png.name}", "x.dcm", f"a/{png.name}",
                     f"b/{png.name}", others[0].name, others[1].name, "stretched.png"]
    stem = png.stem
    assert sorted(p.name for p in heat.iterdir()) == sorted(
        [f"images_{stem}_gradcam.png", "x_gradcam.png", f"a_{stem}_gradcam.png",
         f"b_{stem}_gradcam.png", f"{others[0].stem}_gradcam.png",
         f"{others[1].stem}_gradcam.png", "stretched_gradcam.png"])
    # A 32 px ResNet-18 ends in a 1x1 feature map: Grad-CAM cannot point, and says so.
    assert sum("(flat: no region stands out)" in line for line in lines) == 7
    cam = predict.grad_cam(net, prepared, class_index=0)
    assert cam.shape == (1, 1) and predict.is_flat(cam)


def _net_and_input(model_dir, png):
    from chexnet import predict
    from hooks.state import checkpoints

    ckpt = evaluate.find_checkpoint(str(model_dir))
    net, _ = model_lib.build_chexnet_model("resnet18", 32)
    checkpoints.restore(ckpt, net)
    return net, predict.prepare(predict.read_image(str(png)), model_lib.input_options(
        ckpt.state))[0]


# ----------------------------------------------------------------------- init checkpoint


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_init_checkpoint_best_is_by_val_top1_not_last(pretrained, tmp_path):
    copy = tmp_path / "pre"
    shutil.copytree(pretrained, copy)
    first = copy / "ckpt-000000001" / "state.json"
    state = json.loads(first.read_text())
    state["metrics"]["top_1"] = 0.99
    first.write_text(json.dumps(state))
    assert model_lib.find_pretrained_checkpoint(str(copy), "best").step == 1
    assert model_lib.find_pretrained_checkpoint(str(copy), "latest").step == 2
    assert model_lib.find_pretrained_checkpoint(str(copy), "ckpt-000000002").step == 2
    with pytest.raises(model_lib.ModelError, match="not a complete checkpoint"):
        model_lib.find_pretrained_checkpoint(str(copy), "ckpt-000000007")


def test_warmup_scales_with_global_batch():
    assert train.warmup_steps(1.0, 256, 100) == 100
    assert train.warmup_steps(1.0, 4096, 10) == 160  # 16 epochs at 10 steps per epoch
    assert train.warmup_steps(0.0, 4096, 10) == 0


# ----------------------------------------------------------------------- bad input


def _config(tmp_path, **kw):
    base = dict(SAMPLE, mode="train", train_batch_size=4, eval_batch_size=4, train_steps=1,
                model_dir=str(tmp_path / "out"), allow_random_init=True)
    base.update(kw)
    return ChexnetConfig(**base)


def _expect_error(tmp_path, error, match, **kw):
    with pytest.raises(error, match=match):
        train.run(_config(tmp_path, **kw), Context(), log=lambda *a: None)
    assert not (tmp_path / "out").exists(), "an error must not leave output behind"


def test_missing_image_is_a_clear_error(xrays, tmp_path):
    names = sorted(p.name for p in IMAGES.glob("*.png"))[:12]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in names[1:]:
        shutil.copy(IMAGES / n, folder / n)
    path = small_csv(tmp_path, names)
    _expect_error(
        tmp_path,
        DataError,
        f"images not in the image folder, first: {names[0]}",
        csv=str(path),
        image_dir=str(folder),
        only_present_images=False,
    )


def test_csv_without_finding_labels(xrays, tmp_path):
    path = small_csv(tmp_path, [p.name for p in IMAGES.glob("*.png")], drop_column="Finding Labels")
    _expect_error(tmp_path, DataError, "Finding Labels", csv=str(path))


def test_unknown_label_name(xrays, tmp_path):
    path = small_csv(tmp_path, [p.name for p in IMAGES.glob("*.png")], relabel="Pneumonitis")
    _expect_error(tmp_path, DataError, "unknown finding label 'Pneumonitis'", csv=str(path))


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_checkpoint_of_another_architecture(xrays, pretrained, tmp_path):
    _expect_error(
        tmp_path,
        model_lib.ModelError,
        "is a resnet18, not a resnet50",
        backbone="resnet50",
        pretrained_model_dir=str(pretrained),
    )
    copy = tmp_path / "dense"
    shutil.copytree(pretrained, copy)
    for state_file in copy.glob("ckpt-*/state.json"):
        state = json.loads(state_file.read_text())
        state["architecture"] = "densenet121"
        state_file.write_text(json.dumps(state))
    _expect_error(
        tmp_path,
        model_lib.ModelError,
        "is a densenet121, not a resnet18",
        pretrained_model_dir=str(copy),
    )
    _expect_error(
        tmp_path,
        model_lib.ModelError,
        "not a directory",
        pretrained_model_dir=str(tmp_path / "nope"),
    )


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_cli_error_is_one_line(xrays, pretrained, tmp_path):
    proc = run_cmd(
        python_cmd(
            "-m",
            "chexnet",
            "train",
            *data_args(),
            "--backbone=resnet34",
            "--image_size=32",
            "--train_steps=1",
            f"--pretrained_model_dir={pretrained}",
            f"--model_dir={tmp_path / 'out'}",
        ),
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("chexnet train: error: checkpoint") and "resnet18, not a resnet34" in last
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_corrupt_png_fails_or_is_skipped(finetuned, tmp_path):
    model_dir, _ = finetuned
    names = sorted(p.name for p in IMAGES.glob("*.png"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in names:
        shutil.copy(IMAGES / n, folder / n)
    bad = folder / names[3]
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated PNG
    _expect_error(
        tmp_path, DataError, f"cannot be decoded, first: .*{names[3]}", image_dir=str(folder)
    )
    out = tmp_path / "skip"
    config = ChexnetConfig(mode="evaluate", eval_batch_size=4, eval_split="all",
                           on_corrupt="skip", model_dir=str(model_dir), report_dir=str(out),
                           **dict(SAMPLE, image_dir=str(folder)))
    summary = evaluate.run(config, Context(), log=lambda *a: None)
    assert summary["skipped"] == 1 and summary["images"] == 49
    listed = [r[0] for r in csv.reader(open(out / "predictions.csv"))][1:]
    assert names[3] not in listed and len(listed) == 49


@pytest.mark.slow  # a subprocess pre-trains (and fine-tunes)
def test_evaluate_requires_a_chexnet_checkpoint(xrays, pretrained, tmp_path):
    with pytest.raises(ConfigError, match="not a chexnet checkpoint"):
        evaluate.run(ChexnetConfig(mode="evaluate", eval_batch_size=4,
                                   model_dir=str(pretrained), report_dir=str(tmp_path / "out"),
                                   **SAMPLE), Context(), log=lambda *a: None)
    assert not (tmp_path / "out").exists()
