"""resnet_main end to end: launchers, exact eval, resume after a kill, flag errors."""
import json
import signal
import subprocess
import time

import pytest

from imagenet import build_tfrecords, sample_images
from tests.conftest import ROOT, child_env, horovodrun_cmd, mpirun_cmd, python_cmd, run_cmd

pytestmark = pytest.mark.slow  # every test here starts resnet_main in a subprocess

TINY = ["--resnet_depth=18", "--image_size=32", "--train_batch_size=6",
        "--eval_batch_size=6", "--iterations_per_loop=2", "--steps_per_eval=2",
        "--num_train_images=60", "--log_every_n_steps=1", "--warmup_epochs=0.1"]


def _summary(stdout):
    lines = [l for l in stdout.splitlines() if "SUMMARY {" in l]
    assert lines, f"no SUMMARY line in:\n{stdout[-3000:]}"
    return json.loads(lines[-1].split("SUMMARY ", 1)[1])


@pytest.fixture(scope="module")
def ten_val_records(tmp_path_factory):
    """TFRecords with 10 validation images (3 shards) and 10 training images."""
    root = tmp_path_factory.mktemp("ten")
    images, synsets = sample_images.generate(str(root / "gen"), num_classes=5, per_class=2,
                                             size=40)
    for split, shards in (("train", 2), ("validation", 3)):
        build_tfrecords.build(images, str(root / "tfr"), split, synsets, shards,
                              num_workers=1, log=lambda *a, **k: None)
    return root / "tfr"


@pytest.fixture(scope="module")
def shared_tfrecords(tmp_path_factory, request):
    sample = ROOT / ".." / "shared" / "data" / "imagenet"
    if not sample.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {sample.resolve()}")
    out = tmp_path_factory.mktemp("shared_tfr")
    for split in ("train", "validation"):
        build_tfrecords.build(str(sample / "images"), str(out), split,
                              str(sample / "synsets.txt"), 2, num_workers=1,
                              log=lambda *a, **k: None)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_eval_counts_each_validation_image_once(ranks, ten_val_records, tmp_path):
    args = ["resnet_main.py", "--mode=train_and_eval", f"--data_dir={ten_val_records}",
            "--train_steps=1", "--num_label_classes=5", *TINY]
    cmd = python_cmd(*args) if ranks == 1 else horovodrun_cmd(ranks, *args)
    summary = _summary(run_cmd(cmd).stdout)
    assert summary["ranks"] == ranks
    assert summary["eval_images"] == 10
    assert 0.0 <= summary["top_1"] <= summary["top_5"] <= 1.0


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_train_and_eval_on_shared_sample(launcher, shared_tfrecords, tmp_path):
    args = ["resnet_main.py", "--mode=train_and_eval", f"--data_dir={shared_tfrecords}",
            f"--model_dir={tmp_path / 'run'}", "--train_steps=4", *TINY,
            f"--export_dir={tmp_path / 'export'}"]
    cmd = horovodrun_cmd(2, *args) if launcher == "horovodrun" else mpirun_cmd(2, *args)
    out = run_cmd(cmd).stdout
    summary = _summary(out)
    assert (summary["ranks"], summary["final_step"], summary["eval_images"]) == (2, 4, 42)
    assert "top_1" in summary and "top_5" in summary and summary["images_per_sec"] > 0
    assert "img/s total" in out
    state = json.loads((tmp_path / "run" / "ckpt-000000004" / "state.json").read_text())
    assert (state["step"], state["architecture"], state["resnet_depth"]) == (4, "resnet", 18)
    assert state["metrics"]["top_1"] == pytest.approx(summary["top_1"])
    assert (tmp_path / "export" / "resnet18.keras").is_file()


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    cmd = python_cmd("resnet_main.py", "--use_synthetic_data", "--mode=train",
                     f"--model_dir={model_dir}", "--train_steps=400",
                     "--num_label_classes=10", *TINY)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not list(model_dir.glob("ckpt-*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = sorted(int(p.name.split("-")[1]) for p in model_dir.glob("ckpt-*"))
    assert saved and saved[-1] < 400, "the run was not killed mid-way"
    last = saved[-1]

    # The same command, with a shorter run so the test stays quick: continues at `last`.
    rerun = [c if not str(c).startswith("--train_steps") else f"--train_steps={last + 2}"
             for c in cmd]
    out = run_cmd(rerun).stdout
    assert f"at step {last}" in out
    summary = _summary(out)
    assert (summary["start_step"], summary["final_step"]) == (last, last + 2)
    # The schedule continued: the optimizer step was restored, not restarted.
    state = json.loads((model_dir / f"ckpt-{last + 2:09d}" / "state.json").read_text())
    assert state["step"] == last + 2


@pytest.mark.parametrize("argv, needle", [
    (["--use_tpu=True", "--use_synthetic_data"], "--use_tpu"),
    (["--resnet_depth=77", "--use_synthetic_data"], "--resnet_depth"),
    (["--precision=fp8", "--use_synthetic_data"], "--precision"),
    (["--train_batch_size=-8", "--use_synthetic_data"], "--train_batch_size"),
    ([], "--data_dir is required"),
    (["--data_dir=EMPTY"], "--data_dir="),
])
def test_bad_flags_give_one_line_errors(argv, needle, tmp_path):
    argv = [a.replace("EMPTY", str(tmp_path)) for a in argv]
    proc = run_cmd(python_cmd("resnet_main.py", *argv), check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines()
              if "error" in l.lower() and not l.startswith(("I0000", "WARNING"))]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]


def test_surfsara_preset_snapshots_and_collapsed_ensemble(tmp_path):
    # 7.2 epochs of 10 steps: the 72-epoch solver scaled by 0.1, cycles end at 40/55/67/72.
    out = run_cmd(python_cmd(
        "resnet_main.py", "--use_synthetic_data", "--mode=train_and_eval",
        f"--model_dir={tmp_path}", "--lr_schedule=surfsara_4096", "--collapsed_ensemble",
        "--target_top_1=0.0", "--train_epochs=7.2", "--num_train_images=80",
        "--train_batch_size=8", "--eval_batch_size=8", "--num_eval_images=16",
        "--num_label_classes=10", "--resnet_depth=18", "--image_size=32",
        "--iterations_per_loop=10", "--steps_per_eval=20", "--log_every_n_steps=10")).stdout
    summary = _summary(out)
    snapshots = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snapshots == [f"snapshot-{s:09d}.weights.h5" for s in (40, 55, 67, 72)]
    assert summary["ensemble_size"] == 4 and 0 <= summary["ensemble_top_1"] <= 1
    assert {f"snapshot_{s}_top_1" for s in (40, 55, 67, 72)} <= set(summary)
    assert summary["time_to_target"]["step"] == 20  # first evaluation reaches 0.0
