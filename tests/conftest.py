"""Shared test helpers: launching real multi-process jobs and locating sample data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
BIN = Path(sys.executable).parent

# Quiet TF's C++ logs in child processes; keep their stderr for failure messages.
CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT),
             "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
             "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
             "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def child_env(**extra):
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cmd(cmd, timeout=300, check=True, **env):
    """Run a command with the project's child environment; fail with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def python_cmd(*args):
    return [sys.executable, *args]


def horovodrun_cmd(np_, *args):
    return [BIN / "horovodrun", "-np", np_, "--gloo", sys.executable, *args]


def mpirun_cmd(np_, *args):
    passthrough = []
    for var in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "PATH"):
        passthrough += ["-x", var]
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", np_, *passthrough,
            "--bind-to", "none", sys.executable, *args]


def pytest_collection_modifyitems(items):
    """Tests that start launchers or clusters are slow (`make test-fast` leaves them out)."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ("distributed", "slurm", "multinode")):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tfrecords(tmp_path_factory):
    """TFRecords of 3 generated classes x 3 images (40 px, labels 1..3): train in 2 shards,
    validation in 1."""
    from imagenet import build_tfrecords, sample_images

    root = tmp_path_factory.mktemp("tiny_tfrecords")
    images, synsets = sample_images.generate(str(root / "gen"), num_classes=3, per_class=3,
                                             size=40)
    for split, shards in (("train", 2), ("validation", 1)):
        build_tfrecords.build(images, str(root / "records"), split, synsets, shards,
                              log=lambda *a, **k: None)
    return root / "records"
