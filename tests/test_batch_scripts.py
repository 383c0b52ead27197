"""Issue 20, item 6: the batch scripts never run environment values as code.

Each script is run with bash outside SLURM (LAUNCHER=none) and a fake PYTHON that records its
arguments, so nothing is trained: a numeric variable holding `X[$(touch FILE)]` (which bash
arithmetic would execute) must stop the script with one line naming the variable, and FILE
must not exist; an EXTRA_FLAGS value with a `*` must reach the program as a literal `*`.
"""
import subprocess

import pytest

from tests.conftest import ROOT, child_env

SCRIPTS = {name: ROOT / "slurm" / f"{name}.sbatch"
           for name in ("imagenet_resnet50", "chexnet_finetune", "evaluate")}


def _run(script, tmp_path, **env):
    """Run `script` in tmp_path with a recording fake python; (rc, stderr, argv or None)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$(dirname "$0")/argv"\n')
    fake.chmod(0o755)
    base = dict(PROJECT_DIR=ROOT, PYTHON=fake, LAUNCHER="none", SYNTHETIC=1,
                MODEL_DIR=tmp_path / "model", DATA_DIR=tmp_path, ALLOW_RANDOM_INIT=1)
    environ = child_env(**base, **env)
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        environ.pop(name, None)
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=environ, timeout=60,
                          capture_output=True, text=True)
    argv = tmp_path / "argv"
    return proc.returncode, proc.stderr, argv.read_text().splitlines() if argv.exists() else None


@pytest.mark.parametrize("script, variable", [
    ("imagenet_resnet50", "BATCH"),           # the attack in the issue: inside $(( ))
    ("imagenet_resnet50", "TRAIN_EPOCHS"),
    ("imagenet_resnet50", "CPUS_PER_TASK"),   # common.sh: $(( CPUS_PER_TASK - ... ))
    ("imagenet_resnet50", "RESERVED_CORES"),
    ("chexnet_finetune", "EVAL_BATCH"),
    ("evaluate", "DEPTH"),
])
def test_command_in_a_numeric_variable_is_refused_not_run(tmp_path, script, variable):
    planted = tmp_path / "pwned"
    (tmp_path / "model").mkdir()
    (tmp_path / "Data_Entry_2017.csv").write_text("")
    (tmp_path / "images").mkdir()
    rc, err, argv = _run(SCRIPTS[script], tmp_path, **{variable: f"DEPTH[$(touch {planted})]"})
    assert not planted.exists()
    assert rc != 0 and argv is None  # nothing launched
    lines = err.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "whole number" in lines[0], err


def test_good_values_still_launch_and_flags_are_not_globbed(tmp_path):
    for name in ("a.txt", "b.txt"):  # what `*` would glob to in the working folder
        (tmp_path / name).write_text("")
    rc, err, argv = _run(SCRIPTS["imagenet_resnet50"], tmp_path, BATCH="08", TRAIN_EPOCHS=2,
                         NUM_TRAIN_IMAGES=100, EXTRA_FLAGS="--x=1 *.txt")
    assert rc == 0, err
    assert argv[-2:] == ["--x=1", "*.txt"]
    assert "--train_batch_size=8" in argv
    assert f"--train_steps={2 * 100 // 8}" in argv



def _fake_runtime(tmp_path):
    """A fake `apptainer` that records its arguments, then runs what follows the image."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apptainer"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/runtime_argv"\n'
                    'while [ "$1" != "$IMAGE" ]; do shift; done; shift; exec "$@"\n')
    fake.chmod(0o755)
    return bin_dir


def test_container_runs_the_program_in_the_image_with_the_checkout_bound(tmp_path):
    image = tmp_path / "hpc-resnet.sif"
    image.write_text("")
    bin_dir = _fake_runtime(tmp_path)
    rc, err, argv = _run(SCRIPTS["imagenet_resnet50"], tmp_path, CONTAINER=image, IMAGE=image,
                         CONTAINER_PYTHON=tmp_path / "python", CONTAINER_FLAGS="--bind /scratch",
                         PATH=f"{bin_dir}:/usr/bin:/bin")
    assert rc == 0, err
    runtime_argv = (bin_dir / "runtime_argv").read_text().splitlines()
    assert runtime_argv[:6] == ["exec", "--bind", str(ROOT), "--bind", "/scratch", str(image)]
    assert runtime_argv[6:8] == [str(tmp_path / "python"), str(ROOT / "resnet_main.py")]
    assert argv[0] == str(ROOT / "resnet_main.py")  # the program ran, inside "the image"


@pytest.mark.parametrize("make_image, path, needle", [
    (False, None, "no such image file"),
    (True, "/usr/bin:/bin", "neither apptainer nor singularity"),
])
def test_container_mistakes_are_one_line_before_launch(tmp_path, make_image, path, needle):
    image = tmp_path / "hpc-resnet.sif"
    if make_image:
        image.write_text("")
    env = dict(CONTAINER=image)
    if path:
        env["PATH"] = path
    rc, err, argv = _run(SCRIPTS["chexnet_finetune"], tmp_path, **env)
    lines = err.strip().splitlines()
    assert rc != 0 and argv is None and len(lines) == 1 and needle in lines[0], err
