"""Runs that record how to reproduce them (hooks.state.run_record): flags.txt reruns the same
run, metrics.jsonl holds what the progress lines say, the environment is what this
process and the system report on their own."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
from absl import flags as absl_flags

import flags
import resnet_main
from chexnet import __main__ as chexnet_main
from hooks.distributed.horovod_glue import Context
from hooks.state import run_record
from tests import checkpoint_values
from tests.conftest import ROOT, mpirun_cmd, python_cmd, run_cmd

STEP_LINE = re.compile(r"step +(\d+)/(\d+) loss ([\d.naninf-]+) lr ([\d.e+-]+) .*\| "
                       r"([\d.]+) img/s/rank ([\d.]+) img/s total")
EVAL_LINE = re.compile(r"eval at step (\d+): top_1 ([\d.]+) top_5 ([\d.]+)")


def _parsed(define, argv):
    fv = absl_flags.FlagValues()
    define(fv)
    fv(["prog", *argv])
    return fv


def _values(fv) -> dict:
    return {name: fv[name].value for name in fv if not fv[name].name.startswith("flagfile")}


@pytest.mark.parametrize("define, argv, rerun, compat", [
    (resnet_main.define_flags,
     ["--data_dir=/data/my images", "--train_batch_size=8192", "--nonesterov", "--mkl",
      "--precision=bfloat16", "--seed=7", "--warmup_epochs=2.5", "--tpu_zone=us-x"],
     "python resnet_main.py", resnet_main.COMPAT_FLAGS),
    (chexnet_main.define_flags,
     ["--csv=/x/Data_Entry_2017.csv", "--split_fractions=0.6,0.2,0.2",
      "--backbone=resnet50", "--noweighted_loss", "--max_images=50"],
     "python -m chexnet train", ()),
])
def test_flags_text_parsed_back_gives_every_flag_its_value(define, argv, rerun, compat,
                                                           tmp_path):
    fv = _parsed(define, argv)
    text = flags.flagfile_text(fv, rerun, compat)
    path = tmp_path / "flags.txt"
    path.write_text(text)
    again = _parsed(define, [f"--flagfile={path}"])
    assert _values(again) == _values(fv)
    assert rerun in text
    # Ignored TPU flags only when given (a rerun would otherwise warn about each).
    if compat:
        written = {line.split("=")[0].lstrip("-") for line in text.splitlines()}
        assert "tpu_zone" in written and "tpu" not in written and "gcp_project" not in written
        assert not [n for n in compat if n != "tpu_zone" and again[n].present]


def test_metrics_log_appends_whole_lines_from_rank_0_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = run_record.MetricsLog(str(path))
    log.write({"step": 1, "loss": 2.5}, Context(rank=1, size=2))
    assert not path.exists()
    # Two processes appending at once: every line stays whole.
    code = ("import sys, types; from hooks.state import run_record;"
            f"log = run_record.MetricsLog({str(path)!r});"
            "chief = types.SimpleNamespace(is_chief=True);"
            "[log.write({'step': i, 'who': sys.argv[1], 'pad': 'x' * 3000}, chief) "
            "for i in range(300)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, who], cwd=ROOT) for who in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for who in "ab":
        assert [r["step"] for r in records if r["who"] == who] == list(range(300))


def test_metrics_log_follows_no_planted_link_and_keeps_the_umask(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / "metrics.jsonl")
    with pytest.raises(OSError):
        run_record.MetricsLog(str(tmp_path / "run" / "metrics.jsonl")).write({}, Context())
    assert target.read_text() == "keep"
    old = os.umask(0o027)
    try:
        run_record.MetricsLog(str(tmp_path / "m.jsonl")).write({"step": 1}, Context())
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.jsonl").st_mode & 0o777 == 0o640


def test_cpu_launcher_and_commit_from_their_sources(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 "
                    "avx512_bf16\n\nprocessor\t: 1\nmodel name\t: other\n")
    found = run_record.cpu(str(info))
    assert (found["model"], found["flags"]) == ("Test CPU 9000", ["fpu", "avx2", "avx512_bf16"])
    assert run_record.launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpirun (Open MPI)"
    assert run_record.launcher({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}) == "srun"
    assert run_record.launcher({"HOROVOD_GLOO_RENDEZVOUS_ADDR": "h"}) == "horovodrun (gloo)"
    assert run_record.launcher({}) == "single process"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert run_record.git_commit(str(tmp_path)) == head
    (tmp_path / "f").write_text("2")
    assert run_record.git_commit(str(tmp_path)) == head + "-dirty"
    assert run_record.git_commit(str(tmp_path / "cpuinfo")) in ("unknown", os.environ.get(
        run_record.COMMIT_ENV))


def _lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Model name"))


def _expected_environment() -> dict:
    """The versions as this process and the system report them, independently of the run."""
    import horovod
    import keras
    import numpy
    import tensorflow as tf
    from horovod import _hpc_resnet_patches

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
    return {"python": ".".join(map(str, sys.version_info[:3])), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": numpy.__version__,
            "horovod_version": horovod.__version__,
            "patch_level": _hpc_resnet_patches.PATCH_LEVEL, "git_head": head}


def _check_environment(env: dict, expected: dict, ranks: int, launcher: str):
    assert {k: env[k] for k in ("python", "tensorflow", "keras", "numpy")} == {
        k: expected[k] for k in ("python", "tensorflow", "keras", "numpy")}
    assert (env["horovod"]["version"], env["horovod"]["patch_level"]) == (
        expected["horovod_version"], expected["patch_level"])
    assert env["git_commit"].split("-")[0] == expected["git_head"]
    assert env["cpu"]["model"] == _lscpu_model()
    assert (env["world_size"], env["launcher"], env["nodes"]) == (
        ranks, launcher, [socket.gethostname()])


RUN = ["--use_synthetic_data", "--mode=train_and_eval", "--num_label_classes=10",
       "--resnet_depth=18", "--image_size=32", "--train_batch_size=6", "--eval_batch_size=6",
       "--num_eval_images=12", "--iterations_per_loop=2", "--steps_per_eval=2",
       "--num_train_images=60", "--log_every_n_steps=1", "--warmup_epochs=0.1",
       "--train_steps=4", "--seed=5", "--num_intra_threads=1", "--num_inter_threads=1"]


@pytest.mark.slow
def test_flags_txt_reruns_the_run_and_metrics_jsonl_matches_its_lines(tmp_path):
    first = run_cmd(python_cmd("resnet_main.py", *RUN, f"--model_dir={tmp_path / 'a'}",
                               "--base_learning_rate=0.3")).stdout
    flags_txt = tmp_path / "a" / run_record.FLAGS_FILE
    assert "--base_learning_rate=0.3" in flags_txt.read_text().splitlines()
    run_cmd(python_cmd("resnet_main.py", f"--flagfile={flags_txt}",
                       f"--model_dir={tmp_path / 'b'}"))
    checkpoint_values.assert_same_state(checkpoint_values.newest_state(tmp_path / "b"),
                                        checkpoint_values.newest_state(tmp_path / "a"),
                                        atol=0.0)
    records = [json.loads(line) for line in
               (tmp_path / "a" / run_record.METRICS_FILE).read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    lines = [m.groups() for m in map(STEP_LINE.search, first.splitlines()) if m]
    assert len(train) == len(lines) == 4
    for record, (step, total, loss, lr, per_rank, total_rate) in zip(train, lines):
        assert (record["step"], record["total_steps"]) == (int(step), int(total))
        assert f"{record['loss']:.4f}" == loss and f"{record['lr']:.3e}" == lr
        assert f"{record['images_per_sec']:.1f}" == total_rate
    evals = [r for r in records if r["kind"] == "eval"]
    eval_lines = [m.groups() for m in map(EVAL_LINE.search, first.splitlines()) if m]
    assert [(str(r["step"]), f"{r['metrics']['top_1']:.4f}", f"{r['metrics']['top_5']:.4f}")
            for r in evals] == eval_lines and len(evals) == 2
    expected = _expected_environment()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    _check_environment(summary["environment"], expected, 1, "single process")
    state = json.loads(next((tmp_path / "a").glob("ckpt-*/state.json")).read_text())
    assert state["environment"] == summary["environment"]


@pytest.mark.distributed
def test_a_two_rank_mpirun_records_its_mpi_library_and_launcher(tmp_path):
    run_cmd(mpirun_cmd(2, "resnet_main.py", *RUN, f"--model_dir={tmp_path / 'a'}"))
    env = json.loads((tmp_path / "a" / "summary.json").read_text())["environment"]
    _check_environment(env, _expected_environment(), 2, "mpirun (Open MPI)")
    version = re.search(r"\d+\.\d+\.\d+", subprocess.run(
        ["mpirun", "--version"], capture_output=True, text=True).stdout).group(0)
    assert env["mpi"].startswith("Open MPI v" + version), env["mpi"]
    assert env["horovod"]["controller"] == "mpi"
